"""The paper's CIFAR network (Wang et al. 2018, Section 4.4 table).

| type         | conv  | inception | inception | inception | avg pool |
|--------------|-------|-----------|-----------|-----------|----------|
| spatial size | 16x16 | 16x16     | 16x16     | 16x16     | 1x1      |
| filters      | 32    | 256       | 480       | 512       | 512      |
| 1x1          |       | 64        | 128       | 192       |          |
| 1x1 / 3x3    |       | 96, 128   | 128, 192  | 96, 208   |          |
| 1x1 / 5x5    |       | 16, 32    | 32, 96    | 16, 48    |          |
| pool / 1x1   |       | 32        | 64        | 64        |          |

"where a fully connected layer with 1,000 output channels is omitted". Where the table is
silent we choose: the stem is a 3x3 convolution with stride 2 (32x32 -> 16x16, the listed
spatial size); every convolution is followed by BN and ReLU (BN "after convolution and before
the ReLU", as in the paper's other networks); the pool branch is a 3x3 max pool with stride 1
(GoogLeNet); after global average pooling come the omitted fully connected layer (512 -> 1000,
ReLU) and the classifier (1000 -> classes). Branches run, and are registered, in table order, so
registration order is execution order for the Kalman chain.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ConvBN", "InceptionModule", "InceptionCifar", "inception_cifar"]


class ConvBN(nn.Sequential):
    """Convolution (no bias), BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class InceptionModule(nn.Module):
    """GoogLeNet module: 1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 | 3x3 max pool -> 1x1, concatenated.

    Args:
        in_channels: input channels.
        c1: 1x1 branch width.
        c3: (reduce, 3x3) widths.
        c5: (reduce, 5x5) widths.
        pool: width of the 1x1 after the pool.
    """

    def __init__(
        self, in_channels: int, c1: int, c3: tuple[int, int], c5: tuple[int, int], pool: int
    ) -> None:
        super().__init__()
        self.branch1 = ConvBN(in_channels, c1, 1)
        self.branch3 = nn.Sequential(ConvBN(in_channels, c3[0], 1), ConvBN(c3[0], c3[1], 3))
        self.branch5 = nn.Sequential(ConvBN(in_channels, c5[0], 1), ConvBN(c5[0], c5[1], 5))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), ConvBN(in_channels, pool, 1))
        self.out_channels = c1 + c3[1] + c5[1] + pool

    def forward(self, x: Tensor) -> Tensor:
        branches = (self.branch1, self.branch3, self.branch5, self.branch_pool)
        return torch.cat([branch(x) for branch in branches], dim=1)


class InceptionCifar(nn.Module):
    """Stem conv (32 filters, 16x16), three Inception modules (256, 480, 512), average pool,
    the 1000-unit fully connected layer and the classifier.

    Args:
        num_classes: classifier outputs.
        in_channels: input channels (3 for CIFAR).
        hidden: width of the fully connected layer the paper's table omits (0: none).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, hidden: int = 1000) -> None:
        super().__init__()
        self.stem = ConvBN(in_channels, 32, 3, stride=2)
        self.inception1 = InceptionModule(32, 64, (96, 128), (16, 32), 32)
        self.inception2 = InceptionModule(256, 128, (128, 192), (32, 96), 64)
        self.inception3 = InceptionModule(480, 192, (96, 208), (16, 48), 64)
        self.pool = nn.AdaptiveAvgPool2d(1)
        head: list[nn.Module] = [nn.Flatten()]
        if hidden:
            head += [nn.Linear(512, hidden), nn.ReLU(inplace=True)]
        head.append(nn.Linear(hidden or 512, num_classes))
        self.head = nn.Sequential(*head)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.inception3(self.inception2(self.inception1(self.stem(x))))
        return self.head(self.pool(x))


def inception_cifar(num_classes: int = 10, in_channels: int = 3, **options) -> InceptionCifar:
    """The paper's CIFAR-10/100 Inception network (Section 4.4)."""
    return InceptionCifar(num_classes, in_channels, **options)
