"""Count the ATen operations and the host synchronisations a piece of code performs.

    with count_dispatch() as counts:
        model(x).sum().backward()
    counts.host_syncs, counts.aten_calls, counts.syncs  # (op name -> number)

A *host sync* is an operation whose result the host must wait for: a Python scalar read from a
tensor (``item()``, ``bool(tensor)``, ``float(tensor)``, ``if tensor``: all reach
``aten._local_scalar_dense``), a comparison returning a Python bool (``aten.equal``), an output
whose shape depends on the values (``nonzero``, boolean-mask indexing, ``masked_select``,
``unique``) and a blocking copy between the host and a device, either way (torch
synchronises the stream after it; a non-blocking copy with pinned host memory does not wait). On
a CPU these cost nothing; on a GPU each stalls the stream until the queued kernels have run. The
counts are those of the operations the dispatcher sees below autograd (forward and backward
alike), so they are the same on any device, with one exception: a CPU tensor that meets a
model on a GPU (a constant kept on the CPU and converted in every pass) is copied there only
on the GPU. A CPU step that converts none (no ``_to_copy`` at all: the library's tests check
it) makes none on a GPU either.

Used by the tests (a training step of a converted model performs none) and by the lab's
benchmark; not part of the public API.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kalmannorm._torch_private import OBSERVING_MODE, TorchDispatchMode

if TYPE_CHECKING:
    from collections.abc import Iterator

#: Operations that return a Python value read from a tensor, or whose output shape depends on a
#: tensor's values: the host waits for the device in each.
SYNC_OPS = frozenset(
    name
    for name in (
        "_local_scalar_dense",
        "item",
        "is_nonzero",
        "equal",
        "allclose",
        "nonzero",
        "masked_select",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "unique_dim_consecutive",
        "repeat_interleave",
        "_assert_scalar",
    )
)


_MASK_INDEXING = ("index", "index_put", "index_put_", "_index_put_impl_")


def _is_mask_indexing(name: str, args) -> bool:
    """``x[mask]`` and ``x[mask] = v``: a boolean index becomes positions through ``nonzero``
    inside the kernel (the output shape depends on the values)."""
    if name not in _MASK_INDEXING or len(args) < 2:
        return False
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]
    )


def _is_blocking_transfer(name: str, args, kwargs) -> bool:
    """A copy between the host and a device that the host waits for: ``x.cpu()``,
    ``x.to("cpu")`` or ``cpu_tensor.copy_(x)`` of a tensor on a device (unless non-blocking into
    pinned memory), and ``x.to(device)`` or ``device_tensor.copy_(x)`` of a CPU tensor (unless
    non-blocking from pinned memory): torch synchronises the stream after a blocking copy either
    way. (The meta device holds no data: no copy.)"""
    if name == "_to_copy":
        device = kwargs.get("device")
        if device is None or (kwargs.get("non_blocking", False) and args[0].is_pinned()):
            return False
        source, target = args[0].device.type, torch.device(device).type
    elif name == "copy_":
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        if non_blocking and (args[0].is_pinned() or args[1].is_pinned()):
            return False
        source, target = args[1].device.type, args[0].device.type
    else:
        return False
    return "meta" not in (source, target) and (source == "cpu") != (target == "cpu")


@dataclass
class DispatchCounts:
    """What :func:`count_dispatch` saw: every ATen call and the host syncs among them, by name."""

    calls: Counter = field(default_factory=Counter)
    syncs: Counter = field(default_factory=Counter)

    @property
    def aten_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def host_syncs(self) -> int:
        return sum(self.syncs.values())


class _CountingMode(TorchDispatchMode):
    def __init__(self, counts: DispatchCounts) -> None:
        super().__init__()
        self.counts = counts
        # it runs every operation as called: the library may use its cached constant tensors
        # under it, as in an uncounted step (the count is the step's own)
        setattr(self, OBSERVING_MODE, True)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.counts.calls[name] += 1
        if (
            name in SYNC_OPS
            or _is_mask_indexing(name, args)
            or _is_blocking_transfer(name, args, kwargs)
        ):
            self.counts.syncs[name] += 1
        return func(*args, **kwargs)


@contextmanager
def count_dispatch() -> Iterator[DispatchCounts]:
    """Count the ATen calls and host syncs of the enclosed code (all threads' autograd engine
    work included: a backward run inside the block is counted)."""
    counts = DispatchCounts()
    with _CountingMode(counts):
        yield counts
