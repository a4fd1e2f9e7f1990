"""The paper's central claim as a number: how accurately each layer estimates its statistics.

BKN is motivated by "more accurate estimation" of each layer's statistics from micro-batches. We
measure it directly. For layer k, forward the data set in statistics groups of s samples
(:func:`kalmannorm.lab.analysis.collect_statistics`) and compare the statistics each group is
normalised with, (mu_g, v_g) (BatchNorm: the group's batch mean and biased variance; BKN/GKN: the
posterior), against the population statistics (mu_pop, sigma^2_pop) of the same layer's input over
the whole data set, with the same weights and the same forward:

    mean error      e_mu  = mean_{g,c} |mu_{g,c} - mu_{pop,c}| / sqrt(sigma^2_{pop,c} + eps)
    variance error  e_var = mean_{g,c} |v_{g,c} - sigma^2_{pop,c}| / (sigma^2_{pop,c} + eps)

(the mean error in population standard deviations, the variance error relative). The same two
numbers for the groups' own batch statistics (xbar_g, S_g) are reported beside them, so a Kalman
layer's posterior can be compared with the micro-batch estimate it refines. Units whose
denominator is zero (a dead channel) are left out. ``eps`` defaults to 0; pass the layers' eps to
measure the error of what is actually divided by.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kalmannorm.lab.analysis.batches import DataSource
from kalmannorm.lab.analysis.statistics import LayerStatistics, collect_statistics

#: Error columns of a row, averaged over layers in the overall rows.
ERROR_KEYS = ("mean_error", "var_error", "batch_mean_error", "batch_var_error")


def mean_error(mean: Tensor, population_mean: Tensor, population_var: Tensor, eps: float = 0.0):
    """mean_{g,c} |mu_{g,c} - mu_{pop,c}| / sqrt(sigma^2_{pop,c} + eps) for ``mean`` (G, W)."""
    scale = (population_var.to(torch.float64) + eps).sqrt()
    scale = torch.where(scale > 0, scale, torch.nan)
    error = (mean.to(torch.float64) - population_mean.to(torch.float64)).abs() / scale
    return float(error.nanmean())


def variance_error(var: Tensor, population_var: Tensor, eps: float = 0.0) -> float:
    """mean_{g,c} |v_{g,c} - sigma^2_{pop,c}| / (sigma^2_{pop,c} + eps) for ``var`` (G, W)."""
    scale = population_var.to(torch.float64) + eps
    scale = torch.where(scale > 0, scale, torch.nan)
    return float(
        ((var.to(torch.float64) - population_var.to(torch.float64)).abs() / scale).nanmean()
    )


def layer_estimation_error(stats: LayerStatistics, eps: float = 0.0) -> dict[str, Any]:
    """One row: the layer, its group size and the four errors (see the module docstring)."""
    pop_mean, pop_var = stats.population_mean, stats.population_var
    return {
        "layer": stats.name,
        "kind": stats.kind,
        "stat_batch_size": stats.group_size,
        "groups": stats.groups,
        "values_per_group": stats.count,
        "mean_error": mean_error(stats.mean, pop_mean, pop_var, eps),
        "var_error": variance_error(stats.var, pop_var, eps),
        "batch_mean_error": mean_error(stats.batch_mean, pop_mean, pop_var, eps),
        "batch_var_error": variance_error(stats.batch_var, pop_var, eps),
    }


@dataclass
class EstimationErrorTable:
    """``rows``: one per (statistics-batch size, layer); ``overall``: one per statistics-batch
    size, each error averaged over the layers."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    overall: list[dict[str, Any]] = field(default_factory=list)


def _overall(rows: Sequence[dict[str, Any]], stat_batch_size: int | None) -> dict[str, Any]:
    summary: dict[str, Any] = {"stat_batch_size": stat_batch_size, "layers": len(rows)}
    for key in ERROR_KEYS:
        values = torch.tensor([row[key] for row in rows], dtype=torch.float64)
        summary[key] = float(values.nanmean()) if len(rows) else float("nan")
    return summary


def estimation_error_table(
    statistics: Mapping[str, LayerStatistics],
    *,
    eps: float = 0.0,
    stat_batch_size: int | None = None,
) -> EstimationErrorTable:
    """Rows of :func:`layer_estimation_error` for collected statistics, and their mean.

    ``stat_batch_size`` labels the overall row (the rows carry each layer's own group size).
    """
    rows = [layer_estimation_error(stats, eps) for stats in statistics.values()]
    return EstimationErrorTable(rows, [_overall(rows, stat_batch_size)])


def measure_estimation_error(
    model: nn.Module,
    data: DataSource,
    stat_batch_sizes: Sequence[int | None] = (None,),
    *,
    eps: float = 0.0,
    **collect_options: Any,
) -> EstimationErrorTable:
    """Estimation errors of every layer of ``model`` for each statistics-batch size.

    Each size forwards ``data`` once (``None``: every layer's own group size). ``collect_options``
    go to :func:`~kalmannorm.lab.analysis.collect_statistics` (``batch_size``, ``max_samples``,
    ``layers``, ``device``).
    """
    table = EstimationErrorTable()
    for size in stat_batch_sizes:
        statistics = collect_statistics(model, data, stat_batch_size=size, **collect_options)
        part = estimation_error_table(statistics, eps=eps, stat_batch_size=size)
        table.rows += part.rows
        table.overall += part.overall
    return table
