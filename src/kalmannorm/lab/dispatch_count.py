"""ATen calls and host syncs of a piece of code, counted below autograd with a dispatch mode.

    with count_dispatch() as counts:
        loss_fn(model(x)).backward()
    counts.aten_calls, counts.host_syncs, counts.calls, counts.syncs  # totals; op name -> number

Every operation the dispatcher runs below autograd is one call (forward and backward alike,
the backward's included when it runs inside the block); composite operations are counted as the
operations they decompose into, as a GPU would launch them. A *host sync* is a call whose result
the host waits for: a Python value read from a tensor (``item()``, ``bool(t)``, ``float(t)``,
``if t:`` all reach ``aten._local_scalar_dense``), a Python bool from a comparison
(``aten.equal``), an output whose shape depends on the values (``nonzero``, ``masked_select``,
indexing with a boolean mask, ``unique``, ``repeat_interleave``) and a copy to the CPU of a
tensor that lives elsewhere. Not seen: ``tensor.tolist()`` and ``numpy()``, which read memory
without dispatching an operation. The counts do not depend on the device: taken on a CPU,
they hold on a GPU, where each sync stalls the stream.

The lab's counter (the benchmark's ``aten_calls_ratio`` and ``host_syncs_per_step``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SYNC_OPS", "DispatchCounts", "count_dispatch"]

#: ATen operations (overload packets) that make the host wait for the device.
SYNC_OPS = frozenset(
    {
        "_local_scalar_dense",
        "item",
        "is_nonzero",
        "equal",
        "allclose",
        "nonzero",
        "nonzero_static",
        "masked_select",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "unique_dim_consecutive",
        "repeat_interleave",
        "_assert_async",
        "_assert_scalar",
    }
)
_COPIES = ("_to_copy", "copy_")
_INDEXING = ("index", "index_put", "index_put_", "_index_put_impl_")


def _to_host(name: str, args: tuple, kwargs: dict) -> bool:
    """A copy into CPU memory of a tensor that is not on the CPU."""
    if name == "_to_copy":
        device = kwargs.get("device")
        return device is not None and torch.device(device).type == "cpu" and (
            args[0].device.type not in ("cpu", "meta")
        )
    destination, source = args[0], args[1]
    return destination.device.type == "cpu" and isinstance(source, torch.Tensor) and (
        source.device.type not in ("cpu", "meta")
    )


def _mask_indexed(args: tuple) -> bool:
    """Indexing with a boolean mask: its output (or the positions it writes) depends on the
    values, found by a ``nonzero`` inside the kernel."""
    indices = args[1] if len(args) > 1 else ()
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()
    )


@dataclass
class DispatchCounts:
    """What :func:`count_dispatch` saw, by ATen operation name."""

    calls: Counter = field(default_factory=Counter)
    syncs: Counter = field(default_factory=Counter)

    @property
    def aten_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def host_syncs(self) -> int:
        return sum(self.syncs.values())


class _Counting(TorchDispatchMode):
    def __init__(self, counts: DispatchCounts) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.counts.calls[name] += 1
        if name == "repeat_interleave" and kwargs.get("output_size") is not None:
            pass  # told its output size: no read
        elif (
            name in SYNC_OPS
            or (name in _COPIES and _to_host(name, args, kwargs))
            or (name in _INDEXING and _mask_indexed(args))
        ):
            self.counts.syncs[name] += 1
        return func(*args, **kwargs)


@contextmanager
def count_dispatch() -> Iterator[DispatchCounts]:
    """Count the ATen calls and host syncs of the enclosed code."""
    counts = DispatchCounts()
    with _Counting(counts):
        yield counts
