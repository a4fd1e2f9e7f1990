"""Linking the Kalman layers of a model that nobody linked, and settling a chain's order lazily.

:func:`kalmannorm.convert_norm` links the layers it creates. A model built with Kalman layers as
its norm layer (``torchvision.models.resnet50(norm_layer=kalmannorm.norm_layer("bkn"))``,
``timm.create_model(..., norm_layer=...)``, an mmcv or detectron2 config) never passes through
it: each Kalman layer registers itself here when it is built, and the first forward call of a
module that holds such layers links them, with :func:`link_model` on that module, its chain traced
on that call's input (the chain of a model of GKN layers too). A lone layer called on its own
becomes a chain of one (BatchNorm, GroupNorm: what an unlinked layer computes).

Two things are loud:

* linking creates Kalman parameters that did not exist (the model's layers were built from their
  classes, or a GKN chain's transitions): an optimizer built before that call does not hold them,
  which is warned about once per model, naming the fix (``kalmannorm.link_chain(model)`` right
  after building it). Layers built by :func:`kalmannorm.norm_layer` (and the timm, mmcv and
  detectron2 factories) own their data-flow parameters from the start, so a BKN model built so
  trains correctly with an optimizer built at once;
* a part of a model called before the model itself (``model.backbone(x)``): the layers are then
  linked on the whole model, in registration order, the data flow traced on the whole model's
  first call, with a warning.

The watch costs nothing once every layer is linked: the global module hooks (``torch.nn.modules
.module.register_module_forward_pre_hook`` and the module-registration hook that records each
layer's parents) are installed only while a layer waits and removed when none does.
"""

from __future__ import annotations

import re
import threading
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from kalmannorm import chain as _chain
from kalmannorm.chain import KalmanChain, is_chain_member, link_chain

_AWAITING: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_PARENTS: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()
_HANDLES: list = []
_LOCAL = threading.local()


def await_link(layer: nn.Module) -> None:
    """Watch ``layer`` (a Kalman layer just built, or a Cross-Iteration BN layer built by a
    factory): linked on its model's first forward call."""
    _AWAITING.add(layer)
    if not _HANDLES:
        _HANDLES.append(torch_module.register_module_forward_pre_hook(_on_forward))
        _HANDLES.append(torch_module.register_module_module_registration_hook(_on_registration))


def awaiting(module: nn.Module) -> list[nn.Module]:
    """The layers of ``module`` that still wait to be linked."""
    _prune()
    return [m for m in module.modules() if m in _AWAITING]


def _linked(layer: nn.Module) -> bool:
    if is_chain_member(layer):
        return layer.chain is not None
    return getattr(layer, "feeding", None) is not None  # a Cross-Iteration BN layer


def _prune() -> None:
    for layer in list(_AWAITING):
        if _linked(layer):
            _AWAITING.discard(layer)
    if not _AWAITING and _HANDLES:
        for handle in _HANDLES:
            handle.remove()
        _HANDLES.clear()
        _PARENTS.clear()


# linked layers stop being watched at once, not on the next forward call of some module: the
# global hooks would otherwise still be installed when the model is first called compiled
_chain.AFTER_LINK.append(_prune)


def _on_registration(parent: nn.Module, name: str, child: nn.Module | None) -> None:
    if child is not None and child not in _PARENTS:
        _PARENTS[child] = weakref.ref(parent)  # the first: a slice or a wrapper comes later


def _top(module: nn.Module) -> nn.Module:
    """The outermost module known to hold ``module``, through the first module each was
    registered in since a layer waits."""
    seen = {id(module)}
    while True:
        ref = _PARENTS.get(module)
        parent = ref() if ref is not None else None
        if parent is None or id(parent) in seen or not _holds(parent, module):
            return module
        seen.add(id(parent))
        module = parent


def _holds(parent: nn.Module, child: nn.Module) -> bool:
    return any(m is child for m in parent.children())


def _on_forward(module: nn.Module, args: tuple) -> None:
    if getattr(_LOCAL, "busy", False) or not _AWAITING:
        return
    if is_chain_member(module) and module.chain is not None:
        return
    held = awaiting(module)
    if not held or any(getattr(m, "tracing", False) for m in held):
        return  # (a trace runs the layers passing their input through: it is linking them)
    if torch.compiler.is_compiling() or type(module).__name__ == "OptimizedModule":
        raise RuntimeError(
            f"{len(held)} Kalman layers of {type(module).__name__} are in no chain, and linking "
            f"them traces the model, which cannot run under torch.compile: call "
            f"kalmannorm.link_chain(model, example_input=x) (or run one eager forward) before "
            f"compiling."
        )
    if any(isinstance(a, torch.fx.Proxy) for a in args):
        return
    top = _top(held[0])
    if top is module or any(m is top for m in module.modules()):
        top = module  # the call is the model's own (or a wrapper's around it)
    else:
        held = awaiting(top)
    kalman = any(is_chain_member(m) for m in held)
    cross_iteration = not all(is_chain_member(m) for m in held)
    _LOCAL.busy = True
    try:
        root = top
        example = (args[0] if len(args) == 1 else (args or None)) if top is module else None
        if cross_iteration:  # first: the Kalman layers' trace runs them
            from kalmannorm.layers.cross_iteration import link_cross_iteration

            link_cross_iteration(root, example)
        if kalman:
            # a norm registered with chain options (convert_norm's defaults for it)
            options = next((m.link_options for m in held if hasattr(m, "link_options")), {})
            link_model(root, example, automatic=True, **options)
        for layer in held:
            _AWAITING.discard(layer)
        if top is not module:
            warnings.warn(
                f"kalmannorm: {type(module).__name__}, a part of {type(top).__name__}, ran "
                f"before the whole model, so the Kalman layers of {type(top).__name__} were "
                f"linked in registration order; the data flow is traced on its first call. If "
                f"only parts of the model are called, link it yourself: "
                f"kalmannorm.link_chain(model, example_input=x).",
                stacklevel=2,
            )
    finally:
        _LOCAL.busy = False
    _prune()


# -- linking a model: link_chain plus the lazily traced execution order and one warning each ------


def link_model(
    root: nn.Module,
    example_input: object = None,
    *,
    flow: str | None = None,
    source: str = "batch",
    automatic: bool = False,
) -> KalmanChain:
    """:func:`kalmannorm.link_chain` as :func:`kalmannorm.convert_norm` uses it.

    Differences: with the default ``flow`` resolved to ``"execution"`` (GKN), the order is
    traced in training mode, where every branch runs (modes restored; the current mode if the
    model cannot run in training mode on that input), on ``example_input`` or on the model's
    first forward call, and a model whose layers do not all run stays in registration order until
    a training call runs them all; ``prior="propagate"``'s per-layer warnings become one; and a
    link that creates Kalman parameters the model did not have warns once when ``automatic``.
    """
    members = [m for m in root.modules() if is_chain_member(m)]
    per_channel = all(getattr(m, "per_channel_statistics", False) for m in members)
    before = {id(p) for p in root.parameters()}
    if flow is not None or per_channel:
        with summarised_propagate_warnings(len(members)), _same_parameter_objects(root):
            chain = link_chain(root, example_input, flow=flow, source=source)
    else:
        with summarised_propagate_warnings(len(members)), _same_parameter_objects(root):
            chain = link_chain(root, None, flow="execution", source=source)
        traced = None
        if example_input is not None:
            traced = _trace_in_training_mode(root, example_input, source)
        if traced is None:
            _wait_for_trace(root, chain, source)
        else:
            chain = traced
    if automatic:
        _warn_new_parameters(root, before, len(members), _FIX_UNLINKED)
    return chain


@contextmanager
def _same_parameter_objects(root: nn.Module) -> Iterator[None]:
    """Relinking may give a layer Kalman parameters of other shapes (a GKN transition sized by
    another upstream): keep the layer's parameter objects, with the new shapes and values, so that
    an optimizer built before (and not yet stepped) still holds the layer's parameters."""
    before = {
        (id(m), key): m._parameters[key]
        for m in root.modules()
        if is_chain_member(m)
        for key in _KALMAN_PARAMETERS
        if m._parameters.get(key) is not None
    }
    try:
        yield
    finally:
        for module in root.modules():
            if not is_chain_member(module):
                continue
            for key in _KALMAN_PARAMETERS:
                new, old = module._parameters.get(key), before.get((id(module), key))
                if new is not None and old is not None and new is not old:
                    with torch.no_grad():
                        old.data = new.data
                    module._parameters[key] = old


_KALMAN_PARAMETERS = ("gain_logit", "noise_raw", "transition")


def _wait_for_trace(root: nn.Module, chain: KalmanChain, source: str) -> None:
    chain.reattach(root)  # (a failed trace removed the chain's hooks)
    chain.awaiting_trace = True
    chain._hooks.append(
        root.register_forward_pre_hook(_TraceOrderOnFirstCall(chain, source), with_kwargs=True)
    )


_FIX_UNLINKED = (
    "Call kalmannorm.link_chain(model) right after building the model (before the optimizer), "
    "or build the model's norms with kalmannorm.norm_layer(...)."
)
_FIX_ORDER = (
    "The model registers its layers in another order than it runs them: pass example_input to "
    "kalmannorm.convert_norm / link_chain, or build the optimizer after the first forward call."
)


def _warn_new_parameters(root: nn.Module, before: set[int], count: int, fix: str) -> None:
    created = [p for p in root.parameters() if id(p) not in before]
    if created:
        warnings.warn(
            f"kalmannorm linked the {count} Kalman layers of {type(root).__name__} on its first "
            f"forward call, which created {len(created)} Kalman parameter tensors "
            f"({sum(p.numel() for p in created)} values): an optimizer built before this call "
            f"does not update them. {fix}",
            stacklevel=4,
        )


class _TraceOrderOnFirstCall:
    """Forward pre-hook of an execution-flow chain linked in registration order: relink it in the
    traced order on the first call that runs every layer (a callable object, so that
    ``copy.deepcopy`` binds the copy's hook to the copy's chain)."""

    def __init__(self, chain: KalmanChain, source: str) -> None:
        self.chain, self.source = chain, source

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        chain = self.chain
        if not getattr(chain, "awaiting_trace", False):
            return
        if not any(layer.chain is chain for layer in chain.layers):
            chain.awaiting_trace = False
            return  # relinked since
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "the Kalman chain traces the model's execution order on its first forward call, "
                "which cannot run under torch.compile: pass example_input to "
                "kalmannorm.convert_norm / link_chain (or run one eager forward) before compiling."
            )
        if kwargs and args:
            return  # no single example to trace on: the registration order stays for now
        example = kwargs if kwargs else (args[0] if len(args) == 1 else args)
        before = {id(p) for p in module.parameters()}
        traced = _trace_in_training_mode(module, example, self.source)
        if traced is not None:
            chain.awaiting_trace = False
            _warn_new_parameters(module, before, len(traced), _FIX_ORDER)
            return
        if module.training:
            chain.awaiting_trace = False
            warnings.warn(
                f"kalmannorm: a training forward of {type(module).__name__} did not run every "
                f"Kalman layer, so its chain keeps registration order; link it with "
                f"kalmannorm.link_chain(model, example_input=x) on an input that runs them all.",
                stacklevel=2,
            )
        if chain.awaiting_trace:
            _wait_for_trace(module, chain, self.source)
        else:
            chain.reattach(module)


def _trace_in_training_mode(root: nn.Module, example: object, source: str) -> KalmanChain | None:
    """Relink ``root``'s execution-flow chain in traced order: traced in training mode (every
    branch runs; modes restored), else in the current mode. ``None`` when a layer did not run."""
    modes = [(m, m.training) for m in root.modules()]
    count = sum(is_chain_member(m) for m, _ in modes)
    for train in (True, False) if not root.training else (False,):
        try:
            if train:
                root.train()
            with summarised_propagate_warnings(count), _same_parameter_objects(root):
                return link_chain(root, example, flow="execution", source=source)
        except Exception as error:
            if train:
                continue  # the model does not run in training mode on this input (no targets)
            if isinstance(error, ValueError) and "did not run" in str(error):
                return None
            raise
        finally:
            for module, mode in modes:
                module.training = mode
    return None


# -- one warning for prior="propagate"'s layers without a feeding convolution --------------------

_PROPAGATE = re.compile(r"prior='propagate' needs the convolution/linear layer")
_NAME = re.compile(r"'([^']*)'")


@contextmanager
def summarised_propagate_warnings(total: int) -> Iterator[None]:
    """Collect the execution flow's per-layer ``prior="propagate"`` fallback warnings into one
    (the count and the first layers); every other warning passes unchanged."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    fallen = []
    for w in caught:
        text = str(w.message)
        if _PROPAGATE.search(text):
            found = _NAME.search(text.split(":", 1)[0])
            fallen.append(found.group(1) if found else text.split(":", 1)[0])
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if fallen:
        shown = ", ".join(fallen[:4]) + (f" and {len(fallen) - 4} more" if len(fallen) > 4 else "")
        warnings.warn(
            f"prior='propagate' (execution flow): {len(fallen)} of {total} Kalman layers have no "
            f"convolution/linear layer right before them that takes their upstream layer's "
            f"channels (a concatenation, a pooling or a width change in between), so each uses "
            f"its batch statistics alone: {shown}. The data flow (flow='data', the default for "
            f"BKN) follows such operations.",
            stacklevel=4,
        )
