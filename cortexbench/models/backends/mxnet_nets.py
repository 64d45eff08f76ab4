"""Gluon definitions of the models that MXNet's model zoo does not have.

CaffeNet, Network in Network, ResNet-152 v1.5, ResNeXt-101 64x4d and the four small networks, laid out
like their torch/torchvision counterparts so that parameter counts match (BatchNorm running statistics
are not parameters there and are not counted here either).  ``build_block`` returns an uninitialised
``HybridBlock`` for any registered model, taking the zoo's definition where MXNet has one; the MXNet
backend (``mxnet_impl``) initialises, exports and loads it.

Only ``mxnet_impl`` imports this module: it imports MXNet at the top.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mxnet.gluon import HybridBlock, nn
from mxnet.gluon.model_zoo import vision

from cortexbench.models.registry import ModelSpec


class LRN(HybridBlock):
    """Local response normalisation across channels, as in Caffe: x / (k + alpha/n * sum x^2)^beta."""

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, **kwargs: object):
        super().__init__(**kwargs)
        self._args = {"nsize": size, "alpha": alpha, "beta": beta, "knorm": k}

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        return F.LRN(x, **self._args)


def _conv(channels: int, kernel: int, stride: int = 1, pad: int = 0, groups: int = 1) -> nn.Conv2D:
    return nn.Conv2D(channels, kernel, strides=stride, padding=pad, groups=groups, activation="relu")


def caffenet(classes: int = 1000) -> HybridBlock:
    """BVLC CaffeNet (227x227): AlexNet with pooling before LRN and grouped conv2/4/5."""
    net = nn.HybridSequential(prefix="caffenet_")
    with net.name_scope():
        net.add(_conv(96, 11, stride=4), nn.MaxPool2D(3, 2), LRN(),
                _conv(256, 5, pad=2, groups=2), nn.MaxPool2D(3, 2), LRN(),
                _conv(384, 3, pad=1), _conv(384, 3, pad=1, groups=2), _conv(256, 3, pad=1, groups=2),
                nn.MaxPool2D(3, 2),
                nn.Dense(4096, activation="relu"), nn.Dropout(0.5),
                nn.Dense(4096, activation="relu"), nn.Dropout(0.5),
                nn.Dense(classes))
    return net


def nin(classes: int = 1000) -> HybridBlock:
    """ImageNet Network in Network: four mlpconv blocks and global average pooling."""
    net = nn.HybridSequential(prefix="nin_")
    with net.name_scope():
        net.add(_conv(96, 11, stride=4), _conv(96, 1), _conv(96, 1), nn.MaxPool2D(3, 2),
                _conv(256, 5, pad=2), _conv(256, 1), _conv(256, 1), nn.MaxPool2D(3, 2),
                _conv(384, 3, pad=1), _conv(384, 1), _conv(384, 1), nn.MaxPool2D(3, 2), nn.Dropout(0.5),
                _conv(1024, 3, pad=1), _conv(1024, 1), _conv(classes, 1),
                nn.GlobalAvgPool2D(), nn.Flatten())
    return net


class Bottleneck(HybridBlock):
    """ResNet v1.5 / ResNeXt bottleneck: 1x1, 3x3 (carries the stride and the groups), 1x1 x4.

    ``last_bn`` is the block's final BatchNorm, whose gamma the initialiser scales down so that the
    residual sums of a deep random network stay of order one."""

    expansion = 4

    def __init__(self, planes: int, width: int, stride: int, groups: int, downsample: bool, **kwargs: object):
        super().__init__(**kwargs)
        with self.name_scope():
            self.body = nn.HybridSequential(prefix="")
            self.body.add(nn.Conv2D(width, 1, use_bias=False), nn.BatchNorm(), nn.Activation("relu"),
                          nn.Conv2D(width, 3, strides=stride, padding=1, groups=groups, use_bias=False),
                          nn.BatchNorm(), nn.Activation("relu"),
                          nn.Conv2D(planes * self.expansion, 1, use_bias=False))
            self.last_bn = nn.BatchNorm()
            self.body.add(self.last_bn)
            self.downsample: nn.HybridSequential | None = None
            if downsample:
                self.downsample = nn.HybridSequential(prefix="down_")
                self.downsample.add(nn.Conv2D(planes * self.expansion, 1, strides=stride, use_bias=False),
                                    nn.BatchNorm())

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        shortcut = self.downsample(x) if self.downsample is not None else x
        return F.Activation(self.body(x) + shortcut, act_type="relu")


class ResNet(HybridBlock):
    """torchvision's ResNet layout: 7x7/2 stem, max pool, four stages, global average pool, dense."""

    def __init__(self, layers: tuple[int, ...], classes: int = 1000, groups: int = 1, width_per_group: int = 64,
                 **kwargs: object):
        super().__init__(**kwargs)
        with self.name_scope():
            self.features = nn.HybridSequential(prefix="")
            self.features.add(nn.Conv2D(64, 7, strides=2, padding=3, use_bias=False), nn.BatchNorm(),
                              nn.Activation("relu"), nn.MaxPool2D(3, 2, padding=1))
            in_channels = 64
            for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
                stride = 1 if stage == 0 else 2
                width = int(planes * width_per_group / 64) * groups
                seq = nn.HybridSequential(prefix=f"stage{stage + 1}_")
                with seq.name_scope():
                    for i in range(blocks):
                        s = stride if i == 0 else 1
                        down = i == 0 and (s != 1 or in_channels != planes * Bottleneck.expansion)
                        seq.add(Bottleneck(planes, width, s, groups, down, prefix=f"block{i}_"))
                        in_channels = planes * Bottleneck.expansion
                self.features.add(seq)
            self.features.add(nn.GlobalAvgPool2D(), nn.Flatten())
            self.output = nn.Dense(classes)

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        return self.output(self.features(x))


def resnet152(classes: int = 1000) -> HybridBlock:
    return ResNet((3, 8, 36, 3), classes, prefix="resnet152_")


def resnext101_64x4d(classes: int = 1000) -> HybridBlock:
    return ResNet((3, 4, 23, 3), classes, groups=64, width_per_group=4, prefix="resnext101_")


def mlp2(classes: int = 2) -> HybridBlock:
    net = nn.HybridSequential(prefix="mlp2_")
    with net.name_scope():
        net.add(nn.Dense(16, activation="relu"), nn.Dense(16, activation="relu"), nn.Dense(classes))
    return net


def mnist_mlp(classes: int = 10) -> HybridBlock:
    net = nn.HybridSequential(prefix="mnist_mlp_")
    with net.name_scope():
        net.add(nn.Dense(512, activation="relu"), nn.Dropout(0.2),
                nn.Dense(512, activation="relu"), nn.Dropout(0.2), nn.Dense(classes))
    return net


def mnist_cnn(classes: int = 10) -> HybridBlock:
    net = nn.HybridSequential(prefix="mnist_cnn_")
    with net.name_scope():
        net.add(_conv(32, 3), _conv(64, 3), nn.MaxPool2D(2), nn.Dropout(0.25), nn.Flatten(),
                nn.Dense(128, activation="relu"), nn.Dropout(0.5), nn.Dense(classes))
    return net


def digits_cnn(classes: int = 10) -> HybridBlock:
    net = nn.HybridSequential(prefix="digits_cnn_")
    with net.name_scope():
        net.add(_conv(16, 3, pad=1), nn.MaxPool2D(2), nn.BatchNorm(),
                _conv(32, 3, pad=1), nn.MaxPool2D(2), nn.Flatten(), nn.Dense(classes))
    return net


OWN: dict[str, Callable[[int], HybridBlock]] = {
    "caffenet": caffenet, "nin": nin, "resnet152": resnet152, "resnext101_64x4d": resnext101_64x4d,
    "mlp2": mlp2, "mnist_mlp": mnist_mlp, "mnist_cnn": mnist_cnn, "digits_cnn": digits_cnn,
}


def has_definition(spec: ModelSpec) -> bool:
    """Whether ``build_block`` can build ``spec`` (the zoo's model or one of ours)."""
    return spec.mxnet_zoo is not None or spec.name in OWN


def build_block(spec: ModelSpec) -> HybridBlock:
    """An uninitialised block for ``spec``; names are fixed by the caller's ``mx.name.NameManager``."""
    if spec.mxnet_zoo is not None:
        return vision.get_model(spec.mxnet_zoo, pretrained=False, classes=spec.num_classes)
    try:
        make = OWN[spec.name]
    except KeyError:
        raise KeyError(f"no MXNet definition of model '{spec.name}'") from None
    return make(spec.num_classes)


def residual_last_bns(block: HybridBlock) -> list[nn.BatchNorm]:
    """The final BatchNorm of every residual branch in ``block`` (empty for non-residual nets)."""
    found: list[nn.BatchNorm] = []

    def visit(b: HybridBlock) -> None:
        if isinstance(b, Bottleneck):
            found.append(b.last_bn)

    block.apply(visit)
    return found
