"""The paper's Fig. 8: how far each group's normalising variance lies from the moving variance.

For layer k, channel c and statistics group g (forwarding a data set in groups, see
:func:`kalmannorm.lab.analysis.collect_statistics`), with v_g the variance the layer normalises
group g with (BatchNorm: the biased batch variance S_g; BKN: the posterior variance
diag Sigma^{k|k}_g) and v_moving the layer's moving variance ``running_var`` (what it normalises
with at inference):

    gap_{c,g}      = v_{g,c} - v_{moving,c}
    relative_{c,g} = (v_{g,c} - v_{moving,c}) / v_{moving,c}
    summary_k      = mean_{c,g} |relative_{c,g}|         (mean absolute relative gap)

BatchNorm's S_g is biased (what it divides by) while its moving variance averages the unbiased
m/(m-1) S_g, and BKN's moving variance likewise averages diag Sigma^{k|k}_g + q S_g/(m-1); with
m values per group the gap therefore includes a shift of about -1/m (BKN: -q/m), which matters
only for tiny groups without spatial extent. Channels whose moving variance is not positive
have no relative gap and are left out of the mean.

A small summary means training-time normalisation matches inference-time normalisation; the paper
shows BKN's posterior variances close to the moving ones where BN's micro-batch variances scatter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kalmannorm.lab.analysis.batches import DataSource
from kalmannorm.lab.analysis.plotting import new_figure, require_matplotlib, save_figure
from kalmannorm.lab.analysis.statistics import LayerStatistics, collect_statistics


@dataclass
class VarianceGap:
    """Variance gap of one layer; ``gap`` and ``relative`` are (channels, groups), float64."""

    name: str
    kind: str
    moving_var: Tensor
    gap: Tensor
    relative: Tensor

    @property
    def summary(self) -> float:
        """Mean absolute relative gap over channels and groups (NaN entries left out)."""
        return float(self.relative.abs().nanmean())

    @property
    def channels(self) -> int:
        return self.gap.shape[0]

    @property
    def groups(self) -> int:
        return self.gap.shape[1]


def variance_gap(stats: LayerStatistics) -> VarianceGap:
    """The gap of one layer's normalising variances (``stats.var``) to its moving variance."""
    if stats.running_var is None:
        raise ValueError(f"layer '{stats.name}' ({stats.kind}) has no moving variance")
    moving = stats.running_var.to(torch.float64)
    gap = stats.var.to(torch.float64).T - moving.unsqueeze(1)
    denominator = torch.where(moving > 0, moving, torch.nan).unsqueeze(1)
    return VarianceGap(stats.name, stats.kind, moving, gap, gap / denominator)


def variance_gaps(statistics: Mapping[str, LayerStatistics]) -> dict[str, VarianceGap]:
    """:func:`variance_gap` of every layer that has a moving variance, by layer name."""
    return {
        name: variance_gap(stats)
        for name, stats in statistics.items()
        if stats.running_var is not None
    }


def measure_variance_gap(
    model: nn.Module, data: DataSource, **collect_options: Any
) -> dict[str, VarianceGap]:
    """Forward ``data`` in statistics groups and return each layer's variance gap.

    ``collect_options`` go to :func:`~kalmannorm.lab.analysis.collect_statistics`
    (``stat_batch_size``, ``batch_size``, ``max_samples``, ``layers``, ``device``).
    """
    return variance_gaps(collect_statistics(model, data, **collect_options))


def variance_gap_summary(gaps: Mapping[str, VarianceGap]) -> dict[str, float]:
    """Mean absolute relative gap per layer, by layer name."""
    return {name: gap.summary for name, gap in gaps.items()}


def write_variance_gap_heatmap(
    gaps: Mapping[str, VarianceGap],
    path: str | Path,
    *,
    max_groups: int = 64,
    vmax: float | None = None,
    title: str | None = None,
) -> Path:
    """Write one PNG with a heatmap of |relative gap| (channels x groups) per layer.

    Args:
        gaps: the layers' gaps (:func:`measure_variance_gap`), plotted in this order.
        path: the PNG file to write.
        max_groups: plot the first ``max_groups`` statistics groups of each layer.
        vmax: top of the colour scale; default the 99th percentile over all plotted values. Pass
            the same value for two models (BN vs BKN) to compare their figures.
        title: figure title.

    Raises:
        ImportError: matplotlib is not installed.
    """
    if not gaps:
        raise ValueError("no layer to plot")
    panels = {name: gap.relative[:, :max_groups].abs() for name, gap in gaps.items()}
    if vmax is None:
        values = torch.cat([p.flatten() for p in panels.values()])
        values = values[torch.isfinite(values)]
        vmax = float(torch.quantile(values, 0.99)) if values.numel() else 1.0
        vmax = vmax if vmax > 0 else 1.0
    ticker = require_matplotlib().ticker
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure = new_figure(4.2 * columns, 2.6 * rows + (0.4 if title else 0.0))
    axes = figure.subplots(rows, columns, squeeze=False)
    image = None
    for axis, (name, panel) in zip(axes.flat, panels.items()):
        image = axis.imshow(
            panel.numpy(),
            aspect="auto",
            interpolation="nearest",
            vmin=0.0,
            vmax=vmax,
            cmap="viridis",
        )
        axis.set_title(f"{name} ({gaps[name].kind}): mean {gaps[name].summary:.3f}", fontsize=8)
        axis.set_xlabel("statistics group", fontsize=7)
        axis.set_ylabel("channel", fontsize=7)
        axis.tick_params(labelsize=6)
        axis.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.colorbar(image, ax=axes, label="|v_g - v_moving| / v_moving", shrink=0.8)
    if title:
        figure.suptitle(title)
    return save_figure(figure, path)
