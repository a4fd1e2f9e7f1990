"""BN-Inception (Inception-v2; Ioffe & Szegedy, ICML 2015, Figure 5): the paper's ImageNet net.

Not in torchvision. Layout (224x224 input; widths as in the reference Caffe model, which also
fixes the paper's table where 4c/4d list 576 but their branches add up to 608):

| stage   | #1x1 | #3x3 reduce, #3x3 | double #3x3 reduce, #3x3 | pool + proj      | out  |
|---------|------|-------------------|--------------------------|------------------|------|
| stem    | conv 7x7/2, 64; max pool 3x3/2; conv 1x1 64; conv 3x3 192; max pool 3x3/2   | 192  |
| 3a      | 64   | 64, 64            | 64, 96                   | avg + 32         | 256  |
| 3b      | 64   | 64, 96            | 64, 96                   | avg + 64         | 320  |
| 3c (/2) | -    | 128, 160          | 64, 96                   | max, pass        | 576  |
| 4a      | 224  | 64, 96            | 96, 128                  | avg + 128        | 576  |
| 4b      | 192  | 96, 128           | 96, 128                  | avg + 128        | 576  |
| 4c      | 160  | 128, 160          | 128, 160                 | avg + 128        | 608  |
| 4d      | 96   | 128, 192          | 160, 192                 | avg + 128        | 608  |
| 4e (/2) | -    | 128, 192          | 192, 256                 | max, pass        | 1056 |
| 5a      | 352  | 192, 320          | 160, 224                 | avg + 128        | 1024 |
| 5b      | 352  | 192, 320          | 192, 224                 | max + 128        | 1024 |

then global average pooling, dropout and the classifier. Every convolution is followed by BN and
ReLU; branches are registered and run in table order (registration order = execution order).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kalmannorm.lab.models.inception_cifar import ConvBN

__all__ = ["BNInception", "InceptionV2Module", "bn_inception"]


class InceptionV2Module(nn.Module):
    """1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3 | pool (-> 1x1), concatenated.

    Args:
        in_channels: input channels.
        c1: 1x1 branch width, 0 for none (the stride-2 modules).
        c3: (reduce, 3x3).
        d3: (reduce, double 3x3).
        pool: "avg" or "max".
        proj: 1x1 width after the pool, 0 to pass the pooled input through.
        stride: 2 in the grid-reducing modules (3c, 4e).
    """

    def __init__(
        self,
        in_channels: int,
        c1: int,
        c3: tuple[int, int],
        d3: tuple[int, int],
        pool: str,
        proj: int,
        stride: int = 1,
    ) -> None:
        super().__init__()
        self.branch1 = ConvBN(in_channels, c1, 1) if c1 else None
        self.branch3 = nn.Sequential(ConvBN(in_channels, c3[0], 1), ConvBN(c3[0], c3[1], 3, stride))
        self.branch_double = nn.Sequential(
            ConvBN(in_channels, d3[0], 1), ConvBN(d3[0], d3[1], 3), ConvBN(d3[1], d3[1], 3, stride)
        )
        pooling = nn.AvgPool2d(3, stride, 1) if pool == "avg" else nn.MaxPool2d(3, stride, 1)
        self.branch_pool = nn.Sequential(pooling, ConvBN(in_channels, proj, 1)) if proj else pooling
        self.out_channels = c1 + c3[1] + d3[1] + (proj or in_channels)

    def forward(self, x: Tensor) -> Tensor:
        branches = [self.branch1, self.branch3, self.branch_double, self.branch_pool]
        return torch.cat([b(x) for b in branches if b is not None], dim=1)


class BNInception(nn.Module):
    """BN-Inception for ImageNet-size inputs (any size >= 64 works: global average pooling).

    Args:
        num_classes: classifier outputs (1000 for ImageNet).
        in_channels: input channels.
        dropout: dropout before the classifier.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.2):
        super().__init__()
        self.stem = nn.Sequential(
            ConvBN(in_channels, 64, 7, stride=2),
            nn.MaxPool2d(3, 2, 1),
            ConvBN(64, 64, 1),
            ConvBN(64, 192, 3),
            nn.MaxPool2d(3, 2, 1),
        )
        specs = [  # c1, c3, d3, pool, proj, stride
            (64, (64, 64), (64, 96), "avg", 32, 1),  # 3a
            (64, (64, 96), (64, 96), "avg", 64, 1),  # 3b
            (0, (128, 160), (64, 96), "max", 0, 2),  # 3c
            (224, (64, 96), (96, 128), "avg", 128, 1),  # 4a
            (192, (96, 128), (96, 128), "avg", 128, 1),  # 4b
            (160, (128, 160), (128, 160), "avg", 128, 1),  # 4c
            (96, (128, 192), (160, 192), "avg", 128, 1),  # 4d
            (0, (128, 192), (192, 256), "max", 0, 2),  # 4e
            (352, (192, 320), (160, 224), "avg", 128, 1),  # 5a
            (352, (192, 320), (192, 224), "max", 128, 1),  # 5b
        ]
        modules, channels = [], 192
        for c1, c3, d3, pool, proj, stride in specs:
            modules.append(InceptionV2Module(channels, c1, c3, d3, pool, proj, stride))
            channels = modules[-1].out_channels
        self.inception = nn.Sequential(*modules)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.inception(self.stem(x))).flatten(1)
        return self.fc(self.dropout(x))


def bn_inception(num_classes: int = 1000, in_channels: int = 3, **options) -> BNInception:
    """BN-Inception / Inception-v2, the paper's ImageNet network."""
    return BNInception(num_classes, in_channels, **options)
