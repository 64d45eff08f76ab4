"""The model registry: every model cortexbench knows, by name, with its input and where it comes from.

Plain Python: no framework is imported here.  A backend builds a spec into a network (see
``cortexbench.models.backends``); ``cortexbench.models.export`` writes the built networks to ``model_dir``.

Groups name several models at once in ``models``: ``imagenet`` (the eight image classifiers of the
original experiment), ``small`` (the four small networks, which can also be trained) and ``all``.
``null`` returns at once; ``null:0.002`` sleeps 2 ms per image first (a harness probe).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from cortexbench.errors import ConfigError, ModelNotFoundError, did_you_mean

Group = Literal["imagenet", "small", "harness"]
InputKind = Literal["rgb", "gray", "flat", "features"]


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: what it takes, what it gives, and which zoo has it."""

    name: str
    group: Group
    input_shape: tuple[int, ...]  # one sample, without the batch axis
    num_classes: int
    description: str
    mxnet_zoo: str | None = None  # name in mxnet.gluon.model_zoo.vision, when it has the model
    torchvision: str | None = None  # name in torchvision.models, when it has the model
    trainable: bool = False  # small enough for --train
    service_s: float = 0.0  # null only: seconds to wait per image

    @property
    def input_kind(self) -> InputKind:
        """How an image is turned into this model's input (see cortexbench.images.dataset)."""
        if len(self.input_shape) == 3:
            return "rgb" if self.input_shape[0] == 3 else "gray"
        return "flat" if self.input_shape[0] > 16 else "features"

    @property
    def is_null(self) -> bool:
        return self.group == "harness"


_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec("caffenet", "imagenet", (3, 227, 227), 1000,
              "CaffeNet (AlexNet variant of BVLC Caffe: LRN, pooling before normalisation)"),
    ModelSpec("nin", "imagenet", (3, 224, 224), 1000, "Network in Network (mlpconv blocks, global average pooling)"),
    ModelSpec("squeezenet", "imagenet", (3, 224, 224), 1000, "SqueezeNet 1.1",
              mxnet_zoo="squeezenet1.1", torchvision="squeezenet1_1"),
    ModelSpec("vgg16", "imagenet", (3, 224, 224), 1000, "VGG-16", mxnet_zoo="vgg16", torchvision="vgg16"),
    ModelSpec("vgg19", "imagenet", (3, 224, 224), 1000, "VGG-19", mxnet_zoo="vgg19", torchvision="vgg19"),
    ModelSpec("inception_v3", "imagenet", (3, 299, 299), 1000, "Inception v3 with batch norm, 299x299 input",
              mxnet_zoo="inceptionv3", torchvision="inception_v3"),
    ModelSpec("resnet152", "imagenet", (3, 224, 224), 1000, "ResNet-152 (v1.5: stride on the 3x3 convolution)",
              torchvision="resnet152"),
    ModelSpec("resnext101_64x4d", "imagenet", (3, 224, 224), 1000, "ResNeXt-101 64x4d",
              torchvision="resnext101_64x4d"),
    ModelSpec("mlp2", "small", (2,), 2, "2 inputs -> 16 -> 16 -> 2, ReLU (tabular-style input)", trainable=True),
    ModelSpec("mnist_mlp", "small", (784,), 10, "784-512-512-10, ReLU, dropout 0.2", trainable=True),
    ModelSpec("mnist_cnn", "small", (1, 28, 28), 10, "conv32-conv64-maxpool-fc128-fc10", trainable=True),
    ModelSpec("digits_cnn", "small", (1, 8, 8), 10, "conv16-relu-pool-batchnorm-conv32-relu-pool-fc10 (8x8 digits)",
              trainable=True),
    ModelSpec("null", "harness", (3, 224, 224), 1, "returns at once: measures the harness itself"),
)

REGISTRY: dict[str, ModelSpec] = {s.name: s for s in _SPECS}
GROUPS: dict[str, tuple[str, ...]] = {
    "imagenet": tuple(s.name for s in _SPECS if s.group == "imagenet"),
    "small": tuple(s.name for s in _SPECS if s.group == "small"),
    "all": tuple(s.name for s in _SPECS if s.group != "harness"),
}


def get_spec(name: str) -> ModelSpec:
    """The spec of ``name``; ``null:0.002`` is the null model with a 2 ms service time."""
    if name.startswith("null:"):
        try:
            service_s = float(name[5:])
        except ValueError:
            raise ModelNotFoundError(f"model '{name}': the null model takes seconds, as in 'null:0.002'") from None
        if service_s < 0:
            raise ModelNotFoundError(f"model '{name}': the service time must be 0 or more seconds")
        base = REGISTRY["null"]
        return ModelSpec(name, base.group, base.input_shape, base.num_classes, base.description, service_s=service_s)
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelNotFoundError(
            f"unknown model '{name}'{did_you_mean(name, list(REGISTRY) + list(GROUPS))}") from None


def expand_model_names(names: Iterable[str], key: str = "models", *, known_only: bool = True) -> tuple[str, ...]:
    """Expand groups (imagenet, small, all), check every name (``known_only`` False: any name passes, as a
    served model's name does), keep the order, drop repeats."""
    out: list[str] = []
    for name in names:
        if name in GROUPS:
            out += GROUPS[name]
            continue
        if known_only:
            try:
                get_spec(name)
            except ModelNotFoundError as e:
                raise ConfigError(f"'{key}': {e}") from None
        out.append(name)
    if not out:
        raise ConfigError(f"'{key}' must name at least one model (or a group: {', '.join(GROUPS)})")
    return tuple(dict.fromkeys(out))


def file_stem(name: str) -> str:
    """The file name a model is stored under: every null:S shares the file of 'null'."""
    return "null" if name.startswith("null") else name
