"""A synthetic image classification set: smooth class templates plus noise (no files needed)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as torch_f


def make_synthetic(
    num_classes: int = 10,
    train_size: int = 2048,
    test_size: int = 512,
    channels: int = 3,
    size: int = 16,
    noise: float = 0.35,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(train_x, train_y, test_x, test_y)``, images in [0, 1] of shape (N, channels, size, size).

    Each class is a random low-frequency template (4x4 noise upsampled); an image is its class's
    template, randomly shifted in brightness, plus pixel noise. Learnable in a few hundred steps
    by a small CNN, not trivially: the noise makes single pixels unreliable.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=g)
    templates = torch_f.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        labels = torch.randint(num_classes, (n,), generator=g)
        shift = 0.2 * torch.randn(n, 1, 1, 1, generator=g)
        images = (
            templates[labels] + shift + noise * torch.randn(n, channels, size, size, generator=g)
        )
        return images.clamp(0, 1), labels

    return (*sample(train_size), *sample(test_size))
