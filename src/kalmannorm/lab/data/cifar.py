"""CIFAR-10/100 from the official "python version" archive, extracted.

The archive unpacks to ``cifar-10-batches-py/`` (``data_batch_1`` ... ``data_batch_5``,
``test_batch``) or ``cifar-100-python/`` (``train``, ``test``); each file is a pickled dict with
``data`` (N x 3072 uint8, channel-major) and ``labels`` (CIFAR-10) or ``fine_labels``
(CIFAR-100). torchvision reads the same files but insists on the official MD5 checksums, so we
read them directly and accept any consistent copy (the tests write small ones).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import Tensor

from kalmannorm.lab.data.idx import DataCorruptError

#: name -> (folder inside the archive, training files, test files, label key)
CIFAR_LAYOUT = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}


def find_cifar_folder(root: Path, name: str) -> Path | None:
    """``root`` itself or ``root/<archive folder>`` if it holds the files of ``name``."""
    folder, train_files, test_files, _ = CIFAR_LAYOUT[name]
    for candidate in (root, root / folder):
        if all((candidate / f).is_file() for f in train_files + test_files):
            return candidate
    return None


def _read_batches(folder: Path, files: list[str], label_key: str) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    for file in files:
        path = folder / file
        try:
            with open(path, "rb") as handle:
                entry = pickle.load(handle, encoding="latin1")  # the official format is a pickle
            x = torch.as_tensor(entry["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32)
            y = torch.as_tensor(list(entry[label_key]), dtype=torch.long)
        except Exception as error:  # any unreadable pickle: truncated, garbage, another format
            raise DataCorruptError(
                f"{path} is not a CIFAR python-format batch ({type(error).__name__}: "
                f"{_first_line(error)}); extract a fresh copy of the archive into --data-dir"
            ) from None
        if len(x) != len(y):
            raise DataCorruptError(
                f"{path} holds {len(x)} images but {len(y)} labels; extract a fresh copy"
            )
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def load_cifar_folder(folder: Path, name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(train_x, train_y, test_x, test_y)`` as (N, 3, 32, 32) uint8 images and long labels."""
    _, train_files, test_files, label_key = CIFAR_LAYOUT[name]
    return (
        *_read_batches(folder, train_files, label_key),
        *_read_batches(folder, test_files, label_key),
    )
