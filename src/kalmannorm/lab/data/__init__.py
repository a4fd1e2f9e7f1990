"""Data sets as in-memory tensors (or streamed folders), by name: see :func:`load_dataset`."""

from kalmannorm.lab.data.augment import Augmentation
from kalmannorm.lab.data.datasets import (
    DATASETS,
    FASHION_MNIST_DEBIAN_DIR,
    DataNotFoundError,
    available_datasets,
    dataset_available,
    load_dataset,
)
from kalmannorm.lab.data.digits import load_digits_split
from kalmannorm.lab.data.idx import DataCorruptError, read_idx, write_idx
from kalmannorm.lab.data.synthetic import make_synthetic
from kalmannorm.lab.data.tensor_data import TensorImageData

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DEBIAN_DIR",
    "Augmentation",
    "DataCorruptError",
    "DataNotFoundError",
    "TensorImageData",
    "available_datasets",
    "dataset_available",
    "load_dataset",
    "load_digits_split",
    "make_synthetic",
    "read_idx",
    "write_idx",
]
