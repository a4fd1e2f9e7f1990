"""How well each Kalman layer's prior predicts its statistics.

For every Kalman layer and every statistics group, the prior's error against the group's batch
statistics and against the population statistics of the layer's input (its moments over all
batches given), in batch standard deviations for the mean and as |log variance ratio|:

    mean error = |mu^{k|k-1} - m| / sqrt(v),   variance error = |log(sigma^2_{k|k-1} / v)|,

with (m, v) the group's batch mean and variance (``against="batch"``) or the population's
(``against="population"``). Each is the median over channels and groups of a layer.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from kalmannorm import dataflow
from kalmannorm.chain import is_chain_member
from kalmannorm.layers.base import KalmanNormBase

CATEGORIES = ("first", "branch", "after addition", "after downsampling", "other")
#: Operations a layer's category looks through to what they read.
_PASSING = ("conv", "activation", "pool", "affine", "dropout")


class PriorError(NamedTuple):
    """Median prior errors of one layer (``nan`` where the layer has no prior)."""

    name: str
    category: str
    mean_vs_batch: float
    var_vs_batch: float
    mean_vs_population: float
    var_vs_population: float


def layer_category(program: dataflow.Node | None, index: int) -> str:
    """Where a layer sits: first (no prior), inside a branch, after a residual addition, or after
    the addition of a block whose shortcut is a projection (downsampling)."""
    if program is None:
        return "first" if index == 0 else "other"
    while (  # a norm after a convolution reads what the convolution reads
        isinstance(program, dataflow.Operation)
        and program.op in _PASSING
        and len(program.children) == 1
    ):
        program = program.children[0]
    if isinstance(program, dataflow.Operation) and program.op == "sum":
        projected = any(
            isinstance(c, dataflow.Operation) and c.op == "conv" for c in program.children
        ) and all(isinstance(c, dataflow.Operation) and c.op == "conv" for c in program.children)
        return "after downsampling" if projected else "after addition"
    return "branch"


def _median(values: Tensor) -> float:
    values = values[torch.isfinite(values)]
    return float(values.median()) if values.numel() else math.nan


def prior_errors(model: nn.Module, batches: Sequence[Tensor]) -> list[PriorError]:
    """Run ``model`` in training mode on each batch (no gradients, buffers restored) and return
    every Kalman layer's median prior errors, averaged over the batches; categories come from the
    model's data flow (traced on the first batch), whatever the chain's flow."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, KalmanNormBase)]
    saved = {name: buf.clone() for name, buf in model.named_buffers()}
    was_training = model.training
    sums: dict[str, list[Tensor]] = {n: [] for n, _ in layers}
    squares: dict[str, list[Tensor]] = {n: [] for n, _ in layers}
    records: dict[str, list[tuple[Tensor, ...]]] = {n: [] for n, _ in layers}
    handles = []

    def capture(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().double()
            dims = [0, *range(2, x.dim())]
            sums[name].append(x.mean(dims))
            squares[name].append(x.square().mean(dims))

        return hook

    for name, layer in layers:
        handles.append(layer.register_forward_pre_hook(capture(name)))
    model.train()
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
                for name, layer in layers:
                    s = layer.last_statistics
                    if s is not None and s.prior_mean is not None:
                        records[name].append((s.batch_mean, s.batch_var, s.prior_mean, s.prior_var))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(saved[name])
    traced = dataflow.trace(model, batches[0], is_chain_member)
    programs, _ = dataflow.compile_programs(traced)
    where = {n: layer_category(p, i) for i, (n, p) in enumerate(zip(traced.names, programs))}
    rows = []
    for name, _ in layers:
        if not records[name]:
            rows.append(PriorError(name, where[name], *(math.nan,) * 4))
            continue
        pop_mean = torch.stack(sums[name]).mean(0)
        pop_var = torch.stack(squares[name]).mean(0) - pop_mean.square()
        errors = [[], [], [], []]
        for batch_mean, batch_var, prior_mean, prior_var in records[name]:
            bm, bv = batch_mean.double(), batch_var.double()
            pm, pv = prior_mean.double(), prior_var.double()
            errors[0].append(_median((pm - bm).abs() / bv.sqrt()))
            errors[1].append(_median((pv / bv).log().abs()))
            errors[2].append(_median((pm - pop_mean).abs() / pop_var.sqrt()))
            errors[3].append(_median((pv / pop_var).log().abs()))
        rows.append(PriorError(name, where[name], *(statistics.fmean(e) for e in errors)))
    return rows


def summarize_by_category(rows: Iterable[PriorError]) -> dict[str, tuple[float, ...]]:
    """Mean of each error over the layers of a category (layers without a prior left out)."""
    grouped: dict[str, list[PriorError]] = {}
    for row in rows:
        if not math.isnan(row.mean_vs_batch):
            grouped.setdefault(row.category, []).append(row)
    return {
        category: tuple(
            statistics.fmean(getattr(r, f) for r in members) for f in PriorError._fields[2:]
        )
        for category, members in grouped.items()
    }
