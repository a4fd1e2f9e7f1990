"""scikit-learn's handwritten digits (1,797 real 8x8 images, shipped with scikit-learn)."""

from __future__ import annotations

import torch
from torch import Tensor


def load_digits_split(
    test_fraction: float = 0.2, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits as (N, 1, 8, 8) float tensors scaled to [0, 1], split into train and test.

    Returns ``(train_x, train_y, test_x, test_y)``; the split is a fixed permutation of ``seed``.
    Needs scikit-learn (``pip install kalmannorm[data]``).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data set ships with scikit-learn: pip install scikit-learn"
        ) from error
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(len(labels) * (1 - test_fraction))
    train, test = order[:cut], order[cut:]
    return images[train], labels[train], images[test], labels[test]
