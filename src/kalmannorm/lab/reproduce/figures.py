"""The report's own figure: final accuracy against the statistics batch (the paper's Figs. 3-7
in one plot). The other figures come from :mod:`kalmannorm.lab.analysis`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from kalmannorm.lab.analysis.plotting import new_figure, save_figure
from kalmannorm.lab.reproduce.evidence import Cell

MODES = (("moving", "moving statistics (population)"), ("batch", "batch statistics"))


def write_sweep_plot(
    cells: Mapping[tuple[str, int | None], Cell],
    path: str | Path,
    labels: Sequence[str] | None = None,
    display: Mapping[str, str] | None = None,
) -> Path:
    """Two panels (moving / batch statistics at test): mean final test accuracy ± std over
    seeds against the statistics batch (log scale), one line per norm; a batch-independent norm
    is a horizontal band. ``labels``: the norms to draw, in order (default: all); ``display``:
    the names the legend gives them.

    Raises:
        ImportError: matplotlib is not installed.
    """
    sizes = sorted({s for (_, s) in cells if s is not None})
    if not sizes:
        raise ValueError("no batch-dependent cell to plot")
    labels = list(dict.fromkeys(label for label, _ in cells)) if labels is None else labels
    display = display or {}
    figure = new_figure(12.0, 4.6)
    axes = figure.subplots(1, 2, sharey=True)
    for axis, (mode, title) in zip(axes, MODES):
        for index, label in enumerate(labels):
            color = f"C{index % 10}"  # one colour per norm, the same in both panels
            own = sorted(
                ((s, c) for (lab, s), c in cells.items() if lab == label and s is not None),
                key=lambda item: item[0],
            )
            if own:
                axis.errorbar(
                    [s for s, _ in own],
                    [100 * c.mean(mode) for _, c in own],
                    yerr=[100 * c.std(mode) for _, c in own],
                    marker="o",
                    markersize=4,
                    capsize=3,
                    color=color,
                    label=display.get(label, label),
                )
            elif (label, None) in cells:
                cell = cells[(label, None)]
                mean, std = 100 * cell.mean(mode), 100 * cell.std(mode)
                name = f"{display.get(label, label)} (any s)"
                axis.axhline(mean, color=color, linestyle="--", linewidth=1.2, label=name)
                axis.axhspan(mean - std, mean + std, color=color, alpha=0.15)
        axis.set_xscale("log", base=2)
        axis.set_xticks(sizes, [str(s) for s in sizes])
        axis.set_xlabel("statistics batch s (gradient batch fixed)")
        axis.set_title(f"final test accuracy, {title}")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%), mean ± std over seeds")
    axes[1].legend(fontsize=7, loc="lower right")
    return save_figure(figure, path)
