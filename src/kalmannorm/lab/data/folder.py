"""ImageNet-style folders (``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``) through
torchvision's ImageFolder, streamed by a DataLoader with worker processes.

Augmentation (random resized crop and flip) draws from torch's generator seeded per sample by
(batch seed, position in the global batch), so the images a step sees depend neither on the
number of workers or processes nor on where a run was resumed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

Batch = tuple[Tensor, Tensor]
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, the usual choice


class _Seeded(Dataset):
    """``dataset[(index, seed)]``: the sample with torch's RNG seeded for its transform."""

    def __init__(self, folder) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.folder[index]


class FolderImageData:
    """Train and validation ImageFolders with the standard ImageNet transforms.

    Args:
        root: folder holding ``train/`` and ``val/`` (or ``test/``), one sub-folder per class.
        image_size: training crop and evaluation centre crop (evaluation resizes to 8/7 of it).
        num_workers: DataLoader worker processes.
    """

    def __init__(self, root: Path, image_size: int = 224, num_workers: int = 4) -> None:
        from torchvision import datasets, transforms  # optional dependency, checked by caller

        test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), root / "val")
        normalize = transforms.Normalize(_MEAN, _STD)
        self.train_folder = datasets.ImageFolder(
            root / "train",
            transforms.Compose(
                [
                    transforms.RandomResizedCrop(image_size),
                    transforms.RandomHorizontalFlip(),
                    transforms.ToTensor(),
                    normalize,
                ]
            ),
        )
        self.plain_folder = datasets.ImageFolder(
            root / "train",
            transforms.Compose(
                [
                    transforms.Resize(image_size * 8 // 7),
                    transforms.CenterCrop(image_size),
                    transforms.ToTensor(),
                    normalize,
                ]
            ),
        )
        self.test_folder = datasets.ImageFolder(test_dir, self.plain_folder.transform)
        self.name = str(root)
        self.num_classes = len(self.train_folder.classes)
        self.in_channels = 3
        self.image_size = (image_size, image_size)
        self.num_workers = num_workers

    @property
    def train_size(self) -> int:
        return len(self.train_folder)

    @property
    def test_size(self) -> int:
        return len(self.test_folder)

    def train_batches(
        self, batches: Iterable[tuple[Tensor, int]], part: slice | Tensor, augment: bool = True
    ) -> Iterator[Batch]:
        """For each ``(indices, seed)`` of a global batch, the part ``part`` of it (a slice or a
        tensor of positions), loaded by worker processes; per-sample seeds are
        ``seed * 1_000_003 + position``."""

        def take(keys: list) -> list:
            return keys[part] if isinstance(part, slice) else [keys[p] for p in part.tolist()]

        keys = [
            take([(int(i), seed * 1_000_003 + pos) for pos, i in enumerate(indices.tolist())])
            for indices, seed in batches
        ]
        folder = self.train_folder if augment else self.plain_folder
        yield from DataLoader(_Seeded(folder), batch_sampler=keys, num_workers=self.num_workers)

    def test_batches(self, batch_size: int) -> Iterator[Batch]:
        yield from DataLoader(self.test_folder, batch_size=batch_size, num_workers=self.num_workers)
