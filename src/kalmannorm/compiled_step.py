"""Compiled small steps: a Kalman layer's small-tensor work as compiled code in an eager model.

In eager mode a Kalman layer runs a few hundred operations on (G, C) tensors per training step,
forward and backward: the data-flow prediction of its input's moments (:mod:`kalmannorm.dataflow`)
and Eq. (5) with its prior. None of them touches an activation, but each is a dispatcher call and,
on a GPU, a kernel launch: at micro-batch sizes they, not the convolutions, set the step time.
:func:`compile_kalman_steps` compiles, for each layer, the prediction and the estimate with
``torch.compile`` (inductor, static shapes, whole graphs): each becomes a handful of fused kernels
forward and backward, inside the eager model and its fused autograd node.

One compiled function per layer and part. Dynamo keeps its compiled code per Python code object
and guards on the objects a function reads (the layer, its program), so that one function shared
by all layers would recompile for each until its recompile limit; every layer gets its own copy of
the code instead (:func:`own_code`), and inductor's graph cache reuses the kernels of layers of the
same structure. The compiled functions are built on a layer's first training forward (cost: a few
seconds per distinct layer structure, less from a warm inductor cache) and are not part of the
layer's state: a copy or a pickled model starts without them and compiles again.

Nothing changes under ``torch.compile(model)`` (the model's graph includes the small steps) or
under a ``TorchDispatchMode`` (which compiled code does not support): both run the steps as
written.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn

from kalmannorm import _torch_private

__all__ = ["compile_kalman_steps", "compiled_call", "own_code"]

#: The attribute of an owner (a layer, a chain) holding its compiled functions by key.
_CACHE = "_compiled_steps"


def compile_kalman_steps(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Compile every Kalman layer's small step (its data-flow prediction and Eq. 5) in ``model``
    when it runs eagerly (``enabled=False``: back to the written code); returns ``model``.

    The layers' outputs, gradients, statistics and moving averages are those of the eager step
    within floating-point rounding (tests/test_compiled_step.py). Needs what ``torch.compile``
    needs on the device (a C++ compiler on a CPU, Triton on a GPU).

    Example::

        >>> model = kalmannorm.convert_norm(model, "bkn-flow", stat_batch_size=2)  # doctest: +SKIP
        >>> kalmannorm.compile_kalman_steps(model)  # doctest: +SKIP
    """
    from kalmannorm.layers.base import KalmanNormBase

    found = False
    for module in model.modules():
        if isinstance(module, KalmanNormBase):
            found = True
            module.compile_step = enabled
            if not enabled:
                module.__dict__.pop(_CACHE, None)
                if module.chain is not None:
                    module.chain.__dict__.pop(_CACHE, None)
    if not found:
        raise ValueError(
            "compile_kalman_steps: the model has no Kalman layer (BatchKalmanNorm, "
            "GroupKalmanNorm); convert it first with kalmannorm.convert_norm(model, 'bkn-flow', "
            "stat_batch_size=...)"
        )
    return model


class CompiledSteps(dict):
    """An owner's compiled functions by key; a copy or a pickle of it is empty (compiled code is
    neither copied nor pickled: the copy compiles again on first use)."""

    def __reduce__(self):
        return (CompiledSteps, ())


def runs_compiled() -> bool:
    """Whether a compiled step may run here: eager code, no dispatch mode active."""
    return not torch.compiler.is_compiling() and not _torch_private.dispatch_mode_active()


def compiled_call(owner: object, key: object, fn: Callable, *args: object, what: str):
    """``fn(*args)``, compiled: ``fn`` (any callable, e.g. a bound method) is compiled once per
    ``(owner, key)``, inside a function with its own code object, and the compiled version
    called. ``what`` names it in the error raised where the compiler fails."""
    cache = owner.__dict__.setdefault(_CACHE, CompiledSteps())
    compiled = cache.get(key)
    if compiled is None:
        compiled = cache[key] = torch.compile(
            own_code(_calling(fn), f"compiled_step_{len(cache)}"), dynamic=False, fullgraph=True
        )
    try:
        return compiled(*args)
    except _torch_private.COMPILER_FAILURES as error:
        cause = str(getattr(error, "inner_exception", error)).strip().splitlines() or [""]
        raise RuntimeError(
            f"compile_kalman_steps: torch.compile could not compile {what} ({cause[0][:200]}); "
            f"it needs what torch.compile needs on this device (a C++ compiler on a CPU, Triton "
            f"on a GPU). Run the written steps instead: "
            f"kalmannorm.compile_kalman_steps(model, enabled=False)."
        ) from error


def _calling(fn: Callable) -> types.FunctionType:
    """A plain function that calls ``fn`` (what :func:`own_code` copies)."""

    def compiled_step(*args: object):
        return fn(*args)

    return compiled_step


def own_code(fn: types.FunctionType, name: str) -> types.FunctionType:
    """``fn`` with a copy of its code object of its own (named ``name``): the same function,
    which dynamo compiles and caches apart from every other copy."""
    code = fn.__code__.replace(co_name=name)
    copy = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy
