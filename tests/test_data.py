"""Data sets: idx and CIFAR python-format files written here, digits, synthetic, augmentation,
and the messages for unknown names and missing files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kalmannorm.lab.data import (
    Augmentation,
    DataNotFoundError,
    available_datasets,
    load_dataset,
    read_idx,
    write_idx,
)
from kalmannorm.lab.data.augment import random_crop

IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _write_mnist_like(folder: Path, n_train: int = 12, n_test: int = 6, gz: bool = True) -> tuple:
    g = torch.Generator().manual_seed(1)
    tensors = (
        torch.randint(0, 256, (n_train, 28, 28), generator=g, dtype=torch.uint8),
        torch.arange(n_train, dtype=torch.uint8) % 10,
        torch.randint(0, 256, (n_test, 28, 28), generator=g, dtype=torch.uint8),
        torch.arange(n_test, dtype=torch.uint8) % 10,
    )
    folder.mkdir(parents=True, exist_ok=True)
    for name, tensor in zip(IDX_NAMES, tensors):
        write_idx(folder / (name + (".gz" if gz else "")), tensor)
    return tensors


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    x = torch.randint(0, 256, (3, 5, 4), dtype=torch.uint8)
    path = tmp_path / ("x.idx.gz" if gz else "x.idx")
    write_idx(path, x)
    assert torch.equal(read_idx(path), x)


def test_idx_rejects_other_files(tmp_path: Path) -> None:
    path = tmp_path / "junk"
    path.write_bytes(b"\x12\x34\x56\x78rest")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(path)


def test_mnist_from_gz_idx_files_in_data_dir(tmp_path: Path) -> None:
    train_x, _, _, test_y = _write_mnist_like(tmp_path)
    data = load_dataset("mnist", tmp_path)
    assert data.train_x.shape == (12, 1, 28, 28) and data.test_size == 6
    assert torch.equal(data.train_x[:, 0], train_x) and torch.equal(data.test_y, test_y.long())
    assert data.augmentation == Augmentation(pad=2, flip=False)  # digits are not mirror images


def test_fashion_mnist_in_torchvision_layout(tmp_path: Path) -> None:
    _write_mnist_like(tmp_path / "FashionMNIST" / "raw", gz=False)
    data = load_dataset("fashion_mnist", tmp_path)
    assert data.num_classes == 10 and data.in_channels == 1
    assert data.augmentation.flip


def test_missing_data_says_where_it_looked_and_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("fashion_mnist", tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message
    assert "apt-get install dataset-fashion-mnist" in message and "--download" in message
    with pytest.raises(DataNotFoundError, match="cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path)


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'imagenet42'") as info:
        load_dataset("imagenet42")
    for name in available_datasets():
        assert name in str(info.value)


def test_cifar10_from_python_format_batches(tmp_path: Path, write_cifar) -> None:
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    write_cifar(tmp_path / "cifar-10-batches-py", files, "labels", per_file=4)
    data = load_dataset("cifar10", tmp_path)
    assert data.train_x.shape == (20, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (4, 3, 32, 32) and data.num_classes == 10
    assert data.train_x[:, 0, 0, 0].tolist() == [i for i in range(5) for _ in range(4)]
    assert (data.train_x[:, 1, 0, 0] == 200).all()  # channel-major rows: R, G, B planes
    assert data.train_y[:4].tolist() == [0, 1, 2, 3]
    assert data.augmentation == Augmentation(pad=4, flip=True)
    # the extracted folder itself is accepted too
    assert load_dataset("cifar10", tmp_path / "cifar-10-batches-py").train_size == 20


def test_cifar100_uses_fine_labels(tmp_path: Path, write_cifar) -> None:
    write_cifar(tmp_path / "cifar-100-python", ["train", "test"], "fine_labels", per_file=5)
    data = load_dataset("cifar100", tmp_path)
    assert data.num_classes == 100 and data.train_size == 5 and data.test_size == 5


def test_digits_and_synthetic() -> None:
    digits = load_dataset("digits")
    assert digits.train_x.shape[1:] == (1, 8, 8) and digits.train_size + digits.test_size == 1797
    synthetic = load_dataset("synthetic")
    assert synthetic.train_x.shape[1:] == (3, 16, 16) and synthetic.num_classes == 10
    x, _ = synthetic.train_batch(torch.arange(64), seed=0)
    assert x.shape == (64, 3, 16, 16) and abs(float(x.mean())) < 0.5  # normalised


def test_subset_is_fixed_and_independent_of_the_run() -> None:
    data = load_dataset("digits")
    a, b = data.subset(100, 50), data.subset(100, 50)
    assert a.train_size == 100 and a.test_size == 50
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.mean, data.mean)


def test_random_crop_matches_a_direct_crop() -> None:
    x = torch.randn(3, 2, 5, 6)
    offsets = torch.tensor([[0, 0], [2, 1], [4, 4]])
    out = random_crop(x, offsets, pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i, (r, c) in enumerate(offsets.tolist()):
        assert torch.equal(out[i], padded[i, :, r : r + 5, c : c + 6])
    assert torch.equal(random_crop(x, torch.full((3, 2), 2), pad=2), x)  # centre crop


def test_augmentation_of_a_slice_equals_the_slice_of_the_batch() -> None:
    """Processes and accumulation passes see exactly their part of the whole batch's draws."""
    data = load_dataset("digits")
    data.augmentation = Augmentation(pad=1, flip=True)
    indices = torch.arange(16)
    whole, _ = data.train_batch(indices, seed=5)
    part, _ = data.train_batch(indices, seed=5, part=slice(8, 16))
    assert torch.equal(whole[8:], part)
    other, _ = data.train_batch(indices, seed=6)
    assert not torch.equal(whole, other)
    plain, _ = data.train_batch(indices, seed=5, augment=False)
    assert not torch.equal(whole, plain)


def test_image_folders_stream_deterministic_batches(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    from PIL import Image

    for split in ("train", "val"):
        for label, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40 + 4 * i, 36), colour).save(folder / f"{i}.png")
    data = load_dataset("imagefolder", tmp_path, num_workers=0)
    assert (data.num_classes, data.train_size, data.test_size) == (2, 6, 6)
    batches = [(torch.tensor([5, 0, 3, 1]), 7)]
    ((x, y),) = data.train_batches(batches, slice(None))
    ((again, _),) = data.train_batches(batches, slice(None))
    ((half, _),) = data.train_batches(batches, slice(2, 4))
    assert x.shape == (4, 3, 224, 224) and y.tolist() == [1, 0, 1, 0]
    assert torch.equal(x, again) and torch.equal(x[2:], half)  # seeded per sample
    test_x, test_y = next(iter(data.test_batches(6)))
    assert test_x.shape == (6, 3, 224, 224) and test_y.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(DataNotFoundError, match="train"):
        load_dataset("imagefolder", tmp_path / "val")
