"""Iterating a data set in forward-pass batches whose size is a multiple of the group size.

The analysis functions accept their data in any of these forms (``DataSource``):

- a tensor of inputs ``X`` (N, ...), cut into batches of ``batch_size``;
- a tuple of tensors ``(X, Y, ...)`` with the same first dimension, cut the same way;
- a callable ``batches(batch_size)`` returning an iterable of batches, e.g. the harness's
  ``data.test_batches``;
- a map-style :class:`torch.utils.data.Dataset`, read in order by a ``DataLoader``;
- any other iterable of batches (a ``DataLoader``, a list, a generator), used as it is.

A batch is a tensor of inputs or a tuple/list ``(inputs, labels, ...)``. Statistics groups need
whole groups: every batch is cut to a multiple of ``multiple_of`` samples (the remainder of a
batch is skipped, and so counted nowhere), and reading stops after ``max_samples`` samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

#: What the analysis functions accept as data (see the module docstring).
DataSource: TypeAlias = Tensor | tuple[Tensor, ...] | Callable[[int], Iterable[Any]] | Iterable[Any]


def _raw_batches(data: DataSource, batch_size: int) -> Iterable[Any]:
    if isinstance(data, Tensor):
        return (data[i : i + batch_size] for i in range(0, len(data), batch_size))
    if isinstance(data, tuple) and data and all(isinstance(t, Tensor) for t in data):
        n = len(data[0])
        if any(len(t) != n for t in data):
            raise ValueError(
                f"the tensors of a data tuple must have the same first dimension, got "
                f"{[len(t) for t in data]}"
            )
        return (tuple(t[i : i + batch_size] for t in data) for i in range(0, n, batch_size))
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(
        data, torch.utils.data.IterableDataset
    ):
        return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    if callable(data) and not isinstance(data, nn.Module):
        return data(batch_size)
    if isinstance(data, Iterable):
        return data
    raise TypeError(
        f"cannot read batches from {type(data).__name__}: pass a tensor, a tuple of tensors "
        f"(inputs, labels), a callable batch_size -> batches, a Dataset or an iterable of batches"
    )


def iterate_batches(
    data: DataSource,
    batch_size: int,
    *,
    multiple_of: int = 1,
    max_samples: int | None = None,
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield ``(inputs, labels or None)`` with a length that is a multiple of ``multiple_of``.

    Where this function cuts the batches itself (tensor data), ``batch_size`` is rounded down to
    a multiple of ``multiple_of`` (at least one group), so no sample is skipped but the last
    remainder. Batches of other sources are cut to the largest multiple; shorter ones skipped.
    """
    if batch_size < 1 or multiple_of < 1:
        raise ValueError(
            f"batch_size and multiple_of must be positive, got {batch_size}, {multiple_of}"
        )
    size = max(multiple_of, batch_size - batch_size % multiple_of)
    seen = 0
    for batch in _raw_batches(data, size):
        if isinstance(batch, Tensor):
            inputs, labels = batch, None
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
            inputs = batch[0]
            labels = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        else:
            raise TypeError(
                f"a batch must be a tensor or a tuple (inputs, labels, ...), got "
                f"{type(batch).__name__}"
            )
        keep = len(inputs) - len(inputs) % multiple_of
        if max_samples is not None:
            keep = min(keep, (max_samples - seen) - (max_samples - seen) % multiple_of)
        if keep <= 0:
            if max_samples is not None and max_samples - seen < multiple_of:
                return
            continue
        seen += keep
        yield inputs[:keep], None if labels is None else labels[:keep]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for an empty model)."""
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device
