"""An image classification data set held in memory as tensors: the fast path on CPU.

Images stay in their stored type (uint8 for MNIST-like and CIFAR data, saving memory) and are
converted, augmented and normalised per batch, all in batched tensor operations.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kalmannorm.lab.data.augment import Augmentation
from kalmannorm.lab.data.idx import DataCorruptError

Batch = tuple[Tensor, Tensor]


@dataclass
class TensorImageData:
    """Train and test images (N, C, H, W) with labels, plus per-channel normalisation.

    Args:
        name: data set name, for messages.
        train_x, train_y, test_x, test_y: images (uint8 in [0, 255] or float in [0, 1]) and
            long labels.
        num_classes: number of classes.
        augmentation: training augmentation.
        mean, std: per-channel normalisation (of images scaled to [0, 1]); computed from the
            training images when not given.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    augmentation: Augmentation = field(default_factory=Augmentation)
    mean: Tensor | None = None
    std: Tensor | None = None

    def __post_init__(self) -> None:
        self._check()
        if self.mean is None or self.std is None:
            scaled = self._to_unit(self.train_x)
            self.mean = scaled.mean(dim=(0, 2, 3))
            self.std = scaled.std(dim=(0, 2, 3)).clamp_min(1e-6)

    def _check(self) -> None:
        """Refuse what would fail (or be silently wrong) deep inside training: labels outside
        [0, num_classes), images and labels of different counts, train and test images of
        different shapes."""
        for split, x, y in (
            ("train", self.train_x, self.train_y),
            ("test", self.test_x, self.test_y),
        ):
            if x.dim() != 4 or len(x) != len(y):
                raise DataCorruptError(
                    f"{self.name}: the {split} split holds images of shape {tuple(x.shape)} and "
                    f"{len(y)} labels; expected (N, C, H, W) images and N labels"
                )
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise DataCorruptError(
                    f"{self.name}: {split} labels range over {int(y.min())}..{int(y.max())}, "
                    f"outside the {self.num_classes} classes 0..{self.num_classes - 1}; the files "
                    f"are corrupt or of another data set"
                )
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise DataCorruptError(
                f"{self.name}: train images are {tuple(self.train_x.shape[1:])} but test images "
                f"{tuple(self.test_x.shape[1:])}; the files are of different data sets"
            )

    # -- what the training loop reads ---------------------------------------------------------

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train_x.shape[2:])

    @property
    def train_size(self) -> int:
        return len(self.train_y)

    @property
    def test_size(self) -> int:
        return len(self.test_y)

    def train_batches(
        self, batches: Iterable[tuple[Tensor, int]], part: slice | Tensor, augment: bool = True
    ) -> Iterator[Batch]:
        """For each ``(indices, seed)`` of a global batch, the augmented part ``part`` of it (a
        slice or a tensor of positions)."""
        for indices, seed in batches:
            yield self.train_batch(indices, seed, part, augment)

    def train_batch(
        self, indices: Tensor, seed: int, part: slice | Tensor = slice(None), augment: bool = True
    ) -> Batch:
        """The part ``part`` (a slice or positions) of the global batch ``indices``;
        augmentation drawn from ``seed`` for the whole global batch, so any split of it sees the
        same images."""
        x = self._to_unit(self.train_x[indices[part]])
        if augment and self.augmentation.active:
            draw = self.augmentation.draw(len(indices), torch.Generator().manual_seed(seed))
            x = self.augmentation.apply(x, draw[part])
        return self._normalize(x), self.train_y[indices[part]]

    def test_batches(self, batch_size: int) -> Iterator[Batch]:
        """The test set in order, in batches of ``batch_size`` (the last one may be smaller)."""
        for start in range(0, self.test_size, batch_size):
            x = self.test_x[start : start + batch_size]
            yield self._normalize(self._to_unit(x)), self.test_y[start : start + batch_size]

    def train_batches_in_order(self, batch_size: int) -> Iterator[Batch]:
        """The training set in file order without augmentation, in batches of ``batch_size``
        (the last one may be smaller): what the analyses forward to measure statistics."""
        for start in range(0, self.train_size, batch_size):
            x = self.train_x[start : start + batch_size]
            yield self._normalize(self._to_unit(x)), self.train_y[start : start + batch_size]

    # -- helpers ------------------------------------------------------------------------------

    def subset(self, train: int | None = None, test: int | None = None) -> TensorImageData:
        """The first ``train`` / ``test`` images of a fixed shuffle (the same for every run)."""

        def take(x: Tensor, y: Tensor, n: int | None) -> tuple[Tensor, Tensor]:
            if n is None or n >= len(y):
                return x, y
            keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:n]
            return x[keep], y[keep]

        train_x, train_y = take(self.train_x, self.train_y, train)
        test_x, test_y = take(self.test_x, self.test_y, test)
        return TensorImageData(
            self.name,
            train_x,
            train_y,
            test_x,
            test_y,
            self.num_classes,
            self.augmentation,
            self.mean,
            self.std,
        )

    @staticmethod
    def _to_unit(x: Tensor) -> Tensor:
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    def _normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean[:, None, None]) / self.std[:, None, None]
