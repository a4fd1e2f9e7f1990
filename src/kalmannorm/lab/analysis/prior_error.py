"""``kalmannorm analyze prior-error``: how well each Kalman layer's prior predicts its statistics.

The measurement is the library's (:func:`kalmannorm.diagnostics.prior_errors`); this module
feeds it a run's data and writes the table and the plot.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from torch import Tensor, nn

from kalmannorm.diagnostics import PriorError, prior_errors, summarize_by_category
from kalmannorm.lab.analysis.plotting import new_figure, save_figure


def measure_prior_error(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], max_batches: int = 8
) -> list[PriorError]:
    """Prior errors of ``model`` over up to ``max_batches`` of ``batches`` (images, labels)."""
    inputs = []
    for x, _ in batches:
        inputs.append(x)
        if len(inputs) == max_batches:
            break
    return prior_errors(model, inputs)


def _cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def prior_error_markdown(rows: Sequence[PriorError], per_layer: bool = True) -> str:
    """The categories' means, then (``per_layer``) one row per layer."""
    head = ("| {} | mean err vs batch | log-var err vs batch | mean err vs population "
            "| log-var err vs population |")  # fmt: skip
    lines = [head.format("category"), "|---|---|---|---|---|"]
    for category, values in summarize_by_category(rows).items():
        lines.append(f"| {category} | " + " | ".join(_cell(v) for v in values) + " |")
    if per_layer:
        lines += ["", head.format("layer (category)"), "|---|---|---|---|---|"]
        for row in rows:
            cells = " | ".join(map(_cell, row[2:]))
            lines.append(f"| {row.name} ({row.category}) | {cells} |")
    return "\n".join(lines)


def write_prior_error_plot(rows: Sequence[PriorError], path: str | Path) -> Path:
    """Per layer, in chain order: the mean and log-variance errors against the batch."""
    shown = [r for r in rows if not math.isnan(r.mean_vs_batch)]
    figure = new_figure(max(6.0, 0.25 * len(shown)), 3.5)
    axes = figure.add_subplot(1, 1, 1)
    positions = range(len(shown))
    axes.plot(positions, [r.mean_vs_batch for r in shown], "o-", label="|mean| / batch std")
    axes.plot(positions, [r.var_vs_batch for r in shown], "s-", label="|log var ratio|")
    axes.set_xticks(list(positions), [r.name for r in shown], rotation=90, fontsize=6)
    axes.set_ylabel("prior error against the batch")
    axes.legend()
    return save_figure(figure, path)
