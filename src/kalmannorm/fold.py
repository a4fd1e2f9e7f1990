"""Inference folding: normalization with fixed statistics becomes free.

In eval mode with moving statistics, BatchNorm, BKN and every other norm that keeps BatchNorm's
``running_mean``/``running_var``/``weight``/``bias`` is a per-channel affine map

    y = x * a + b,   a = gamma / sqrt(running_var + eps),   b = beta - running_mean * a.

:func:`fold` traces the model with ``torch.fx``; where such a norm reads the output of a
convolution used by nothing else, it is folded into that convolution (W' = a W, b' = a b_conv + b);
every other such norm becomes a :class:`ChannelAffine`. Models that ``torch.fx`` cannot trace
(data-dependent control flow) get the :class:`ChannelAffine` replacement only. The result is a plain
model with no Kalman layer, whose outputs equal the eval-mode model's.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from kalmannorm._torch_private import ConvNd, ConvTransposeNd, NormBase
from kalmannorm.layers.ghost_batch import evaluates_with_batch


class ChannelAffine(nn.Module):
    """y = x * scale + shift per channel (dim 1): a folded norm that had no convolution to join."""

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x: Tensor) -> Tensor:
        view = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(self.shift.view(view), x, self.scale.view(view))


def _is_foldable(module: nn.Module) -> bool:
    """A norm whose eval output is the affine map of its moving statistics."""
    if not isinstance(module, NormBase) or module.running_var is None:
        return False
    return not evaluates_with_batch(module)


def _affine_of(norm: NormBase) -> tuple[Tensor, Tensor]:
    if hasattr(norm, "eval_affine"):  # a norm whose eval map is not BatchNorm's (MABN)
        return norm.eval_affine()
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    return scale.detach().clone(), shift.detach().clone()


def _fold_into_conv(conv: ConvNd, scale: Tensor, shift: Tensor) -> nn.Module:
    folded = copy.deepcopy(conv)
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    if isinstance(conv, ConvTransposeNd):
        # Transposed weights are (C_in, C_out / groups, ...): scale the output-channel dim.
        weight = conv.weight.unflatten(0, (conv.groups, -1))
        weight = weight * scale.view(conv.groups, 1, -1, *(1,) * (conv.weight.dim() - 2))
        weight = weight.flatten(0, 1)
    else:
        weight = conv.weight * scale.view(shape)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    folded.weight = nn.Parameter(weight.detach(), requires_grad=False)
    folded.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return folded


def _replace_with_affine(model: nn.Module) -> nn.Module:
    if _is_foldable(model):
        return ChannelAffine(*_affine_of(model))
    for name, child in list(model._modules.items()):
        if child is not None:
            setattr(model, name, _replace_with_affine(child))
    return model


class _NormLeafTracer(torch.fx.Tracer):
    """Keeps every norm (and Kalman layer) whole in the traced graph."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        from kalmannorm.layers.base import KalmanNormBase

        if isinstance(module, (NormBase, KalmanNormBase)):
            return True
        return super().is_leaf_module(module, qualified_name)


def fold(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference with every fixed-statistics norm folded away.

    Norms that normalise with batch statistics at inference (GroupNorm, GroupKalmanNorm, a BKN
    set to ``eval_statistics="batch"`` or left at ``"auto"`` with ``stat_batch_size=1``, ...)
    are kept as they are; ``set_eval_statistics(model, "moving")`` first folds those too. The
    copy is in eval mode.
    """
    model = copy.deepcopy(model).eval()
    try:
        tracer = _NormLeafTracer()
        graph = torch.fx.GraphModule(model, tracer.trace(model))
    except Exception:  # untraceable control flow: no convolution fusion, affine maps only
        kept = _replace_with_affine(model)
        _keep_chains_working(model, kept)
        return kept
    modules = dict(graph.named_modules())
    calls: dict[str, int] = {}
    for node in graph.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(graph.graph.nodes):
        if node.op != "call_module" or not _is_foldable(modules[node.target]):
            continue
        source = node.args[0]
        conv = modules.get(source.target) if getattr(source, "op", None) == "call_module" else None
        norm = modules[node.target]
        scale, shift = _affine_of(norm)
        alone = conv is not None and len(source.users) == 1 and calls[source.target] == 1
        if isinstance(conv, ConvNd) and alone:
            _set_submodule(graph, source.target, _fold_into_conv(conv, scale, shift))
            node.replace_all_uses_with(source)
            graph.graph.erase_node(node)
        else:
            _set_submodule(graph, node.target, ChannelAffine(scale, shift))
    graph.graph.lint()
    graph.delete_all_unused_submodules()
    graph.recompile()
    _keep_chains_working(model, graph)
    return graph


def _keep_chains_working(model: nn.Module, folded: nn.Module) -> None:
    """Kalman layers kept (batch statistics at inference) still predict from the layers folded
    away: those publish their moving statistics in every pass of the folded model."""
    kept = {id(m) for m in folded.modules()}
    chains: dict[int, object] = {
        id(m.chain): m.chain for m in model.modules() if getattr(m, "chain", None) is not None
    }
    for chain in chains.values():
        if not any(id(layer) in kept for layer in chain.layers):
            continue
        for layer in chain.layers:
            # (a GKN layer removed as unused in eval, an auxiliary head's, publishes nothing)
            if id(layer) not in kept and getattr(layer, "running_mean", None) is not None:
                chain.freeze(layer, layer.running_mean, layer.running_var)
        chain.reattach(folded)


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, name, module)
