"""``kalmannorm reproduce``: train a budget's grids, measure the evidence, write the report.

1. Every grid of the budget runs through :func:`kalmannorm.lab.train.compare.compare`: finished runs
   are skipped and killed ones resumed, so the command can be stopped and started again.
2. The sweep cells, the settings grids and the widened-BN control are read from the run folders;
   the trained seed-0 models give Fig. 8 (variance gap), the estimation errors and the gain.
3. Optionally ``kalmannorm bench`` (no compile) times BKN against BN on this machine.
4. ``REPORT.md`` and its PNGs are written to ``out``.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from kalmannorm.lab import analysis
from kalmannorm.lab.reproduce import evidence
from kalmannorm.lab.reproduce.budget import Budget
from kalmannorm.lab.reproduce.budgets import BUDGETS, SETTINGS, WIDENED
from kalmannorm.lab.reproduce.figures import write_sweep_plot
from kalmannorm.lab.reproduce.report import (
    BKN,
    BKN_PROPAGATE,
    BN,
    KALMAN,
    Findings,
    cells_by_label,
    write_report,
)
from kalmannorm.lab.reproduce.residual import DISPLAY, FLOW
from kalmannorm.lab.reproduce.residual_report import (
    ResidualFindings,
    write_residual_report,
)
from kalmannorm.lab.train.compare import (
    CompareConfig,
    RunsFailedError,
    compare,
    make_search_grid,
    score_search,
)
from kalmannorm.lab.train.config import config_from_dict
from kalmannorm.lab.train.loop import prepare_run_folder
from kalmannorm.lab.train.plan import ConfigError
from kalmannorm.lab.train.search import Point, search_markdown


def select_grids(budget: Budget, names: Sequence[str] | None) -> dict[str, CompareConfig]:
    """The budget's grids, or the named ones (unknown names refused with the valid ones)."""
    if not names:
        return dict(budget.grids)
    unknown = [n for n in names if n not in budget.grids]
    if unknown:
        raise ConfigError(
            f"budget {budget.name!r} has no grid {unknown}; its grids: {', '.join(budget.grids)}"
        )
    return {n: budget.grids[n] for n in names}


def keep_norms(cfg: CompareConfig, labels: Sequence[str]) -> CompareConfig:
    """``cfg`` with only the norms (and baseline) whose label is in ``labels``."""
    return dataclasses.replace(
        cfg,
        norms=[v for v in cfg.norms if v.label in labels],
        baseline=cfg.baseline if cfg.baseline and cfg.baseline.label in labels else None,
    )


def override_training(cfg: CompareConfig, overrides: dict[str, Any]) -> CompareConfig:
    """``cfg`` with training keys replaced (``steps`` also sets the evaluation to the end), e.g.
    to check a paper-scale grid starts: ``{"steps": 2, "device": "cpu"}``."""
    train = {**cfg.train, **overrides}
    if "steps" in overrides:
        train["eval_every"] = overrides["steps"]
        train["warmup_steps"] = min(train.get("warmup_steps", 0), overrides["steps"])
        train.pop("epochs", None)
    config_from_dict(train)  # unknown keys and wrong types are refused before anything runs
    return dataclasses.replace(cfg, train=train)


def train_grids(grids: dict[str, CompareConfig], threads: int | None = None) -> list[str]:
    """Run every grid (skipping finished runs); the failures, as messages."""
    failures = []
    for name, cfg in grids.items():
        print(f"\n== grid {name}: {cfg.out}")
        try:
            compare(cfg, threads=threads)
        except RunsFailedError as error:
            failures.append(f"{name}: {error}")
    return failures


def gather(
    budget: Budget,
    grids: dict[str, CompareConfig],
    out: Path,
    *,
    header: dict[str, str],
    failures: list[str],
) -> Findings:
    """Read the grids' runs and measure the statistics evidence on the trained models."""
    findings = Findings(budget.name, header, failures=failures, notes=list(budget.notes))
    findings.table3_stat_batch = budget.table3_stat_batch
    findings.analysis_samples = budget.analysis_samples
    sweep_name = next((n for n in grids if len(grids[n].stat_batch_sizes) > 1), None)
    primary = sweep_name or next(iter(grids))
    sweep_cfg = grids[primary]
    findings.sweep = evidence.collect_cells(sweep_cfg)
    findings.sweep_batch_size = int(sweep_cfg.train.get("batch_size", 128))
    for name, cfg in grids.items():
        if name.startswith(SETTINGS):
            cells = evidence.collect_cells(cfg)
            if cells:
                g, s = int(cfg.train["batch_size"]), cfg.stat_batch_sizes[0]
                findings.settings[(g, s)] = cells_by_label(cells)
    if WIDENED in grids:
        widened = list(evidence.collect_cells(grids[WIDENED]).values())
        findings.widened = widened[0] if widened else None
        findings.widened_width = grids[WIDENED].train["model_options"].get("width")

    if findings.sweep and len(sweep_cfg.stat_batch_sizes) > 1:
        findings.figures["sweep"] = write_sweep_plot(findings.sweep, out / "sweep.png").name

    s = budget.table3_stat_batch
    pair = {label: evidence.seed_run(sweep_cfg, label, s) for label in (BN, *KALMAN)}
    models = {label: evidence.model_of(spec) for label, spec in pair.items() if spec}
    models.pop(BKN_PROPAGATE, None)  # its parameters are BN's (the prior uses the conv)
    if WIDENED in grids and findings.widened is not None:
        spec = evidence.seed_run(grids[WIDENED], findings.widened.label, s)
        if spec is not None:
            models["widened"] = evidence.model_of(spec)
    if BN in models:
        findings.parameters = evidence.parameter_rows(models, BN)

    results = [
        evidence.variance_gap_for(spec, max_samples=budget.analysis_samples)
        for spec in pair.values()
        if spec is not None
    ]
    findings.variance_gap = results
    if results:
        top = max(
            float(gap.relative.abs().nan_to_num(0).quantile(0.99))
            for r in results
            for gap in r.gaps.values()
        )
        for r in results:
            name = f"variance_gap_{r.label}"
            analysis.write_variance_gap_heatmap(
                r.gaps, out / f"{name}.png", vmax=top or 1.0, title=f"{r.label}, s={s}"
            )
            findings.figures[name] = f"{name}.png"

    labels = evidence.batch_dependent(findings.sweep.values())
    findings.estimation_error = evidence.estimation_error_rows(
        sweep_cfg, labels, max_samples=budget.analysis_samples
    )
    if pair.get(BKN) is not None:
        findings.gain = evidence.gain_of(pair[BKN])
        if findings.gain:
            analysis.write_gain_distribution_plot(
                findings.gain, out / "gain.png", title=f"BKN, s={s}: gain q per layer"
            )
            findings.figures["gain"] = "gain.png"
    return findings


def machine_line() -> str:
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.machine()} {platform.processor() or ''} CPU, {cores} cores, {device}; "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def reproduce(
    budget: str | Budget = "small",
    *,
    out: str | Path | None = None,
    runs: str | Path | None = None,
    grids: Sequence[str] | None = None,
    norms: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
    train: bool = True,
    bench: bool = False,
    bench_json: str | Path | None = None,
    threads: int | None = None,
    argv: Sequence[str] | None = None,
) -> Path:
    """Train the grids of ``budget`` (a name of :data:`BUDGETS` or a :class:`Budget`; unless
    ``train`` is False), gather the evidence and write ``out/REPORT.md``; returns its path.
    ``bench`` times BKN against BN here (no compile); ``bench_json`` reads a saved
    ``python -m kalmannorm.lab.bench --json PATH`` result instead. ``grids`` and ``norms`` (labels)
    select part of the budget; ``overrides`` replace training
    keys of every grid (e.g. ``{"steps": 2}`` to check that the paper budget starts)."""
    start = time.perf_counter()
    bench_saved = _read_bench_json(Path(bench_json)) if bench_json else None  # before any work
    if not isinstance(budget, Budget):
        if budget not in BUDGETS:
            raise ConfigError(f"unknown budget {budget!r}; budgets: {', '.join(BUDGETS)}")
        if runs and Path(runs).exists() and not Path(runs).is_dir():
            raise ConfigError(f"--runs {runs} is a file; give the folder of the grids")
        budget = BUDGETS[budget](runs) if runs else BUDGETS[budget]()
    selected = select_grids(budget, grids)
    if norms:
        selected = {n: keep_norms(c, norms) for n, c in selected.items()}
    if overrides:
        selected = {n: override_training(c, overrides) for n, c in selected.items()}
    out = Path(out) if out is not None else budget.report_dir
    prepare_run_folder(out)
    failures = train_grids(selected, threads) if train else []
    command = "kalmannorm reproduce " + shlex.join(argv if argv is not None else sys.argv[2:])
    header = {
        "command": command.strip(),
        "machine": machine_line(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "runs": str(budget.root),
    }
    if budget.name == "residual":
        read = {**selected, **budget.retired}
        return residual_report(budget, read, out, header, failures, bench_saved, start)
    findings = gather(budget, selected, out, header=header, failures=failures)
    if bench or bench_json:
        from kalmannorm.lab.bench import format_table, run_benchmark

        if bench_json:  # a saved `python -m kalmannorm.lab.bench --json PATH` result
            findings.bench = bench_saved
        else:
            # the report reads the classic rows; the micro rows take half an hour on 2 cores
            findings.bench = run_benchmark(compile=False, threads=1, sections=("classic", "norms"))
        findings.bench_table = format_table(findings.bench)
    seconds = time.perf_counter() - start
    findings.header["wall time of this command"] = f"{seconds / 60:.1f} min"
    findings.header["training time (sum over runs, 1 thread each)"] = (
        f"{training_minutes(findings):.0f} min"
    )
    span = training_span(selected)
    if span is not None:
        findings.header["training wall clock (periods in which runs trained)"] = span
    return write_report(findings, out / "REPORT.md")


def residual_report(
    budget: Budget,
    grids: dict[str, CompareConfig],
    out: Path,
    header: dict[str, str],
    failures: list[str],
    bench_saved: dict | None,
    start: float,
) -> Path:
    """The residual budget's REPORT.md: every grid's cells in one table (they share a folder)."""
    cells, searched, lines = {}, {}, []
    for config in grids.values():
        if config.search is None:
            cells.update(evidence.collect_cells(config))
        else:  # its picks are a table of their own; its runs at the recipe's lr join the rest
            picks, rows = score_search(make_search_grid(config))
            # a group whose search has not run has no pick: its recipe cell is not one
            chosen = {g: c for g, c in evidence.collect_cells(config).items() if g in picks}
            recipe = evidence.collect_cells(dataclasses.replace(config, search=None))
            searched.update(chosen)
            cells.update(recipe)
            if picks:
                lines += search_section(config, picks, rows, recipe, chosen)
    findings = ResidualFindings(cells, header, notes=list(budget.notes), failures=failures)
    findings.search, findings.searched = lines, searched
    if any(s is not None for _, s in cells):
        shown = ["bn", FLOW.label, "none", "gn"]
        findings.figure = write_sweep_plot(cells, out / "residual.png", shown, DISPLAY).name
    measured = budget.root / STEP_TIME_FILE  # experiments/residual_step.py, committed
    if bench_saved is None and measured.is_file():
        bench_saved = _read_bench_json(measured)
    if bench_saved:
        findings.step_time = residual_step_time(bench_saved)
    findings.secondary = (
        "The 4-layer CNN sweep (seven norms x seven statistics batches, 300 steps, measured "
        "before the data-flow chain): [small-cnn/REPORT.md](small-cnn/REPORT.md), written by "
        "`kalmannorm reproduce --budget small --out docs/results/small-cnn`."
    )
    findings.header["wall time of this command"] = f"{(time.perf_counter() - start) / 60:.1f} min"
    minutes = sum(sum(c.wall_time_s) for c in cells.values()) / 60
    findings.header["training time (sum over runs, 1 thread each)"] = f"{minutes:.0f} min"
    return write_residual_report(findings, out / "REPORT.md")


def search_section(
    cfg: CompareConfig,
    picks: dict[tuple, Point],
    rows: list,
    recipe: dict[tuple, evidence.Cell],
    chosen: dict[tuple, evidence.Cell],
) -> list[str]:
    """A grid's held-out search as report lines: every point's holdout accuracy (``rows`` of
    :func:`score_search`), then, for each pick other than the recipe, the test accuracy of the
    recipe's cell (``recipe``) beside the pick's (``chosen``)."""
    lines = [*search_markdown(rows, cfg.search.describe() if cfg.search else "").splitlines(), ""]
    for group, point in picks.items():
        before, after = recipe.get(group), chosen.get(group)
        if before is None or after is None or before.moving == after.moving:
            continue
        lines.append(
            f"- {DISPLAY.get(group[0], group[0])}: test accuracy (moving) with the recipe "
            f"{100 * before.mean():.2f} ± {100 * before.std():.2f} ({before.seeds} seeds), "
            f"with its pick {point.name} {100 * after.mean():.2f} ± {100 * after.std():.2f} "
            f"({after.seeds} seeds)."
        )
    return lines


#: The residual budget's step times per report label, beside its runs.
STEP_TIME_FILE = "step_time.json"


def residual_step_time(bench: dict) -> dict[str, float]:
    """Step time relative to BN per report label: from ``experiments/residual_step.py``'s file
    (rows with a ``label``: that label's ratio to ghost BN), or from a saved benchmark (its
    micro-batch rows where it has them, ``kalmannorm bench``'s ``micro.rows``: the median over
    its eager rows of the step-time ratio for bkn-flow)."""
    labelled = [r for r in bench.get("rows", []) if isinstance(r, dict) and "label" in r]
    if labelled:
        return {r["label"]: float(r["ratio"]) for r in labelled}
    ratios = {"bn": 1.0}
    micro = bench.get("micro")
    rows = micro.get("rows", []) if isinstance(micro, dict) else bench.get("rows", [])
    rows = [r for r in rows if isinstance(r, dict) and r.get("mode", "eager") == "eager"]
    flow = [
        r.get("ratio", r.get("step_ratio"))
        for r in rows
        if r.get("norm") == "bkn-flow" and ("ratio" in r or "step_ratio" in r)
    ]
    if flow:
        ratios[FLOW.label] = statistics.median(flow)
    return ratios


def _read_bench_json(path: Path) -> dict:
    """A saved ``python -m kalmannorm.lab.bench --json PATH`` result, or a ConfigError."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(
            f"--bench-json {path} does not read as a saved benchmark ({error}); write one with "
            f"python -m kalmannorm.lab.bench --json {path}"
        ) from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--bench-json {path} is not a saved benchmark (a JSON object)")
    return saved


#: Runs that end and start less than this apart (seconds) belong to one training period.
PERIOD_GAP_S = 600.0


def training_periods(
    intervals: list[tuple[float, float]], gap: float = PERIOD_GAP_S
) -> list[tuple[float, float]]:
    """Merge (start, end) intervals into periods: sorted, joined where less than ``gap`` apart."""
    periods: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if periods and start - periods[-1][1] < gap:
            periods[-1] = (periods[-1][0], max(periods[-1][1], end))
        else:
            periods.append((start, end))
    return periods


def training_span(grids: dict[str, CompareConfig]) -> str | None:
    """When the grids' finished runs trained: each period of training (runs that followed each
    other; a run's start is its summary file's time less its wall time) and their total length,
    ``None`` without runs."""
    intervals = []
    for config in grids.values():
        for summary in Path(config.out).glob("*/summary.json"):
            record = json.loads(summary.read_text())
            if record.get("status") != "finished":
                continue
            end = summary.stat().st_mtime
            intervals.append((end - record["wall_time_s"], end))
    if not intervals:
        return None
    periods = training_periods(intervals)
    minutes = sum(end - start for start, end in periods) / 60
    spans = ", ".join(
        f"{datetime.fromtimestamp(a, UTC):%Y-%m-%d %H:%M}-{datetime.fromtimestamp(b, UTC):%H:%M}"
        for a, b in periods
    )
    count = f" in {len(periods)} periods" if len(periods) > 1 else ""
    return f"{spans} UTC ({minutes:.0f} min{count})"


def training_minutes(findings: Findings) -> float:
    cells = [*findings.sweep.values(), *(c for s in findings.settings.values() for c in s.values())]
    if findings.widened is not None:
        cells.append(findings.widened)
    return sum(sum(c.wall_time_s) for c in cells) / 60
