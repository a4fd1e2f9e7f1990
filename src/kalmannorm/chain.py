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

Two ways to link (``flow``):

``"data"`` (default)
    Each layer's upstream is the predicted moments of the tensor that actually feeds it, computed
    from the statistics the Kalman layers that produce it publish in the same pass and the
    operations in between (:mod:`kalmannorm.dataflow`): residual additions, concatenations,
    activations, convolutions with their zero border. Needs one traced pass.
``"authors"``
    The same data flow, but the raw posteriors are pushed through the operations and padding is
    ignored, as in the authors' TensorFlow code (which also adds the branch's and the shortcut's
    statistics in its hand-wired ResNets).
``"execution"``
    The paper's chain as printed: layer k takes the posterior of the Kalman layer that ran
    before it (on a residual network, whichever ran last).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from kalmannorm import _torch_private, dataflow
from kalmannorm.compiled_step import compiled_call, runs_compiled

if TYPE_CHECKING:
    from kalmannorm.dataflow import Node
    from kalmannorm.moments import Moments

FLOWS = ("data", "authors", "execution")
SOURCES = ("batch", "posterior")
#: Called with no arguments after every :func:`link_chain` (``autolink`` stops watching the
#: layers that are now linked, and removes its global module hooks when none waits).
AFTER_LINK: list[Callable[[], None]] = []


class Posterior(NamedTuple):
    """Posterior a layer hands to the next one: mean (G, C); var (G, C) or cov (G, C, C)."""

    mean: Tensor
    var: Tensor


class Published(NamedTuple):
    """What a layer publishes in a pass: its batch statistics and its posterior, (G, C) each."""

    batch_mean: Tensor
    batch_var: Tensor
    mean: Tensor
    var: Tensor


class ChainMember(Protocol):
    """What the chain needs of a layer (implemented by the Kalman layers)."""

    stat_width: int
    num_features: int
    training: bool
    detach_prior_weights: bool

    def join_chain(self, chain: KalmanChain, index: int, name: str) -> None: ...

    def leave_chain(self) -> None: ...


def is_chain_member(module: nn.Module) -> bool:
    """Whether ``module`` is a layer a chain links (a Kalman layer)."""
    return callable(getattr(module, "join_chain", None)) and hasattr(module, "stat_width")


class ChainOrderError(RuntimeError):
    """A forward pass ran the Kalman layers in an order other than the chain's."""


class _PassState(threading.local):
    index: int = -1
    posterior: Posterior | None = None
    published: list[Published | None] | None = None
    memo: dict | None = None
    #: layers that have published in this pass (a data flow's; frozen layers do not run)
    ran: int = 0
    #: every layer has run: the hand-over was dropped (no reader is left in this pass)
    complete: bool = False


class KalmanChain:
    """The Kalman layers of one model in execution order, and the per-pass hand-over between them.

    Args:
        layers: the layers in execution order.
        names: their qualified names in the model (for messages).
        preceding: for each layer, the convolution/linear module that feeds it, or ``None``.
        order_source: how the order was found (``"traced"`` or ``"registration"``), for messages.
        flow: ``"data"``, ``"authors"`` or ``"execution"`` (module docstring).
        programs: with a data flow, each layer's moment program (``None``: no prior).
        source: with ``flow="data"``, whether a producer's output moments use its batch
            statistics (``"batch"``, exact for the group) or its posterior (``"posterior"``).
    """

    def __init__(
        self,
        layers: Sequence[ChainMember],
        names: Sequence[str],
        preceding: Sequence[nn.Module | None],
        order_source: str,
        flow: str = "execution",
        programs: Sequence[Node | None] | None = None,
        source: str = "batch",
    ) -> None:
        if flow not in FLOWS:
            raise ValueError(f"flow must be one of {FLOWS}, got {flow!r}")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        self.layers = list(layers)
        self.names = list(names)
        self.preceding = list(preceding)
        self.order_source = order_source
        self.flow = flow
        self.source = source
        self.programs = list(programs) if programs is not None else [None] * len(self.layers)
        #: statistics of layers folded away (:func:`kalmannorm.fold`), published in every pass
        self.frozen: dict[int, Published] = {}
        self._state = _PassState()
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[ChainMember]:
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
        lines = [
            f"KalmanChain of {len(self)} layers (order: {self.order_source}, flow: {self.flow})"
        ]
        for index, (layer, name) in enumerate(zip(self.layers, self.names)):
            if self.flow == "execution":
                upstream = self.names[index - 1] if index else "-"
            else:
                found = sorted(self.programs[index].producers()) if self.has_upstream(index) else []
                upstream = ", ".join(self.names[j] for j in found) or "-"
            lines.append(f"  {index:3d} {name} <- {upstream} ({layer.num_features} channels)")
        return "\n".join(lines)

    def has_upstream(self, index: int) -> bool:
        """Whether layer ``index`` has a prior to fuse (else it is BatchNorm/GroupNorm)."""
        if self.flow == "execution":
            return index > 0
        return self.programs[index] is not None

    # -- per-pass hand-over -------------------------------------------------------------------

    def reset(self, *_: object) -> None:
        """Forget the current pass (called at the start and end of the model's forward)."""
        self._state.index = -1
        self._state.posterior = None
        self._state.published = None
        self._state.memo = None
        self._state.ran = 0
        self._state.complete = False

    def place_constants(self, index: int, device: torch.device, dtype: torch.dtype) -> None:
        """Layer ``index``'s program with its constant tensors on ``device`` in ``dtype``
        (:func:`kalmannorm.dataflow.place_constants`)."""
        program = self.programs[index]
        if program is not None:
            dataflow.place_constants(program, device, dtype)

    def upstream(self, index: int) -> Posterior | None:
        """This pass's upstream of layer ``index``: the posterior of layer ``index - 1``
        (execution flow; the order is checked) or the predicted moments of its input tensor
        (data flows; the producers must have run in this pass)."""
        state = self._state
        if index == 0:
            self.reset()
        if self.flow != "execution":
            return self._predicted_input(index)
        if index == 0:
            return None
        if index - 1 in self.frozen:
            return Posterior(self.frozen[index - 1].mean, self.frozen[index - 1].var)
        layer = self.layers[index]
        if state.index != index - 1 and not layer.training and not hasattr(layer, "running_mean"):
            return None  # GKN evaluated past a training-only branch: its own statistics alone
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

    def _predicted_input(self, index: int) -> Posterior | None:
        program = self.programs[index]
        state = self._state
        if state.complete:
            raise ChainOrderError(
                f"Kalman layer '{self.names[index]}' ran after every Kalman layer of the chain "
                f"had run in this forward pass (a part of the model called on its own after a "
                f"whole pass, or a layer used twice), so the statistics it predicts from are gone. "
                f"Run the whole model (model(x)) for each pass."
            )
        if program is None:
            return None
        if state.published is None:  # the first layer of the pass (or one called on its own,
            # whose producers the program then reports as not run)
            state.published = [self.frozen.get(i) for i in range(len(self.layers))]
        if state.memo is None:
            state.memo = {}
        detach = self.layers[index].detach_prior_weights
        ctx = dataflow.Context(
            state.published,
            self.names,
            raw=self.flow == "authors",
            source=self.source,
            training=self.layers[index].training,
            memo=state.memo.setdefault(detach, {}),  # sub-expressions shared by equal readers
            detach_weights=detach,
        )
        if torch.compiler.is_compiling():
            predicted = program.evaluate(ctx, self.names[index])
        else:
            # The prediction's small tensors are saved outside any activation-checkpoint hooks:
            # a recomputation replays the prediction instead of re-evaluating the program, and
            # must save exactly the tensors the original forward saved.
            with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
                if self.layers[index].compile_step and runs_compiled():
                    predicted = self._compiled_prediction(index, ctx)
                else:
                    predicted = program.evaluate(ctx, self.names[index])
        return None if predicted is None else Posterior(*predicted)

    def _compiled_prediction(self, index: int, ctx: dataflow.Context) -> Moments:
        """Layer ``index``'s program evaluated by its compiled function (one per layer; its
        sub-expressions are not shared with other layers' programs, whose compiled code
        recomputes them). A producer that has not run is reported by the written program."""
        name = self.names[index]
        for producer in sorted(self.programs[index].producers()):
            ctx.entry(producer, name)  # raises ChainOrderError naming the missing layer
        return compiled_call(
            self, index, self._program_moments, index, ctx.published, ctx.training,
            what=f"the data-flow prediction of '{name}'",
        )  # fmt: skip

    def _program_moments(self, index: int, published: list, training: bool) -> Moments:
        """Layer ``index``'s program on the statistics ``published`` in this pass."""
        ctx = dataflow.Context(
            published, self.names, self.flow == "authors", self.source, training, memo={},
            detach_weights=self.layers[index].detach_prior_weights,
        )  # fmt: skip
        return self.programs[index].evaluate(ctx, self.names[index])

    def publish(
        self, index: int, posterior: Posterior, batch_mean: Tensor, batch_var: Tensor
    ) -> None:
        """Record layer ``index``'s statistics for the layers it feeds in this pass."""
        state = self._state
        if index == len(self.layers) - 1 and self.flow == "execution":
            self.reset()  # (a data flow's hand-over ends with the root's forward)
            return
        state.index = index
        state.posterior = posterior
        if self.flow != "execution":
            if state.published is None:
                state.published = [self.frozen.get(i) for i in range(len(self.layers))]
            var = posterior.var
            if var.dim() == posterior.mean.dim() + 1:
                var = var.diagonal(dim1=-2, dim2=-1)
            state.ran += state.published[index] is None
            state.published[index] = Published(batch_mean, batch_var, posterior.mean, var)
            if state.ran == len(self.layers) - len(self.frozen):
                # The last layer has run, so no layer reads this pass's statistics again: drop
                # them now, inside the forward, rather than in the root's forward hook. (Under
                # torch.compile(model) the hook runs after the compiled frame, which then returns
                # every published and memoised tensor as an output whose gradient autograd fills
                # with zeros: ResNet-50, 492 zero-filled gradients per backward.)
                self.reset()
                state.complete = True

    # -- attaching to a model -----------------------------------------------------------------

    def attach(self, root: nn.Module) -> None:
        """Bind the layers to this chain and reset the hand-over at each forward of ``root``."""
        for index, (layer, name) in enumerate(zip(self.layers, self.names)):
            layer.join_chain(self, index, name)
        self._hooks = [
            root.register_forward_pre_hook(self.reset),
            root.register_forward_hook(self.reset),
        ]

    def freeze(self, layer: ChainMember, mean: Tensor, var: Tensor) -> None:
        """Publish fixed statistics for ``layer`` in every pass: it has been folded into a
        convolution and no longer runs, but the layers it fed still predict from it."""
        fixed = (mean.detach().unsqueeze(0), var.detach().unsqueeze(0))
        self.frozen[self.layers.index(layer)] = Published(*fixed, *fixed)

    def reattach(self, root: nn.Module) -> None:
        """Reset the hand-over at each forward of another root (a folded copy of the model)."""
        self.remove_hooks()
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


def _keep(t: Tensor) -> Tensor:
    return t


def recomputing() -> bool:
    """Whether a module's forward runs inside a backward pass: activation checkpointing
    (``torch.utils.checkpoint``) recomputing a segment to recreate the tensors it saved.

    A layer recomputed so must reproduce its original output and leave every state (chain
    hand-over, moving averages, step counters) as it is.
    """
    return not torch.compiler.is_compiling() and _torch_private.in_backward()


def check_recomputation(layer_name: str) -> None:
    """Refuse a recomputation other than non-reentrant checkpointing's for a linked layer.

    ``torch.utils.checkpoint(..., use_reentrant=True)`` runs the segment without a graph and
    re-runs it in the backward as a new graph whose gradients never reach the statistics handed
    over from the layers before it: the prior's gradient would be lost silently.
    """
    if not _torch_private.is_checkpoint_recomputation():
        raise RuntimeError(
            f"{layer_name} ran its forward inside a backward pass other than a non-reentrant "
            f"activation-checkpoint recomputation. With torch.utils.checkpoint pass "
            f"use_reentrant=False: the reentrant variant cuts the statistics one Kalman layer "
            f"hands to the next out of the gradient."
        )


def _kalman_layers(root: nn.Module) -> list[tuple[str, ChainMember]]:
    return [(n, m) for n, m in root.named_modules() if is_chain_member(m)]


# -- which convolution feeds a layer (shared by the Kalman chain and Cross-Iteration BN) ---------

#: Module types whose weight maps inputs to a normalization layer's channels.
WEIGHTED_LAYERS: tuple[type[nn.Module], ...] = (_torch_private.ConvNd, nn.Linear)


class FedLayer(NamedTuple):
    """A selected layer, its qualified name, and the convolution/linear layer feeding it."""

    name: str
    layer: nn.Module
    feeding: nn.Module | None


def feeds(module: nn.Module, num_features: int) -> bool:
    """Whether ``module`` is a convolution/linear layer with ``num_features`` output channels."""
    if isinstance(module, _torch_private.ConvNd):
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
    dataflow.run_passing_through(root, example_input, handles)
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


def link_chain(
    root: nn.Module,
    example_input: object = None,
    *,
    flow: str | None = None,
    source: str = "batch",
) -> KalmanChain:
    """Link every Kalman layer of ``root`` into one chain and return it.

    ``flow="data"`` (default) and ``"authors"`` give each layer the moments of the tensor that
    really feeds it (module docstring); they need one traced forward pass: on ``example_input``
    (a tensor, a tuple of positional arguments or a dict of keyword arguments) now, or, without
    it, on the model's first forward call (until then the chain is provisional, in registration
    order). ``flow="execution"`` links each layer to the one that ran before it, traced from
    ``example_input`` or in module registration order. A trace runs under ``torch.no_grad`` with
    the Kalman layers passing their input through, and restores every buffer of ``root``.

    Relinking replaces the chain the layers were in; a layer keeps its learned Kalman parameters
    when their shapes are unchanged, else they are created anew. Layers whose input the moments
    cannot follow use their batch statistics, with one warning for the model. ``flow=None``:
    ``"data"`` when every layer's statistics are per channel (BKN), else ``"execution"`` (GKN's
    per-sample channel-group statistics have no data-flow prior).
    """
    chain = _link(root, example_input, flow, source)
    for callback in AFTER_LINK:
        callback()
    return chain


def _link(root: nn.Module, example_input: object, flow: str | None, source: str) -> KalmanChain:
    members = _kalman_layers(root)
    per_channel = all(getattr(m, "per_channel_statistics", False) for _, m in members)
    if flow is None:
        flow = "data" if per_channel else "execution"
    if flow != "execution" and not per_channel:
        kinds = sorted({type(m).__name__ for _, m in members if not m.per_channel_statistics})
        raise ValueError(
            f"flow={flow!r} predicts per-channel statistics, but {', '.join(kinds)} normalises "
            f"per sample and channel group: link with flow='execution'."
        )
    if flow not in FLOWS:
        raise ValueError(f"flow must be one of {FLOWS}, got {flow!r}")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    for _, layer in _kalman_layers(root):
        if layer.chain is not None:
            layer.chain.remove_hooks()
    if flow == "execution":
        found, order = find_feeding_layers(
            root, is_chain_member, example_input, kind="Kalman layer"
        )
        chain = KalmanChain(
            [entry.layer for entry in found],
            [entry.name for entry in found],
            [entry.feeding for entry in found],
            order,
        )
        chain.attach(root)
        return chain
    if example_input is None:
        return _provisional_chain(root, flow, source)
    traced = dataflow.trace(root, example_input, is_chain_member)
    programs, reasons = dataflow.compile_programs(traced)
    chain = KalmanChain(
        traced.layers,
        traced.names,
        [None] * len(traced.layers),
        "traced",
        flow=flow,
        programs=programs,
        source=source,
    )
    chain.attach(root)
    _warn_unmodelled(traced.names, reasons)
    return chain


def _provisional_chain(root: nn.Module, flow: str, source: str) -> KalmanChain:
    """A chain in registration order (every layer but the first with an upstream) that traces
    the data flow on the root's first forward call and relinks itself."""
    members = _kalman_layers(root)
    programs = [None] + [_PENDING] * (len(members) - 1)
    chain = KalmanChain(
        [m for _, m in members], [n for n, _ in members], [None] * len(members),
        "registration (the data flow is traced on the first forward call)",
        flow=flow, programs=programs, source=source,
    )  # fmt: skip
    chain.attach(root)
    chain._hooks.append(
        root.register_forward_pre_hook(_TraceOnFirstCall(chain, flow, source), with_kwargs=True)
    )
    return chain


class _TraceOnFirstCall:
    """Forward pre-hook of a provisional chain: trace the data flow on the first call and relink.

    A callable object rather than a closure, so that ``copy.deepcopy`` of the model gives the copy
    a hook bound to the copy's chain.
    """

    def __init__(self, chain: KalmanChain, flow: str, source: str) -> None:
        self.chain, self.flow, self.source = chain, flow, source

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not any(layer.chain is self.chain for layer in self.chain.layers):
            return  # relinked since
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "the Kalman chain traces the model's data flow on its first forward call, which "
                "cannot run under torch.compile: pass example_input to kalmannorm.convert_norm / "
                "link_chain (or run one eager forward) before compiling."
            )
        if kwargs and args:
            raise ValueError(
                "the first forward call passed both positional and keyword arguments; link the "
                "chain explicitly with kalmannorm.link_chain(model, example_input=...)"
            )
        example = kwargs if kwargs else (args[0] if len(args) == 1 else args)
        link_chain(module, example, flow=self.flow, source=self.source)


class _Pending(dataflow.Node):
    """Placeholder program of a provisional chain: no prior until the data flow is traced."""

    def evaluate(self, ctx: dataflow.Context, reader: str) -> None:  # type: ignore[override]
        return None

    def producers(self) -> set[int]:
        return set()


_PENDING = _Pending()


def _warn_unmodelled(names: Sequence[str], reasons: Sequence[str | None]) -> None:
    """One warning for all layers whose input the moments cannot follow."""
    failed = [(n, r) for n, r in zip(names, reasons) if r is not None]
    if not failed:
        return
    shown = "; ".join(f"{n} ({r})" for n, r in failed[:4])
    more = f" and {len(failed) - 4} more" if len(failed) > 4 else ""
    ops = sorted({r for _, r in failed})
    warnings.warn(
        f"{len(failed)} of {len(names)} Kalman layers use their batch statistics alone: their "
        f"input passes through operations the data-flow moments do not model ({', '.join(ops)}): "
        f"{shown}{more}.",
        stacklevel=3,
    )
