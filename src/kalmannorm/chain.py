"""Linking Kalman layers in execution order.

A :class:`KalmanChain` is the ordered list of the Kalman layers of one model. During a forward
pass each layer receives the posterior statistics that its predecessor in the chain produced in
*the same pass*, and hands its own posterior on. The chain keeps that hand-over state per thread
and per pass: it is reset when the model's forward starts and when it ends, so nothing (and no
autograd graph) outlives a pass, nothing is shared between models (each model gets its own chain)
and nothing is shared between threads.

The order is fixed when the chain is built, either from a traced forward pass (``example_input``,
exact) or from module registration order (what ``model.modules()`` yields; right for most
``nn.Sequential``-style and torchvision models). A training-mode forward that runs the layers in
any other order raises :class:`ChainOrderError` instead of silently pairing wrong statistics.

Residual connections: the chain follows execution order, so the layer after a residual addition
takes the posterior of whichever Kalman layer ran last (the end of the residual branch, or the
shortcut's projection). We do not add the shortcut's statistics to the branch's, as the authors'
hand-wired code does: on an arbitrary ``nn.Module`` the additions are invisible, and the learned
transition A^k already maps the upstream statistics linearly onto the layer's, which can absorb a
fixed sum; the gain q^k lets a layer fall back on its own batch statistics where the prior is poor.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from kalmannorm.layers.base import KalmanNormBase


class Posterior(NamedTuple):
    """Posterior a layer hands to the next one: mean (G, C); var (G, C) or cov (G, C, C)."""

    mean: Tensor
    var: Tensor


class ChainOrderError(RuntimeError):
    """A forward pass ran the Kalman layers in an order other than the chain's."""


class _PassState(threading.local):
    index: int = -1
    posterior: Posterior | None = None


class KalmanChain:
    """The Kalman layers of one model in execution order, and the per-pass hand-over between them.

    Args:
        layers: the layers in execution order.
        names: their qualified names in the model (for messages).
        preceding: for each layer, the convolution/linear module that feeds it, or ``None``.
        order_source: how the order was found (``"traced"`` or ``"registration"``), for messages.
    """

    def __init__(
        self,
        layers: Sequence[KalmanNormBase],
        names: Sequence[str],
        preceding: Sequence[nn.Module | None],
        order_source: str,
    ) -> None:
        self.layers = list(layers)
        self.names = list(names)
        self.preceding = list(preceding)
        self.order_source = order_source
        self._state = _PassState()
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[KalmanNormBase]:
        return iter(self.layers)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_state"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._state = _PassState()

    def describe(self) -> str:
        """One line per layer: index, name, upstream and channels."""
        lines = [f"KalmanChain of {len(self)} layers (order: {self.order_source})"]
        for index, (layer, name) in enumerate(zip(self.layers, self.names)):
            upstream = self.names[index - 1] if index else "-"
            lines.append(f"  {index:3d} {name} <- {upstream} ({layer.num_features} channels)")
        return "\n".join(lines)

    # -- per-pass hand-over -------------------------------------------------------------------

    def reset(self, *_: object) -> None:
        """Forget the current pass (called at the start and end of the model's forward)."""
        self._state.index = -1
        self._state.posterior = None

    def upstream(self, index: int) -> Posterior | None:
        """Posterior of layer ``index - 1`` from this pass; checks the execution order."""
        state = self._state
        if index == 0:
            self.reset()
            return None
        if state.index != index - 1:
            ran = self.names[state.index] if state.index >= 0 else "no Kalman layer"
            raise ChainOrderError(
                f"Kalman layer '{self.names[index]}' (chain position {index}) ran after {ran} in "
                f"this forward pass, but the chain (built from {self.order_source} order) expects "
                f"'{self.names[index - 1]}' right before it. The model runs its normalization "
                f"layers in another order than the chain was built with: rebuild it from a traced "
                f"pass with kalmannorm.link_chain(model, example_input=x) (or convert_norm(..., "
                f"example_input=x)), or evaluate with moving statistics."
            )
        return state.posterior

    def publish(self, index: int, posterior: Posterior) -> None:
        """Record layer ``index``'s posterior for its successor in this pass."""
        state = self._state
        if index == len(self.layers) - 1:
            self.reset()
            return
        state.index = index
        state.posterior = posterior

    # -- attaching to a model -----------------------------------------------------------------

    def attach(self, root: nn.Module) -> None:
        """Bind the layers to this chain and reset the hand-over at each forward of ``root``."""
        for index, (layer, name) in enumerate(zip(self.layers, self.names)):
            layer.join_chain(self, index, name)
        self._hooks = [
            root.register_forward_pre_hook(self.reset),
            root.register_forward_hook(self.reset),
        ]

    def remove_hooks(self) -> None:
        """Stop resetting at the root's forward (the chain is being replaced)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def detach(self) -> None:
        """Unbind the layers (each acts alone again, dropping its Kalman parameters)."""
        self.remove_hooks()
        for layer in self.layers:
            layer.leave_chain()


def recomputing() -> bool:
    """Whether a module's forward runs inside a backward pass: activation checkpointing
    (``torch.utils.checkpoint``) recomputing a segment to recreate the tensors it saved.

    A layer recomputed so must reproduce its original output and leave every state (chain
    hand-over, moving averages, step counters) as it is.
    """
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def check_recomputation(layer_name: str) -> None:
    """Refuse a recomputation other than non-reentrant checkpointing's for a linked layer.

    ``torch.utils.checkpoint(..., use_reentrant=True)`` runs the segment without a graph and
    re-runs it in the backward as a new graph whose gradients never reach the statistics handed
    over from the layers before it: the prior's gradient would be lost silently.
    """
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is None or not getattr(hooks[0], "_checkpoint_internal", False):
        raise RuntimeError(
            f"{layer_name} ran its forward inside a backward pass other than a non-reentrant "
            f"activation-checkpoint recomputation. With torch.utils.checkpoint pass "
            f"use_reentrant=False: the reentrant variant cuts the statistics one Kalman layer "
            f"hands to the next out of the gradient."
        )


def _kalman_layers(root: nn.Module) -> list[tuple[str, KalmanNormBase]]:
    from kalmannorm.layers.base import KalmanNormBase

    return [(n, m) for n, m in root.named_modules() if isinstance(m, KalmanNormBase)]


# -- which convolution feeds a layer (shared by the Kalman chain and Cross-Iteration BN) ---------

#: Module types whose weight maps inputs to a normalization layer's channels.
WEIGHTED_LAYERS: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)


class FedLayer(NamedTuple):
    """A selected layer, its qualified name, and the convolution/linear layer feeding it."""

    name: str
    layer: nn.Module
    feeding: nn.Module | None


def feeds(module: nn.Module, num_features: int) -> bool:
    """Whether ``module`` is a convolution/linear layer with ``num_features`` output channels."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels == num_features
    if isinstance(module, nn.Linear):
        return module.out_features == num_features
    return False


def _last_feeding(ran: Sequence[nn.Module], layer: nn.Module) -> nn.Module | None:
    """The last of ``ran`` (weighted layers, in order) whose output width is ``layer``'s."""
    return next((m for m in reversed(ran) if feeds(m, layer.num_features)), None)


def _registration_order(root: nn.Module, select: Callable[[nn.Module], bool]) -> list[FedLayer]:
    found: list[FedLayer] = []
    weighted: list[nn.Module] = []
    for name, module in root.named_modules():
        if select(module):
            found.append(FedLayer(name, module, _last_feeding(weighted, module)))
        elif isinstance(module, WEIGHTED_LAYERS):
            weighted.append(module)
    return found


def _pass_through_layers(root: nn.Module) -> list[nn.Module]:
    """Layers that can pass their input through unchanged (a boolean ``tracing`` attribute)."""
    return [m for m in root.modules() if isinstance(getattr(m, "tracing", None), bool)]


def _traced_order(
    root: nn.Module, example_input: object, select: Callable[[nn.Module], bool], kind: str
) -> list[FedLayer]:
    """Run one forward pass and record the selected layers (and what fed each) in execution
    order. Layers with a ``tracing`` flag pass their input through during the pass; every buffer
    of ``root`` is restored afterwards."""
    known = {id(m): n for n, m in root.named_modules() if select(m)}
    found: list[FedLayer] = []
    weighted_ran: list[nn.Module] = []
    handles = []

    def on_weighted(module: nn.Module, *_: object) -> None:
        weighted_ran.append(module)

    def on_layer(module: nn.Module, *_: object) -> None:
        if any(entry.layer is module for entry in found):
            raise ValueError(
                f"{kind} '{known[id(module)]}' runs more than once per forward pass; a chain "
                f"needs each layer once. Give each call its own normalization layer."
            )
        found.append(FedLayer(known[id(module)], module, _last_feeding(weighted_ran, module)))

    for module in root.modules():
        if id(module) in known:
            handles.append(module.register_forward_pre_hook(on_layer))
        elif isinstance(module, WEIGHTED_LAYERS):
            handles.append(module.register_forward_hook(on_weighted))
    saved = {name: buf.clone() for name, buf in root.named_buffers()}
    passing = _pass_through_layers(root)
    was_tracing = [m.tracing for m in passing]
    for layer in passing:
        layer.tracing = True
    try:
        with torch.no_grad():
            if isinstance(example_input, tuple):
                root(*example_input)
            elif isinstance(example_input, dict):
                root(**example_input)
            else:
                root(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for layer, flag in zip(passing, was_tracing):
            layer.tracing = flag
        with torch.no_grad():
            for name, buf in root.named_buffers():
                buf.copy_(saved[name])
    ran = {id(entry.layer) for entry in found}
    missing = [n for n, m in root.named_modules() if select(m) and id(m) not in ran]
    if missing:
        raise ValueError(
            f"{kind}s {missing} did not run in the traced forward pass, so the chain cannot "
            f"place them. Trace with an input (and training mode) that runs every layer."
        )
    return found


def find_feeding_layers(
    root: nn.Module,
    select: Callable[[nn.Module], bool],
    example_input: object = None,
    *,
    kind: str = "layer",
) -> tuple[list[FedLayer], str]:
    """The modules of ``root`` picked by ``select``, in execution order, each with its feeder.

    The feeder of a layer is the last convolution/linear layer with as many output channels as
    the layer has ``num_features`` that ran (with ``example_input``: in one traced forward pass
    under ``torch.no_grad``, buffers restored afterwards) or was registered (without it: module
    registration order) before it, or ``None``. Returns the layers and the order's source,
    ``"traced"`` or ``"registration"``; ``kind`` names the layers in error messages.
    """
    if example_input is None:
        return _registration_order(root, select), "registration"
    return _traced_order(root, example_input, select, kind), "traced"


def _is_kalman(module: nn.Module) -> bool:
    from kalmannorm.layers.base import KalmanNormBase

    return isinstance(module, KalmanNormBase)


def link_chain(root: nn.Module, example_input: object = None) -> KalmanChain:
    """Link every Kalman layer of ``root`` into one chain in execution order and return it.

    With ``example_input`` (a tensor, a tuple of positional arguments or a dict of keyword
    arguments) the order is traced from one forward pass under ``torch.no_grad``: the Kalman
    layers pass their input through unchanged during the trace, and every buffer of ``root`` is
    restored afterwards. Without it, module registration order is used. Relinking replaces the
    chain the layers were in; a layer keeps its learned Kalman parameters when its upstream's width
    is unchanged, else they are created anew for the new upstream.
    """
    for _, layer in _kalman_layers(root):
        if layer.chain is not None:
            layer.chain.remove_hooks()
    found, source = find_feeding_layers(root, _is_kalman, example_input, kind="Kalman layer")
    chain = KalmanChain(
        [entry.layer for entry in found],
        [entry.name for entry in found],
        [entry.feeding for entry in found],
        source,
    )
    chain.attach(root)
    return chain
