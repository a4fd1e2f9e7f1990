"""Datasets as tensors or loaders."""

from kalmannorm.data.digits import load_digits_split

__all__ = ["load_digits_split"]
