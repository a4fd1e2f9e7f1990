"""Data sets by name: where each is looked for, how it is read, and how it is augmented.

``load_dataset(name, data_dir, download)`` returns an object the training loop reads
(:class:`TensorImageData` for everything that fits in memory, :class:`FolderImageData` for
ImageNet-style folders). Files are looked for in ``data_dir`` (and the usual sub-folders of
it), then in a default location, then fetched with torchvision's downloader if ``download`` is
set; when all fail the error says where it looked and how to get the data.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kalmannorm.lab.data.augment import Augmentation
from kalmannorm.lab.data.cifar import CIFAR_LAYOUT, find_cifar_folder, load_cifar_folder
from kalmannorm.lab.data.digits import load_digits_split
from kalmannorm.lab.data.idx import read_idx
from kalmannorm.lab.data.synthetic import make_synthetic
from kalmannorm.lab.data.tensor_data import TensorImageData
from kalmannorm.lab.errors import UserError

#: Where Debian's ``dataset-fashion-mnist`` package puts the original ``.gz`` idx files.
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class DataNotFoundError(UserError, FileNotFoundError):
    """The files of a data set are in none of the places looked at."""


def cache_dir() -> Path:
    """Where downloads go: ``$KALMANNORM_DATA`` or ``$XDG_CACHE_HOME/kalmannorm/data``."""
    if "KALMANNORM_DATA" in os.environ:
        return Path(os.environ["KALMANNORM_DATA"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "kalmannorm" / "data"


@dataclass(frozen=True)
class DatasetInfo:
    description: str
    load: Callable[..., object]
    how_to_get: str = ""


# -- MNIST-like idx files ---------------------------------------------------------------------


def _find_idx_folder(candidates: list[Path]) -> Path | None:
    for folder in candidates:
        if all((folder / f).is_file() or (folder / f"{f}.gz").is_file() for f in _IDX_FILES):
            return folder
    return None


def _read_idx_folder(folder: Path) -> list:
    def read(name: str):
        plain = folder / name
        return read_idx(plain if plain.is_file() else folder / f"{name}.gz")

    return [read(f) for f in _IDX_FILES]


def _load_mnist_like(
    name: str, torchvision_class: str, default_dirs: list[Path], how_to_get: str, flip: bool
) -> Callable[..., TensorImageData]:
    def load(data_dir: Path | None, download: bool, **_: object) -> TensorImageData:
        roots = [data_dir] if data_dir is not None else [*default_dirs, cache_dir()]
        candidates = [c for r in roots for c in (r, r / torchvision_class / "raw", r / name)]
        folder = _find_idx_folder(candidates)
        if folder is None and download:
            _torchvision_download(torchvision_class, cache_dir())
            folder = _find_idx_folder([cache_dir() / torchvision_class / "raw"])
        if folder is None:
            raise _not_found(name, candidates, how_to_get, download)
        train_x, train_y, test_x, test_y = _read_idx_folder(folder)
        return TensorImageData(
            name,
            train_x.unsqueeze(1),
            train_y.long(),
            test_x.unsqueeze(1),
            test_y.long(),
            10,
            Augmentation(pad=2, flip=flip),
        )

    return load


# -- CIFAR ------------------------------------------------------------------------------------


def _load_cifar(name: str, torchvision_class: str) -> Callable[..., TensorImageData]:
    def load(data_dir: Path | None, download: bool, **_: object) -> TensorImageData:
        roots = [data_dir] if data_dir is not None else [cache_dir()]
        folder = next((f for r in roots if (f := find_cifar_folder(r, name))), None)
        if folder is None and download:
            _torchvision_download(torchvision_class, cache_dir())
            folder = find_cifar_folder(cache_dir(), name)
        if folder is None:
            looked = [p for r in roots for p in (r, r / CIFAR_LAYOUT[name][0])]
            how = (
                f"download the CIFAR python version archive and extract it (the folder "
                f"{CIFAR_LAYOUT[name][0]}/) into --data-dir"
            )
            raise _not_found(name, looked, how, download)
        train_x, train_y, test_x, test_y = load_cifar_folder(folder, name)
        classes = 10 if name == "cifar10" else 100
        return TensorImageData(
            name, train_x, train_y, test_x, test_y, classes, Augmentation(pad=4, flip=True)
        )

    return load


# -- the rest ---------------------------------------------------------------------------------


def _load_digits(data_dir: Path | None, download: bool, **_: object) -> TensorImageData:
    train_x, train_y, test_x, test_y = load_digits_split(seed=0)
    return TensorImageData("digits", train_x, train_y, test_x, test_y, 10)


def _load_synthetic(data_dir: Path | None, download: bool, **_: object) -> TensorImageData:
    train_x, train_y, test_x, test_y = make_synthetic()
    return TensorImageData("synthetic", train_x, train_y, test_x, test_y, 10)


def _load_folder(data_dir: Path | None, download: bool, num_workers: int = 4, **_: object):
    if data_dir is None or not (data_dir / "train").is_dir():
        looked = "--data-dir was not given" if data_dir is None else f"{data_dir / 'train'}"
        raise DataNotFoundError(
            f"imagefolder needs --data-dir DIR with DIR/train/<class>/<images> and DIR/val/...; "
            f"looked at: {looked}"
        )
    _require_torchvision("imagefolder")
    from kalmannorm.lab.data.folder import FolderImageData

    return FolderImageData(data_dir, num_workers=num_workers)


DATASETS: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo(
        "Fashion-MNIST, 60k/10k 28x28 greyscale (idx files; pad-crop 2 + flip)",
        _load_mnist_like(
            "fashion_mnist",
            "FashionMNIST",
            [FASHION_MNIST_DEBIAN_DIR],
            "on Debian/Ubuntu: apt-get install dataset-fashion-mnist; or put the four idx files "
            "(train-images-idx3-ubyte[.gz], ...) into --data-dir",
            flip=True,
        ),
    ),
    "mnist": DatasetInfo(
        "MNIST, 60k/10k 28x28 greyscale digits (idx files; pad-crop 2)",
        _load_mnist_like(
            "mnist",
            "MNIST",
            [],
            "put the four idx files (train-images-idx3-ubyte[.gz], ...) into --data-dir",
            flip=False,
        ),
    ),
    "cifar10": DatasetInfo(
        "CIFAR-10, 50k/10k 32x32 colour (python-format batches; pad-crop 4 + flip)",
        _load_cifar("cifar10", "CIFAR10"),
    ),
    "cifar100": DatasetInfo(
        "CIFAR-100, 50k/10k 32x32 colour, 100 classes (python-format; pad-crop 4 + flip)",
        _load_cifar("cifar100", "CIFAR100"),
    ),
    "digits": DatasetInfo(
        "scikit-learn's handwritten digits, 1437/360 8x8 greyscale (ships with scikit-learn)",
        _load_digits,
    ),
    "synthetic": DatasetInfo(
        "synthetic 16x16 colour templates + noise, 2048/512 images (no files)", _load_synthetic
    ),
    "imagefolder": DatasetInfo(
        "ImageNet-style folders --data-dir/{train,val}/<class>/ via torchvision's ImageFolder",
        _load_folder,
    ),
}


def available_datasets() -> dict[str, str]:
    """Data set names and one-line descriptions."""
    return {name: info.description for name, info in DATASETS.items()}


def load_dataset(
    name: str, data_dir: str | Path | None = None, download: bool = False, num_workers: int = 4
):
    """Load the data set ``name`` (see :data:`DATASETS`); ``num_workers`` loading processes
    for image folders.

    Raises:
        ValueError: unknown ``name``; the message lists the valid ones.
        DataNotFoundError: the files are missing; the message says where it looked and how to
            get them.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available datasets: {', '.join(DATASETS)}")
    folder = None if data_dir is None else Path(data_dir)
    return DATASETS[name].load(folder, download, num_workers=num_workers)


def dataset_available(name: str, data_dir: str | Path | None = None) -> bool:
    """Whether ``name`` loads from local files (nothing is downloaded)."""
    try:
        load_dataset(name, data_dir, download=False)
    except (DataNotFoundError, ImportError):
        return False
    return True


def _not_found(name: str, looked: list[Path], how: str, download: bool) -> DataNotFoundError:
    places = "\n  ".join(str(p) for p in dict.fromkeys(looked))
    hint = "" if download else " or pass --download (needs torchvision and a connection)"
    return DataNotFoundError(f"{name} not found; looked in:\n  {places}\nTo get it: {how}{hint}.")


def _require_torchvision(what: str) -> None:
    try:
        import torchvision  # noqa: F401
    except ImportError as error:
        raise ImportError(f"{what} needs torchvision: pip install torchvision") from error


def _torchvision_download(class_name: str, root: Path) -> None:
    """Fetch a data set with torchvision into ``root``; failures are reported, not raised, so
    the caller's "not found" message (with where it looked) is what the user sees."""
    _require_torchvision(f"downloading {class_name}")
    import torchvision

    root.mkdir(parents=True, exist_ok=True)
    try:
        getattr(torchvision.datasets, class_name)(str(root), train=True, download=True)
        getattr(torchvision.datasets, class_name)(str(root), train=False, download=True)
    except Exception as error:  # offline, proxy, checksum: tell the user, then fall through
        print(f"torchvision could not download {class_name}: {error}")
