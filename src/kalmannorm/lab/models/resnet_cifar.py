"""Pre-activation ResNets for small images (CIFAR-10/100 at 32x32, MNIST-like at 28x28).

He et al., "Identity Mappings in Deep Residual Networks" (ECCV 2016): every residual unit is
BN-ReLU-conv3x3-BN-ReLU-conv3x3 added to an identity shortcut; where a unit changes the width or
the resolution the shortcut is a 1x1 convolution (stride 2) applied to the unit's pre-activated
input. A network of depth 6n + 2 is a 3x3 stem convolution, three stages of n units with widths
``width``, ``2 width`` and ``4 width`` (the second and third stages halve the resolution), a final
BN-ReLU, global average pooling and a linear classifier.

The models are built with plain :class:`torch.nn.BatchNorm2d`; convert them afterwards, e.g.
``kalmannorm.convert_norm(preact_resnet20(), "bkn", stat_batch_size=2)``. The normalization
layers are registered in the order they run, so registration-order chain linking is exact.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as torch_f

__all__ = [
    "PreActBlock",
    "PreActResNet",
    "preact_resnet20",
    "preact_resnet32",
    "preact_resnet56",
    "preact_resnet110",
]


class PreActBlock(nn.Module):
    """Pre-activation basic residual unit: x + conv(relu(bn(conv(relu(bn(x)))))).

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of the first convolution (and of the projection shortcut).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        # Registration order == execution order (bn1, bn2), so chains link correctly.
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = torch_f.relu(self.bn1(x))
        # The projection takes the pre-activated input (He et al. 2016, Fig. 4e / their code).
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(torch_f.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet of depth 6n + 2 for small (e.g. 32x32 or 28x28) images.

    Args:
        depth: total number of weighted layers, 6n + 2 (20, 32, 44, 56, 110, ...).
        num_classes: outputs of the classifier.
        in_channels: input channels (3 for CIFAR, 1 for MNIST-like data).
        width: channels of the first stage (16 in He et al.); stages use 1x, 2x and 4x.

    Any input resolution works (global average pooling); the design targets 28-32 px.
    """

    def __init__(
        self, depth: int, num_classes: int = 10, in_channels: int = 3, width: int = 16
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(
                f"depth must be 6n + 2 with n >= 1 (e.g. 20, 32, 56, 110), got {depth}"
            )
        if num_classes < 1 or in_channels < 1 or width < 1:
            raise ValueError(
                f"num_classes, in_channels and width must be positive, got {num_classes}, "
                f"{in_channels}, {width}"
            )
        units = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        in_planes = width
        stages = []
        for index, planes in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for unit in range(units):
                stride = 2 if index > 0 and unit == 0 else 1
                blocks.append(PreActBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch_f.relu(self.bn(out))
        return self.fc(self.pool(out).flatten(1))


def preact_resnet20(num_classes: int = 10, in_channels: int = 3) -> PreActResNet:
    """Pre-activation ResNet-20 (n = 3, about 0.27M parameters for 10 classes)."""
    return PreActResNet(20, num_classes, in_channels)


def preact_resnet32(num_classes: int = 10, in_channels: int = 3) -> PreActResNet:
    """Pre-activation ResNet-32 (n = 5, about 0.46M parameters)."""
    return PreActResNet(32, num_classes, in_channels)


def preact_resnet56(num_classes: int = 10, in_channels: int = 3) -> PreActResNet:
    """Pre-activation ResNet-56 (n = 9, about 0.85M parameters)."""
    return PreActResNet(56, num_classes, in_channels)


def preact_resnet110(num_classes: int = 10, in_channels: int = 3) -> PreActResNet:
    """Pre-activation ResNet-110 (n = 18, about 1.7M parameters)."""
    return PreActResNet(110, num_classes, in_channels)
