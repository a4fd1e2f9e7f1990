"""Every private torch API the library uses, in one place, each with its version gate and fallback.

The library supports the torch versions CI tests (``pyproject.toml``: ``torch>=2.13``; CI runs
2.13.0 and 2.14.1). Everything else in the library uses public torch only. For each name below:
what it is for, where torch keeps it, and what happens where it is missing.

Base classes (``torch.nn.modules``, underscore names present in every torch 1.x and 2.x):
``NormBase`` (``batchnorm._NormBase``: the layers keep BatchNorm's parameters, buffers and
checkpoint loading), ``BatchNormBase`` (``batchnorm._BatchNorm``: what the converter replaces),
``ConvNd`` and ``ConvTransposeNd`` (``conv._ConvNd``/``_ConvTransposeNd``: what feeds a norm).
These are what timm, mmcv and torch's own tools select norms and convolutions by; there is no
public equivalent, and a torch without them fails at import, loudly.

Autograd state (``torch._C``), read by activation checkpointing's support:

- :func:`in_backward`: whether a forward runs inside a backward pass (a checkpoint
  recomputation), from ``torch._C._current_graph_task_id()`` (torch >= 2.0). Fallback where it is
  missing: ``False``: a checkpoint recomputation is then not recognised and runs as a fresh
  forward (it would hand statistics over and move averages again), so activation checkpointing
  of Kalman layers needs a torch that has it (every supported one does).
- :func:`is_checkpoint_recomputation`: whether the saved-tensor hooks on top of the stack
  (``torch._C._autograd._top_saved_tensors_default_hooks``) are non-reentrant checkpointing's
  recomputation hooks: recognised by the pack hook's qualified name
  (``torch.utils.checkpoint._recomputation_hook``'s, the same in 2.13 and 2.14), and on
  torch >= 2.14 also by the ``_checkpoint_internal`` mark its checkpoint hooks carry (2.13 has
  none: reading only that mark failed all checkpointing tests there). Fallback where the hook
  stack cannot be read: ``True`` (no reentrant checkpoint is refused; its lost prior gradient is
  then not reported).

Kernels (``torch.ops.aten``, schema-stable native functions without a public Python wrapper):

- :func:`sum_and_dot_rows`: sum a and sum a b along the last dim of (1, rows, L) tensors in one
  pass, through ``native_batch_norm_backward`` asked only for its weight and bias gradients (a
  public sum and a batched dot product cost 2.8x as much on a 2-core x86 CPU), except for rows
  of fewer than 16 values on a CPU (public matrix-vector products). Fallback where the op is
  missing: ``a.sum(-1)`` and ``(a * b).sum(-1)``.

Dispatch (``torch.utils._python_dispatch``): ``TorchDispatchMode``, for counting ATen calls and
host synchronisations (:mod:`kalmannorm._dispatch_count`, tests and the lab's benchmark only; the
layers never use it). Present since torch 1.13. :func:`dispatch_mode_active`, from
``torch._C._len_torch_dispatch_stack()`` (torch >= 2.0): compiled small steps
(:mod:`kalmannorm.compiled_step`) run as written under such a mode, which compiled code does not
support. Fallback where it is missing: ``False``. :func:`observing_modes_only`, from
``_get_current_dispatch_mode_stack()`` of the same module (torch >= 2.0): whether every active
mode only observes (declares :data:`OBSERVING_MODE`, as the call counter does), so that
:func:`sum_and_dot_rows` may use its cached constants under it and a counted step makes the
calls an uncounted one makes. ``COMPILER_FAILURES``
(``torch._dynamo.exc.BackendCompilerFailed``, torch >= 2.0): the compiler failure that
:func:`kalmannorm.compiled_step.compiled_call` turns into one line naming the fix; missing: none
is caught.

Not private any more (replaced): CBN's weight gradient of a convolution uses the public
``torch.nn.grad.conv{1,2,3}d_weight`` (the same ``convolution_backward`` call, no speed lost).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack

#: (major, minor) of the running torch, for the version gates below.
TORCH_VERSION = tuple(int(part) for part in torch.__version__.split(".")[:2])

# -- base classes -------------------------------------------------------------------------------

NormBase = nn.modules.batchnorm._NormBase
BatchNormBase = nn.modules.batchnorm._BatchNorm
InstanceNormBase = nn.modules.instancenorm._InstanceNorm
ConvNd = nn.modules.conv._ConvNd
ConvTransposeNd = nn.modules.conv._ConvTransposeNd

# -- autograd state -----------------------------------------------------------------------------

_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
_top_saved_tensors_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
#: The pack hook of non-reentrant checkpointing's recomputation (torch 2.13 and 2.14).
_RECOMPUTATION_HOOK = ("torch.utils.checkpoint", "_recomputation_hook.")


def in_backward() -> bool:
    """Whether the code runs inside a backward pass (the autograd engine's current graph task)."""
    return _graph_task_id is not None and _graph_task_id() != -1


def is_checkpoint_recomputation() -> bool:
    """Whether the innermost saved-tensor hooks are non-reentrant activation checkpointing's
    recomputation hooks (what a forward run by ``checkpoint(..., use_reentrant=False)`` in the
    backward sees), as opposed to no hooks (a reentrant checkpoint) or the user's own."""
    if _top_saved_tensors_hooks is None:
        return True
    hooks = _top_saved_tensors_hooks(False)
    if hooks is None:
        return False
    pack = hooks[0]
    module, prefix = _RECOMPUTATION_HOOK
    name = getattr(pack, "__qualname__", "")
    if getattr(pack, "__module__", None) == module and name.startswith(prefix):
        return True
    # torch >= 2.14 marks both its checkpoint hooks; inside a backward only the recomputation's
    # can be on top (kept should the class be renamed)
    marked = bool(getattr(pack, "_checkpoint_internal", False))
    return TORCH_VERSION >= (2, 14) and marked and in_backward()


# -- kernels ------------------------------------------------------------------------------------

_batch_norm_backward = getattr(torch.ops.aten, "native_batch_norm_backward", None)

#: Rows shorter than this take :func:`sum_and_dot_rows`' matrix-vector products on a CPU
#: (measured on one x86 core: 0.08x the kernel's time at 4 float32 values, 0.98x at 16, 1.37x at
#: 24; float64 0.16x at 4, 0.43x at 16, 0.95x at 24).
_SHORT_ROWS = 16


def sum_and_dot_rows(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(sum a, sum a * b) along the last dim of contiguous (1, rows, L) tensors of one dtype:
    (rows,) each, float32 for float16/bfloat16 inputs.

    ATen's BatchNorm backward, asked only for its weight and bias gradients, computes per channel
    sum g and sum g (x - mean) invstd; with the rows as its channels, g = a, x = b, mean 0 and
    invstd 1, these are sum a and sum a b, in one vectorised pass.

    The CPU kernel vectorises along each row: on rows shorter than ``_SHORT_ROWS`` values (the
    small spatial maps of a network's last stages) it is slower than products with a vector of
    ones, 13x at 4 float32 values (1M values: 10.6 ms against 0.8 ms on one x86 core), so those
    take the matrix-vector products instead.
    """
    half = a.dtype in (torch.float16, torch.bfloat16)
    if _batch_norm_backward is None:
        a = a.float() if half else a
        return a.sum((0, 2)), (a * b).sum((0, 2))
    dtype = torch.float32 if half else a.dtype
    # (under a dispatch mode the tensors made may be the mode's own, e.g. fake: not cached,
    # unless every active mode only observes and makes ordinary tensors)
    own_tensors = dispatch_mode_active() and not observing_modes_only()
    constants = _sum_constants.__wrapped__ if own_tensors else _sum_constants
    length = a.shape[2]
    if length < _SHORT_ROWS and a.device.type == "cpu":
        a, b = (a.float(), b.float()) if half else (a, b)
        ones = constants(length, dtype, a.device)[1]
        return a.view(-1, length) @ ones, (a * b).view(-1, length) @ ones
    zeros, ones, weight = constants(a.shape[1], dtype, a.device)
    _, sum_ab, sum_a = _batch_norm_backward(
        a, b, weight if half else None, None, None, zeros, ones, True, 0.0, [False, True, True]
    )
    return sum_a, sum_ab


@functools.lru_cache(maxsize=256)
def _sum_constants(rows: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    """The mean (zeros), invstd (ones) and float32 weight (ones) :func:`sum_and_dot_rows` hands
    the kernel, made once per shape (the kernel only reads them). A float32 weight with half
    inputs selects the kernels' mixed-type variant: float32 sums (CPU and CUDA alike; without it
    they would be written in half precision)."""
    zeros = torch.zeros(rows, dtype=dtype, device=device)
    ones = torch.ones(rows, dtype=dtype, device=device)
    return zeros, ones, torch.ones(rows, dtype=torch.float32, device=device)


__all__ = [
    "TORCH_VERSION",
    "BatchNormBase",
    "ConvNd",
    "ConvTransposeNd",
    "InstanceNormBase",
    "NormBase",
    "TorchDispatchMode",
    "in_backward",
    "is_checkpoint_recomputation",
    "sum_and_dot_rows",
]


# -- dispatch modes -----------------------------------------------------------------------------

_dispatch_stack_length = getattr(torch._C, "_len_torch_dispatch_stack", None)

try:  # what torch.compile raises where its backend fails (no C++ compiler, no Triton)
    from torch._dynamo.exc import BackendCompilerFailed as _BackendCompilerFailed

    COMPILER_FAILURES: tuple[type[BaseException], ...] = (_BackendCompilerFailed,)
except ImportError:  # pragma: no cover - present in every supported torch
    COMPILER_FAILURES = ()


def dispatch_mode_active() -> bool:
    """Whether a ``TorchDispatchMode`` is active (compiled code does not run under one)."""
    return _dispatch_stack_length is not None and _dispatch_stack_length() > 0


#: The attribute by which a ``TorchDispatchMode`` declares that it only observes the operations
#: (runs each as called, on ordinary tensors), as the library's call counter does.
OBSERVING_MODE = "kalmannorm_observes_only"


def observing_modes_only() -> bool:
    """Whether every active ``TorchDispatchMode`` declares :data:`OBSERVING_MODE` (so that the
    tensors made under them are ordinary tensors, which may be cached)."""
    modes = _get_current_dispatch_mode_stack()
    return all(getattr(mode, OBSERVING_MODE, False) for mode in modes)
