"""The measurements of the report, taken from finished grids and their trained models.

Everything here reads run folders written by ``kalmannorm compare`` (``summary.json``,
``metrics.jsonl``, ``checkpoint.pt``) and returns plain rows; nothing trains. The statistics
analyses (variance gap, estimation error) forward training images without augmentation through
the trained models of seed 0 (:func:`seed_run`), as the paper's Fig. 8 does with CIFAR-10.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from kalmannorm.lab import analysis
from kalmannorm.lab.analysis.run import LoadedRun, load_run
from kalmannorm.lab.train.compare import CompareConfig, RunSpec, run_status, searched_grid
from kalmannorm.lab.train.loop import SUMMARY


@dataclass
class Cell:
    """Final test accuracies (fractions) of one (norm, gradient batch, statistics batch) over
    seeds, with moving and with batch statistics."""

    label: str
    norm: str
    batch_size: int
    stat_batch_size: int | None  # None: batch-independent (or the whole forward batch)
    moving: list[float] = field(default_factory=list)
    batch: list[float] = field(default_factory=list)
    precise: list[float] = field(default_factory=list)  # PreciseBN, where the runs measured it
    wall_time_s: list[float] = field(default_factory=list)

    @property
    def seeds(self) -> int:
        return len(self.moving)

    def mean(self, mode: str = "moving") -> float:
        return statistics.fmean(getattr(self, mode))

    def std(self, mode: str = "moving") -> float:
        values = getattr(self, mode)
        return statistics.stdev(values) if len(values) > 1 else 0.0

    def sem(self, mode: str = "moving") -> float:
        """Standard error of the mean over seeds."""
        return self.std(mode) / math.sqrt(self.seeds) if self.seeds else math.nan


def collect_cells(cfg: CompareConfig) -> dict[tuple[str, int | None], Cell]:
    """The finished runs of a grid (with its search's picks), by (label, statistics batch)."""
    cells: dict[tuple[str, int | None], Cell] = {}
    for spec in searched_grid(cfg):
        if run_status(spec) != "finished":
            continue
        summary = json.loads((spec.folder / SUMMARY).read_text())
        cell = cells.setdefault(
            spec.group,
            Cell(
                spec.variant.label,
                spec.variant.norm,
                spec.config.batch_size,
                spec.stat_batch_size,
            ),
        )
        cell.moving.append(summary["final"]["test_acc_moving"])
        cell.batch.append(summary["final"]["test_acc_batch"])
        if "test_acc_precise" in summary["final"]:
            cell.precise.append(summary["final"]["test_acc_precise"])
        cell.wall_time_s.append(summary["wall_time_s"])
    return cells


def seed_run(cfg: CompareConfig, label: str, stat_batch_size: int | None) -> RunSpec | None:
    """The finished run of ``label`` at ``stat_batch_size`` with the grid's first seed."""
    for spec in searched_grid(cfg):
        if (
            spec.variant.label == label
            and spec.stat_batch_size == stat_batch_size
            and spec.seed == cfg.seeds[0]
            and run_status(spec) == "finished"
        ):
            return spec
    return None


def training_images(run: LoadedRun) -> Any:
    """The run's training images in order, unaugmented (its test images when the data set
    cannot give them in order)."""
    ordered = getattr(run.data, "train_batches_in_order", None)
    return ordered if ordered is not None else run.data.test_batches


def batch_dependent(cells: Iterable[Cell]) -> list[str]:
    """Labels whose runs depend on the statistics batch, in first-seen order."""
    return list(dict.fromkeys(c.label for c in cells if c.stat_batch_size is not None))


@dataclass
class VarianceGapResult:
    """Fig. 8 for one model: per-layer gaps and the model's label and statistics batch."""

    label: str
    stat_batch_size: int
    gaps: dict[str, analysis.VarianceGap]


def variance_gap_for(
    spec: RunSpec, *, max_samples: int | None, batch_size: int = 256
) -> VarianceGapResult:
    """Forward the run's training images in its statistics groups; each layer's gap between
    the variance each group normalises with and the moving variance."""
    run = load_run(spec.folder)
    s = spec.stat_batch_size or 1
    gaps = analysis.measure_variance_gap(
        run.model,
        training_images(run),
        stat_batch_size=s,
        max_samples=max_samples,
        batch_size=batch_size,
    )
    return VarianceGapResult(spec.variant.label, s, gaps)


def estimation_error_rows(
    cfg: CompareConfig,
    labels: Sequence[str],
    *,
    max_samples: int | None,
    batch_size: int = 256,
) -> list[dict[str, Any]]:
    """For each label and statistics batch of the grid: the seed-0 model trained at that size,
    the error of the statistics its layers normalise with (and of the groups' own batch
    statistics) against the population statistics of the same layers over the training
    images, averaged over layers (:mod:`kalmannorm.lab.analysis.estimation_error`)."""
    rows = []
    for label in labels:
        for s in cfg.stat_batch_sizes:
            spec = seed_run(cfg, label, s)
            if spec is None:
                continue
            run = load_run(spec.folder)
            table = analysis.measure_estimation_error(
                run.model,
                training_images(run),
                (s,),
                max_samples=max_samples,
                batch_size=max(batch_size // s, 1) * s,
            )
            rows.append({"norm": label, **table.overall[0]})
    return rows


def parameter_rows(models: dict[str, nn.Module], reference: str) -> list[dict[str, Any]]:
    """Table 3 (right): parameter counts of the models, relative to ``reference``."""
    return analysis.compare_parameters(models, reference)


def gain_of(spec: RunSpec) -> dict[str, analysis.LayerGain]:
    """The learned gain q, ||A||_F and R of every Kalman layer of a trained run."""
    return analysis.gain_snapshot(load_run(spec.folder).model)


def model_of(spec: RunSpec) -> nn.Module:
    return load_run(spec.folder).model
