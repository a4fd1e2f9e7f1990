"""A small, fast convolutional network for smoke tests and demos.

Four conv3x3-BN-ReLU blocks (widths w, 2w, 2w, 4w; the 2nd and 4th halve the resolution),
global average pooling and a linear classifier. It runs on 8x8 (scikit-learn digits), 28x28
(MNIST-like) and 32x32 (CIFAR) images alike; at 8x8 the last block still sees 2x2 positions.
Built with plain :class:`torch.nn.BatchNorm2d`; convert with :func:`kalmannorm.convert_norm`.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["SmallCNN"]


def _block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU blocks, global average pooling and a linear classifier.

    Args:
        in_channels: input channels (1 for digits/MNIST, 3 for CIFAR).
        num_classes: outputs of the classifier.
        width: channels of the first block; later blocks use 2x, 2x and 4x.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1 or width < 1:
            raise ValueError(
                f"in_channels, num_classes and width must be positive, got {in_channels}, "
                f"{num_classes}, {width}"
            )
        self.features = nn.Sequential(
            _block(in_channels, width, 1),
            _block(width, 2 * width, 2),
            _block(2 * width, 2 * width, 1),
            _block(2 * width, 4 * width, 2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))
