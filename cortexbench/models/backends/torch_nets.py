"""The torch networks of every registered model, and their deterministic random initialisation.

``make(spec)`` builds the architecture alone (cheap under ``torch.device('meta')``: that is how the torch
backend loads a file); ``build(spec, seed)`` makes it on the CPU with seeded random weights, in eval mode.

The six models torchvision has (squeezenet1_1, vgg16, vgg19, inception_v3, resnet152,
resnext101_64x4d) are defined here with exactly torchvision's ``state_dict`` keys and shapes, so a
torchvision checkpoint saved as safetensors loads as is (inception_v3 is built without the auxiliary
classifier; a file's ``AuxLogits.*`` keys are ignored, see ``ignored_keys``).  They are always built
from these definitions, never through torchvision, so that one seed gives the same weights on every
machine, with or without torchvision.  CaffeNet, NIN and the four small networks are cortexbench's own;
their keys follow the Caffe layer names (``conv1``, ``cccp1``, ``fc6``, ...).

Initialisation: torchvision's own scheme per family (Kaiming for VGG/ResNet/SqueezeNet, truncated normal
for Inception), Kaiming fan-in for CaffeNet/NIN, torch's defaults for the small networks.  Networks with
batch norm then have their running statistics calibrated on one seeded random batch, so that in eval
mode every layer sees unit-scale activations: outputs stay finite and varied in fp32 and fp16.  In the
ResNets the last batch norm of each residual branch gets gamma 1/sqrt(blocks) first (as the MXNet backend
does): without it a random ResNet-152 is so chaotic that TF32 or fp16 rounding moves its outputs by 15%.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from cortexbench.models.backends.base import seed_for
from cortexbench.models.registry import ModelSpec

# The torchvision constructor each in-tree definition mirrors (same state_dict keys and shapes).
TORCHVISION_EQUIVALENT = {"squeezenet": "squeezenet1_1", "vgg16": "vgg16", "vgg19": "vgg19",
                          "inception_v3": "inception_v3", "resnet152": "resnet152",
                          "resnext101_64x4d": "resnext101_64x4d"}


# --- CaffeNet's local response normalisation -------------------------------------------------------


class _OnnxLRN(torch.autograd.Function):
    """Exports as one ONNX ``LRN`` node (torch would otherwise trace LRN into a dozen pad/pool/pow ops)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:  # noqa: ANN001
        return F.local_response_norm(x, size, alpha, beta, k)

    @staticmethod
    def symbolic(g, x, size: int, alpha: float, beta: float, k: float):  # noqa: ANN001
        return g.op("LRN", x, size_i=size, alpha_f=alpha, beta_f=beta, bias_f=k)


class LRN(nn.Module):
    """Across-channel LRN as in Caffe (x / (k + alpha/size * sum x^2)^beta, ONNX's definition too).

    ``annotate`` (set by the torch backend's ``profile_ops`` only) wraps the call in a profiler range, so
    that the pad/pool/pow/div ops LRN is made of are counted as ``normalization``, not as pooling and
    elementwise ops."""

    PROFILE_NAME = "cortexbench::lrn"

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k
        self.annotate = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return _OnnxLRN.apply(x, self.size, self.alpha, self.beta, self.k)
        if self.annotate:
            with torch.profiler.record_function(self.PROFILE_NAME):
                return F.local_response_norm(x, self.size, self.alpha, self.beta, self.k)
        return F.local_response_norm(x, self.size, self.alpha, self.beta, self.k)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


# --- cortexbench's own networks -------------------------------------------------------------------


def _seq(*layers: tuple[str, nn.Module]) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers))


def caffenet() -> nn.Sequential:
    """BVLC CaffeNet, 3x227x227 (60,965,224 parameters)."""
    return _seq(
        ("conv1", nn.Conv2d(3, 96, 11, stride=4)), ("relu1", nn.ReLU(inplace=True)),
        ("pool1", nn.MaxPool2d(3, 2, ceil_mode=True)), ("norm1", LRN(5, 1e-4, 0.75, 1.0)),
        ("conv2", nn.Conv2d(96, 256, 5, padding=2, groups=2)), ("relu2", nn.ReLU(inplace=True)),
        ("pool2", nn.MaxPool2d(3, 2, ceil_mode=True)), ("norm2", LRN(5, 1e-4, 0.75, 1.0)),
        ("conv3", nn.Conv2d(256, 384, 3, padding=1)), ("relu3", nn.ReLU(inplace=True)),
        ("conv4", nn.Conv2d(384, 384, 3, padding=1, groups=2)), ("relu4", nn.ReLU(inplace=True)),
        ("conv5", nn.Conv2d(384, 256, 3, padding=1, groups=2)), ("relu5", nn.ReLU(inplace=True)),
        ("pool5", nn.MaxPool2d(3, 2, ceil_mode=True)), ("flatten", nn.Flatten()),
        ("fc6", nn.Linear(256 * 6 * 6, 4096)), ("relu6", nn.ReLU(inplace=True)), ("drop6", nn.Dropout(0.5)),
        ("fc7", nn.Linear(4096, 4096)), ("relu7", nn.ReLU(inplace=True)), ("drop7", nn.Dropout(0.5)),
        ("fc8", nn.Linear(4096, 1000)),
    )


def nin() -> nn.Sequential:
    """Network in Network for ImageNet (Caffe model zoo), 3x224x224; pools round up as Caffe's do."""
    layers: list[tuple[str, nn.Module]] = []
    blocks = [  # (conv name, out, kernel, stride, pad), then two 1x1 "cccp" layers
        ("conv1", 96, 11, 4, 0, "cccp1", "cccp2", 96),
        ("conv2", 256, 5, 1, 2, "cccp3", "cccp4", 256),
        ("conv3", 384, 3, 1, 1, "cccp5", "cccp6", 384),
        ("conv4", 1024, 3, 1, 1, "cccp7", "cccp8", 1000),
    ]
    cin = 3
    for i, (conv, out, k, s, p, c1, c2, last) in enumerate(blocks, 1):
        layers += [(conv, nn.Conv2d(cin, out, k, stride=s, padding=p)), (f"{conv}_relu", nn.ReLU(inplace=True)),
                   (c1, nn.Conv2d(out, out, 1)), (f"{c1}_relu", nn.ReLU(inplace=True)),
                   (c2, nn.Conv2d(out, last, 1)), (f"{c2}_relu", nn.ReLU(inplace=True))]
        if i < 4:
            layers.append((f"pool{i}", nn.MaxPool2d(3, 2, ceil_mode=True)))
        if i == 3:
            layers.append(("drop", nn.Dropout(0.5)))
        cin = out
    layers += [("pool4", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]
    return _seq(*layers)


def mlp2() -> nn.Sequential:
    return _seq(("fc1", nn.Linear(2, 16)), ("relu1", nn.ReLU()), ("fc2", nn.Linear(16, 16)), ("relu2", nn.ReLU()),
                ("fc3", nn.Linear(16, 2)))


def mnist_mlp() -> nn.Sequential:
    return _seq(("fc1", nn.Linear(784, 512)), ("relu1", nn.ReLU()), ("drop1", nn.Dropout(0.2)),
                ("fc2", nn.Linear(512, 512)), ("relu2", nn.ReLU()), ("drop2", nn.Dropout(0.2)),
                ("fc3", nn.Linear(512, 10)))


def mnist_cnn() -> nn.Sequential:
    return _seq(("conv1", nn.Conv2d(1, 32, 3)), ("relu1", nn.ReLU()), ("conv2", nn.Conv2d(32, 64, 3)),
                ("relu2", nn.ReLU()), ("pool", nn.MaxPool2d(2)), ("drop1", nn.Dropout(0.25)),
                ("flatten", nn.Flatten()), ("fc1", nn.Linear(64 * 12 * 12, 128)), ("relu3", nn.ReLU()),
                ("drop2", nn.Dropout(0.5)), ("fc2", nn.Linear(128, 10)))


def digits_cnn() -> nn.Sequential:
    return _seq(("conv1", nn.Conv2d(1, 16, 3, padding=1)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
                ("bn1", nn.BatchNorm2d(16)), ("conv2", nn.Conv2d(16, 32, 3, padding=1)), ("relu2", nn.ReLU()),
                ("pool2", nn.MaxPool2d(2)), ("flatten", nn.Flatten()), ("fc", nn.Linear(32 * 2 * 2, 10)))


# --- torchvision's architectures (same module names, so the same state_dict keys) -----------------


class Fire(nn.Module):
    def __init__(self, inplanes: int, squeeze: int, e1: int, e3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, e1, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, e3, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1 (torchvision ``squeezenet1_1``)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        pool = lambda: nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=3, stride=2), nn.ReLU(inplace=True), pool(),
            Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), pool(),
            Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), pool(),
            Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256), Fire(512, 64, 256, 256))
        self.classifier = nn.Sequential(nn.Dropout(p=0.5), nn.Conv2d(512, num_classes, kernel_size=1),
                                        nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


_VGG_CFG = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG without batch norm (torchvision ``vgg16`` / ``vgg19``)."""

    def __init__(self, cfg: list[int | str], num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(cin, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(p=0.5),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(p=0.5), nn.Linear(4096, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """ResNet v1.5 with bottleneck blocks (torchvision ``resnet152``, ``resnext101_64x4d``)."""

    def __init__(self, layers: list[int], groups: int = 1, width_per_group: int = 64,
                 num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes, self.groups, self.base_width = 64, groups, width_per_group
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes, groups=self.groups, base_width=self.base_width)
                   for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))



class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kwargs: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)  # type: ignore[arg-type]
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([self.branch1x1(x), b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([self.branch1x1(x), b7, bd, bp], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([self.branch1x1(x), b3, bd, bp], 1)


class Inception3(nn.Module):
    """Inception v3 (torchvision ``inception_v3(aux_logits=False, transform_input=False)``), 3x299x299."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=0.5)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.children():
            if layer is self.fc:
                x = torch.flatten(x, 1)
            x = layer(x)
        return x


# --- construction and initialisation ---------------------------------------------------------------

_MAKERS = {
    "caffenet": caffenet, "nin": nin, "mlp2": mlp2, "mnist_mlp": mnist_mlp, "mnist_cnn": mnist_cnn,
    "digits_cnn": digits_cnn, "squeezenet": SqueezeNet, "vgg16": lambda: VGG(_VGG_CFG["vgg16"]),
    "vgg19": lambda: VGG(_VGG_CFG["vgg19"]), "inception_v3": Inception3,
    "resnet152": lambda: ResNet([3, 8, 36, 3]),
    "resnext101_64x4d": lambda: ResNet([3, 4, 23, 3], groups=64, width_per_group=4),
}
_PARAM_MODULES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
# The initialisers draw from torch's global generator (seeded, then restored by fork_rng): one build at a
# time, so that builds in parallel threads still get exactly their own seed's weights.
_INIT_LOCK = threading.Lock()


def names() -> tuple[str, ...]:
    """Every model this module can build (all registered models but ``null``)."""
    return tuple(_MAKERS)


def make(spec: ModelSpec) -> nn.Module:
    """The architecture of ``spec`` with torch's default initialisation (no seeding, no calibration).
    Under ``with torch.device('meta'):`` this allocates nothing: load a state dict with ``assign=True``."""
    try:
        maker = _MAKERS[spec.name]
    except KeyError:
        raise ValueError(f"no torch network for model '{spec.name}'") from None
    return maker()


def ignored_keys(spec: ModelSpec, keys: Iterable[str]) -> set[str]:
    """Keys of a checkpoint that the model does not use: torchvision's inception auxiliary classifier."""
    if spec.name == "inception_v3":
        return {k for k in keys if k.startswith("AuxLogits.")}
    return set()


def build(spec: ModelSpec, seed: int) -> nn.Module:
    """``spec``'s network on the CPU, fp32, eval mode, with weights that depend only on (name, seed)."""
    with torch.device("meta"):
        net = make(spec)
    net = net.to_empty(device="cpu")
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_for(spec.name, seed))
        _init(spec.name, net)
        _calibrate_batch_norm(spec, net, seed)
    return net.eval()


def _init(name: str, net: nn.Module) -> None:
    """Every parameter and buffer, in module order (so the random stream is fixed by the architecture)."""
    final_conv = net.classifier[1] if isinstance(net, SqueezeNet) else None
    for m in net.modules():
        if not isinstance(m, _PARAM_MODULES):
            if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
                raise AssertionError(f"{name}: no initialisation for {type(m).__name__}")  # a developer error
            continue
        if isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()  # weight 1, bias 0, running mean 0, var 1
            continue
        assert isinstance(m, (nn.Conv2d, nn.Linear))
        if isinstance(net, Inception3):
            nn.init.trunc_normal_(m.weight, mean=0.0, std=0.1, a=-2, b=2)
        elif isinstance(net, SqueezeNet):
            if m is final_conv:
                nn.init.normal_(m.weight, mean=0.0, std=0.01)
            else:
                nn.init.kaiming_uniform_(m.weight)
        elif isinstance(net, VGG) and isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
        elif isinstance(net, (VGG, ResNet)) and isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif name in ("caffenet", "nin"):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            else:
                nn.init.normal_(m.weight, 0, 0.01)
        else:
            m.reset_parameters()  # torch's default (ResNet's fc, the small networks)
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)


@torch.no_grad()
def _calibrate_batch_norm(spec: ModelSpec, net: nn.Module, seed: int) -> None:
    """Set batch-norm running statistics from one seeded N(0, 1) batch (a train-mode pass of the
    batch-norm layers only), so that eval-mode activations stay at unit scale through deep networks."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        return
    gen = torch.Generator().manual_seed(seed_for(spec.name, seed) + 1)
    x = torch.randn((4 if spec.group == "small" else 2, *spec.input_shape), generator=gen)
    blocks = [m for m in net.modules() if isinstance(m, Bottleneck)]
    for block in blocks:  # damp each residual branch, so that 50 blocks do not amplify rounding errors
        nn.init.constant_(block.bn3.weight, 1 / math.sqrt(len(blocks)))
    net.eval()
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
        m.train()
    net(x)
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum
        m.eval()
