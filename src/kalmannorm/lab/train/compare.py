"""``kalmannorm compare``: a grid of runs (norms x statistics-batch sizes x seeds) and its table.

A compare configuration is a TOML file with a ``[compare]`` table and a ``[train]`` table of
training keys shared by every run::

    [compare]
    out = "runs/compare"
    norms = ["bn", "bkn", {norm = "bkn", label = "bkn-propagate", options = {prior = "propagate"}},
             {norm = "bkn", label = "bkn-lr100", train = {kalman_lr_scale = 100.0}}]
    stat_batch_sizes = [2]
    seeds = [0, 1, 2]
    baseline = "none"    # a run of this norm with the whole forward batch as one group
    jobs = 2             # runs in parallel processes

    [train]
    dataset = "fashion_mnist"
    batch_size = 128
    steps = 1000

A norm entry's ``train`` table overrides keys of ``[train]`` for that entry's runs (all but the
keys the grid sets per run: norm, norm_options, stat_batch_size, seed, out). An optional
``[search]`` table gives every norm entry the same small grid on a held-out split of the
training set first and trains each entry's best point (``lab/train/search.py``).

Each run is an ordinary ``kalmannorm train`` process with its own folder under ``out``; a run
whose folder already holds a finished run of the same configuration is skipped, a killed one is
resumed. The summary (``summary.md``, ``summary.csv``, ``curves.png``) reports final and best
test accuracy with moving and with batch statistics, mean ± std over seeds, and the steps each
configuration needed to reach the baseline's final accuracy.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kalmannorm.lab.errors import UserError
from kalmannorm.lab.train.config import (
    TrainConfig,
    config_from_dict,
    fingerprint,
    load_toml,
    save_config,
    to_toml,
)
from kalmannorm.lab.train.loop import CONFIG, SUMMARY, check_config, prepare_run_folder
from kalmannorm.lab.train.metrics import read_metrics
from kalmannorm.lab.train.model import takes_stat_batch_size, valid_norms
from kalmannorm.lab.train.plan import ConfigError
from kalmannorm.lab.train.search import Point, SearchConfig, parse_search, pick, search_markdown

COMPARE_KEYS = ("out", "norms", "stat_batch_sizes", "seeds", "baseline", "jobs")


class RunsFailedError(UserError, RuntimeError):
    """Some runs of a grid failed (the others are summarised all the same)."""

    exit_code = 1


#: Training keys a grid sets per run; a variant's ``train`` table cannot override them.
PER_RUN_KEYS = ("norm", "norm_options", "stat_batch_size", "seed", "out")


@dataclass(frozen=True)
class Variant:
    """A norm with options under a label (``"bkn"``, or bkn with ``prior="propagate"``), and
    training keys of its own on top of the grid's ``[train]`` table (``kalman_lr_scale``)."""

    norm: str
    label: str
    options: dict = field(default_factory=dict, hash=False, compare=False)
    train: dict = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def parse(cls, entry: str | dict) -> Variant:
        if isinstance(entry, str):
            return cls(entry, entry)
        shape = f"a norm entry is a name or a table {{norm, label, options, train}}, got {entry!r}"
        if not isinstance(entry, dict):
            raise ConfigError(shape)
        unknown = set(entry) - {"norm", "label", "options", "train"}
        if "norm" not in entry or unknown or not isinstance(entry["norm"], str):
            raise ConfigError(shape)
        for key in ("options", "train"):
            if not isinstance(entry.get(key, {}), dict):
                raise ConfigError(f"{shape}: {key} must be a table")
        if not isinstance(entry.get("label", ""), str):
            raise ConfigError(f"{shape}: label must be a string")
        train = dict(entry.get("train", {}))
        fixed = sorted(set(train) & set(PER_RUN_KEYS))
        if fixed:
            raise ConfigError(
                f"norm entry {entry.get('label', entry['norm'])!r}: the grid sets {fixed} for "
                f"each run; put norm options under 'options', other training keys under 'train'"
            )
        label = entry.get("label", entry["norm"])
        return cls(entry["norm"], label, dict(entry.get("options", {})), train)

    def to_toml(self) -> str | dict:
        if self.label == self.norm and not self.options and not self.train:
            return self.norm
        table = {"norm": self.norm, "label": self.label, "options": self.options}
        return {**table, "train": self.train} if self.train else table


@dataclass
class CompareConfig:
    train: dict[str, Any]  # training keys shared by all runs
    norms: list[Variant]
    stat_batch_sizes: list[int]
    seeds: list[int] = field(default_factory=lambda: [0])
    baseline: Variant | None = None
    jobs: int = 1
    out: str = "runs/compare"
    search: SearchConfig | None = None  # the [search] table: a grid on a holdout first

    @property
    def labels(self) -> list[str]:
        return [v.label for v in [*([self.baseline] if self.baseline else []), *self.norms]]

    def to_toml(self) -> str:
        table = {
            "out": self.out,
            "norms": [v.to_toml() for v in self.norms],
            "stat_batch_sizes": self.stat_batch_sizes,
            "seeds": self.seeds,
            "baseline": self.baseline.to_toml() if self.baseline else "",
            "jobs": self.jobs,
        }
        tables = {"compare": table, "train": self.train}
        return to_toml({**tables, "search": self.search.to_dict()} if self.search else tables)


def compare_config_from_dict(values: dict[str, Any]) -> CompareConfig:
    """A CompareConfig from a ``{"compare": {...}, "train": {...}, "search": {...}}`` mapping
    (``search`` optional)."""
    unknown = set(values) - {"compare", "train", "search"}
    if unknown:
        raise ConfigError(
            f"a compare file has [compare], [train] and [search] tables, not {sorted(unknown)}"
        )
    if not isinstance(values.get("compare", {}), dict) or not isinstance(
        values.get("train", {}), dict
    ):
        raise ConfigError("a compare file's [compare] and [train] are tables")
    table = dict(values.get("compare", {}))
    bad = set(table) - set(COMPARE_KEYS)
    if bad:
        raise ConfigError(
            f"unknown [compare] key(s) {sorted(bad)}; valid: {', '.join(COMPARE_KEYS)}"
        )
    norms = table.get("norms", ["bkn"])
    if not isinstance(norms, list) or not norms:
        raise ConfigError(
            f'[compare] norms is a non-empty list of norm entries (e.g. norms = ["bn", "bkn"]), '
            f"got {norms!r}"
        )
    stat_batch_sizes = _int_list(table, "stat_batch_sizes", [2], minimum=1)
    seeds = _int_list(table, "seeds", [0], minimum=0)
    jobs, out = table.get("jobs", 1), table.get("out", "runs/compare")
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ConfigError(f"[compare] jobs is a positive integer, got {jobs!r}")
    if not isinstance(out, str) or not out.strip():
        raise ConfigError(f"[compare] out is a folder name, got {out!r}")
    baseline = table.get("baseline", "none")
    cfg = CompareConfig(
        train=dict(values.get("train", {})),
        norms=[Variant.parse(e) for e in norms],
        stat_batch_sizes=stat_batch_sizes,
        seeds=seeds,
        baseline=Variant.parse(baseline) if baseline else None,
        jobs=jobs,
        out=out,
    )
    if "search" in values:
        cfg.search = parse_search(values["search"], cfg.labels)
    return cfg


def _int_list(table: dict[str, Any], key: str, default: list[int], minimum: int) -> list[int]:
    """``table[key]``: a non-empty list of integers >= ``minimum``, else a ConfigError."""
    values = table.get(key, default)
    if (
        not isinstance(values, list)
        or not values
        or any(not isinstance(v, int) or isinstance(v, bool) or v < minimum for v in values)
    ):
        raise ConfigError(
            f"[compare] {key} is a non-empty list of integers >= {minimum} (e.g. {key} = "
            f"{default}), got {values!r}"
        )
    return values


def load_compare_config(path: str | Path) -> CompareConfig:
    return compare_config_from_dict(load_toml(path))


# -- the grid ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid."""

    variant: Variant
    stat_batch_size: int | None  # None: the baseline (one group per forward pass) or a
    seed: int  # batch-independent norm
    config: TrainConfig
    baseline: bool = False

    @property
    def folder(self) -> Path:
        return Path(self.config.out)

    @property
    def group(self) -> tuple[str, int | None]:
        return (self.variant.label, self.stat_batch_size)


Group = tuple[str, int | None]  # (norm entry's label, statistics batch): one row of the table


def make_grid(cfg: CompareConfig, picks: dict[Group, Point] | None = None) -> list[RunSpec]:
    """All runs, seed by seed: the baseline, then every norm x statistics batch (a
    batch-independent norm once per seed), each with its search's pick on top (``picks``).
    Each configuration is checked here, before anything runs."""
    picks = picks or {}
    specs = []
    for seed in cfg.seeds:  # seed-major: a grid cut short still has whole seeds
        for variant, stat in _groups(cfg):
            group = f"{variant.label}-s{stat if stat else 'all'}"
            folder = Path(cfg.out) / _safe(f"{group}-seed{seed}")
            spec = _spec(cfg, variant, stat, seed, folder, Point())
            point = picks.get((variant.label, stat), Point())
            picked = _spec(cfg, variant, stat, seed, spec.folder, point)
            if fingerprint(picked.config) != fingerprint(spec.config):
                # a pick other than the recipe gets its own folder; one equal to it reuses the
                # recipe's runs
                folder = Path(cfg.out) / _safe(f"{group}-{point.name.replace(' ', '-')}-seed{seed}")
                picked = _spec(cfg, variant, stat, seed, folder, point)
            specs.append(picked)
    return specs


@dataclass(frozen=True)
class SearchRun:
    """One run of the ``[search]``: a point of a group's search, on the holdout."""

    spec: RunSpec
    group: Group
    index: int  # the point's position in the group's points
    point: Point


def make_search_grid(cfg: CompareConfig) -> list[SearchRun]:
    """The ``[search]`` runs: every group x point x search seed, on the holdout (the test set
    is not read), in ``<out>/search/``."""
    assert cfg.search is not None
    search, runs = cfg.search, []
    for seed in search.seeds or cfg.seeds[:1]:
        for variant, stat in _groups(cfg):
            for index, point in enumerate(search.points(variant.label)):
                name = f"{variant.label}-s{stat if stat else 'all'}-{point.name}-seed{seed}"
                folder = Path(cfg.out) / "search" / _safe(name.replace(" ", "-"))
                held = {"holdout": search.holdout, "test_subset": None}
                spec = _spec(cfg, variant, stat, seed, folder, point, held)
                tagged = dataclasses.replace(variant, label=f"{variant.label} [{point.name}]")
                spec = dataclasses.replace(spec, variant=tagged)  # the progress lines say which
                runs.append(SearchRun(spec, (variant.label, stat), index, point))
    return runs


def run_search(
    cfg: CompareConfig, runs: list[SearchRun], threads: int | None = None
) -> tuple[dict[Group, Point], str]:
    """Run the search, pick each group's point, write ``search.md``; returns the picks and a
    line saying what was searched and picked."""
    assert cfg.search is not None
    what = cfg.search.describe()
    print(f"search: {what}")
    run_grid([run.spec for run in runs], cfg.jobs, threads)
    picks, rows = score_search(runs)
    text = search_markdown(rows, what)
    (Path(cfg.out) / "search.md").write_text(text)
    print()
    print(text)
    chosen = ", ".join(
        f"{label} (s={stat or 'all'}) {p.name}" for (label, stat), p in picks.items()
    )
    return picks, f"Search: {what}. Picked: {chosen or 'nothing (no search run finished)'}."


def score_search(
    runs: list[SearchRun],
) -> tuple[dict[Group, Point], list[tuple[str, str, Point, list[float], bool]]]:
    """Each group's pick from the finished search runs' summaries (a run not finished scores
    nothing), and the rows of ``search.md``."""
    scores: dict[Group, dict[int, tuple[Point, list[float]]]] = {}
    for run in runs:
        _, values = scores.setdefault(run.group, {}).setdefault(run.index, (run.point, []))
        if run_status(run.spec) == "finished":  # a failed run (diverged) scores nothing
            summary = json.loads((run.spec.folder / SUMMARY).read_text())
            values.append(summary["final"]["test_acc_moving"])
    picks: dict[Group, Point] = {}
    rows = []
    for (label, stat), by_index in scores.items():
        indices = sorted(by_index)
        best = pick([by_index[i][1] for i in indices])
        if best is not None:
            picks[(label, stat)] = by_index[indices[best]][0]
        for position, i in enumerate(indices):
            point, values = by_index[i]
            rows.append((label, str(stat or "all"), point, values, position == best))
    return picks, rows


def searched_grid(cfg: CompareConfig) -> list[RunSpec]:
    """The grid's runs with the picks of its finished search runs (the plain grid without a
    ``[search]``): what the grid trains, or trained, after its search."""
    if cfg.search is None:
        return make_grid(cfg)
    picks, _ = score_search(make_search_grid(cfg))
    return make_grid(cfg, picks)


def _spec(
    cfg: CompareConfig,
    variant: Variant,
    stat: int | None,
    seed: int,
    folder: Path,
    point: Point,
    extra: dict[str, Any] | None = None,
) -> RunSpec:
    """One run: the grid's [train] table, the entry's own keys, the search point's on top."""
    base = config_from_dict({**cfg.train, **variant.train, **point.train, **(extra or {})})
    config = dataclasses.replace(
        base,
        norm=variant.norm,
        norm_options={**base.norm_options, **variant.options, **point.options},
        stat_batch_size=stat,
        seed=seed,
        out=str(folder),
    )
    check_config(config)
    return RunSpec(variant, stat, seed, config, variant is cfg.baseline)


def _groups(cfg: CompareConfig) -> list[tuple[Variant, int | None]]:
    """The table's rows: the baseline, then every norm entry x statistics batch (a
    batch-independent norm once: one run serves every statistics batch)."""
    norms = valid_norms()
    for variant in [*cfg.norms, *([cfg.baseline] if cfg.baseline else [])]:
        if variant.norm not in norms:
            raise ConfigError(f"unknown norm {variant.norm!r}; available norms: {', '.join(norms)}")
    groups: list[tuple[Variant, int | None]] = []
    if cfg.baseline:
        groups.append((cfg.baseline, None))
    for variant in cfg.norms:
        if variant.norm == "none" or takes_stat_batch_size(variant.norm):
            groups += [(variant, s) for s in cfg.stat_batch_sizes]
        else:  # batch-independent (gn, gkn, ...): one run per seed serves every statistics batch
            groups.append((variant, None))
    return groups


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# -- running ----------------------------------------------------------------------------------


def run_status(spec: RunSpec) -> str:
    """``"finished"``, ``"partial"`` (a checkpoint to resume), ``"new"``, or ``"conflict"``
    (the folder holds a run of another configuration)."""
    summary_path = spec.folder / SUMMARY
    if summary_path.exists():
        try:
            summary = json.loads(summary_path.read_text())
            saved = fingerprint(config_from_dict(summary["config"]))
        except (OSError, ValueError, KeyError, TypeError):  # cut or damaged: the run rewrites it
            return "partial"
        return "finished" if saved == fingerprint(spec.config) else "conflict"
    return "partial" if (spec.folder / "checkpoint.pt").exists() else "new"


def run_grid(specs: list[RunSpec], jobs: int, threads: int | None = None) -> dict[Path, str]:
    """Run every unfinished spec as a ``kalmannorm train`` process, ``jobs`` at a time.

    Returns each run folder's outcome: ``"skipped"``, ``"finished"`` or ``"failed: ..."``.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = threads or max(1, (cores or 1) // max(1, jobs))
    lock = threading.Lock()
    outcomes: dict[Path, str] = {}
    todo = []
    for spec in specs:
        status = run_status(spec)
        if status == "finished":
            outcomes[spec.folder] = "skipped"
        elif status == "conflict":
            outcomes[spec.folder] = (
                f"failed: {spec.folder} holds a finished run of another configuration; delete "
                f"it or use another --out"
            )
        else:
            todo.append(spec)
    skipped = sum(o == "skipped" for o in outcomes.values())
    print(f"{len(specs)} runs: {skipped} already finished, {len(todo)} to run, {jobs} at a time")

    def launch(index: int, spec: RunSpec) -> None:
        spec.folder.mkdir(parents=True, exist_ok=True)
        config = (
            spec.config
            if spec.config.threads
            else dataclasses.replace(spec.config, threads=threads)
        )
        save_config(config, spec.folder / CONFIG, "kalmannorm compare: one run of the grid")
        command = [
            sys.executable,
            "-m",
            "kalmannorm",
            "train",
            "--config",
            str(spec.folder / CONFIG),
            "--resume",
            "--progress",
            "log",
        ]
        stat = spec.stat_batch_size or "all"
        tag = f"[{index + 1}/{len(todo)}] {spec.variant.label} s={stat} seed {spec.seed}"
        with lock:
            print(f"{tag}: started -> {spec.folder}", flush=True)
        start = time.perf_counter()
        with open(spec.folder / "train.log", "a") as log:
            returncode = _run_logged(command, log, tag, lock)
        result = subprocess.CompletedProcess(command, returncode)
        seconds = time.perf_counter() - start
        if result.returncode == 0:
            summary = json.loads((spec.folder / SUMMARY).read_text())
            final, where = summary["final"], summary.get("eval_set", "test")
            outcome = "finished"
            note = (
                f"{where} acc moving {final['test_acc_moving']:.4f} "
                f"batch {final['test_acc_batch']:.4f}"
            )
        else:
            tail = (spec.folder / "train.log").read_text().strip().splitlines()[-3:]
            outcome = "failed: " + " | ".join(tail)
            note = outcome
        with lock:
            outcomes[spec.folder] = outcome
            print(f"{tag}: {note} ({seconds:.0f} s)", flush=True)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(launch, i, s) for i, s in enumerate(todo)]:
            future.result()
    return outcomes


def _run_logged(command: list[str], log: Any, tag: str, lock: threading.Lock) -> int:
    """Run ``command``, copying its output to ``log`` and echoing its progress lines (the
    training log's ``step ...`` lines) to the screen under ``tag``."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert process.stdout is not None
    for line in process.stdout:
        log.write(line)
        log.flush()
        if line.startswith("step"):
            with lock:
                print(f"{tag}: {' '.join(line.split())}", flush=True)
    return process.wait()


# -- the summary ------------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    norm: str
    stat_batch: str
    seeds: int
    final_moving: list[float]
    final_batch: list[float]
    best_moving: list[float]
    best_batch: list[float]
    steps_to_baseline: list[int | None]
    wall_time: list[float]
    curves: list[list[dict[str, Any]]]
    eval_set: str = "test"  # "holdout": validation numbers (the test set was not read)


def collect(specs: list[RunSpec]) -> list[Row]:
    """One row per (norm, statistics batch) with each finished seed's numbers."""
    rows: dict[tuple, Row] = {}
    for spec in specs:
        if run_status(spec) != "finished":  # failed, or a run of another configuration
            continue
        summary = json.loads((spec.folder / SUMMARY).read_text())
        records = read_metrics(spec.folder / "metrics.jsonl")
        stat = spec.stat_batch_size or (
            summary["derived"]["stat_batch_size_used"] if spec.baseline else "any"
        )
        label = f"{spec.variant.label} (baseline)" if spec.baseline else spec.variant.label
        row = rows.setdefault(
            spec.group, Row(label, spec.variant.norm, str(stat), 0, [], [], [], [], [], [], [])
        )
        row.seeds += 1
        row.eval_set = summary.get("eval_set", "test")
        row.final_moving.append(summary["final"]["test_acc_moving"])
        row.final_batch.append(summary["final"]["test_acc_batch"])
        row.best_moving.append(summary["best"]["test_acc_moving"]["value"])
        row.best_batch.append(summary["best"]["test_acc_batch"]["value"])
        row.wall_time.append(summary["wall_time_s"])
        row.curves.append(records)
    rows_list = list(rows.values())
    baseline = next((r for r in rows_list if r.label.endswith("(baseline)")), None)
    if baseline is not None:
        target = statistics.fmean(baseline.final_moving)
        for row in rows_list:
            row.steps_to_baseline = [
                next((r["step"] for r in curve if r["test_acc_moving"] >= target), None)
                for curve in row.curves
            ]
    return rows_list


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _percent(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if len(values) > 1 else f"{100 * mean:.2f}"


def _steps(values: list[int | None]) -> str:
    reached = [v for v in values if v is not None]
    if not values:
        return "-"
    if not reached:
        return "not reached"
    text = f"{statistics.fmean(reached):.0f}"
    return text if len(reached) == len(values) else f"{text} ({len(reached)}/{len(values)} seeds)"


HEADER = (
    "norm",
    "stat batch",
    "seeds",
    "final acc % (moving)",
    "final acc % (batch)",
    "best acc % (moving)",
    "best acc % (batch)",
    "steps to baseline acc",
    "time/run (s)",
)


def _held_out(rows: list[Row]) -> bool:
    return any(r.eval_set == "holdout" for r in rows)


def format_markdown(rows: list[Row]) -> str:
    """The summary table in Markdown (accuracies on the holdout say so in the header)."""
    header = [h.replace(" acc %", " holdout acc %") for h in HEADER] if _held_out(rows) else HEADER
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        cells = (
            r.label,
            r.stat_batch,
            str(r.seeds),
            _percent(r.final_moving),
            _percent(r.final_batch),
            _percent(r.best_moving),
            _percent(r.best_batch),
            _steps(r.steps_to_baseline),
            f"{statistics.fmean(r.wall_time):.0f}",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def conclusion(rows: list[Row]) -> str:
    """One sentence on what the table means: the micro-batch norm with the best final accuracy
    (moving statistics) and where it stands between the baseline and the others."""
    baseline = next((r for r in rows if r.label.endswith("(baseline)")), None)
    others = [r for r in rows if r is not baseline and r.final_moving]
    if baseline is None or not others:
        return ""
    ranked = sorted(others, key=lambda r: statistics.fmean(r.final_moving), reverse=True)
    best, rest = ranked[0], ranked[1:]
    top = statistics.fmean(baseline.final_moving)
    gap = round(100 * (top - statistics.fmean(best.final_moving)), 2)  # as the table rounds
    seeds = f"{best.seeds} seed{'s' if best.seeds > 1 else ''}"
    behind = (
        "; then " + ", ".join(f"{r.label} {_percent(r.final_moving)} %" for r in rest)
        if rest
        else ""
    )
    where = "level with"
    if gap:
        where = f"{abs(gap):.2f} points {'below' if gap > 0 else 'above'}"
    held_out = (
        " (accuracy on a held-out part of the training set: validation numbers, not test ones)"
        if _held_out(rows)
        else ""
    )
    return (
        f"Meaning: with statistics groups of {best.stat_batch}, {best.label} trains best "
        f"({_percent(best.final_moving)} % with moving statistics, {seeds}), {where} "
        f"{baseline.label.removesuffix(' (baseline)')} with the whole batch "
        f"({_percent(baseline.final_moving)} %){behind}{held_out}."
    )


def write_csv(rows: list[Row], path: Path) -> None:
    """The summary table as CSV: means and standard deviations in separate columns."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "norm",
                "label",
                "stat_batch_size",
                "seeds",
                *[
                    f"{k}_{s}"
                    for k in ("final_moving", "final_batch", "best_moving", "best_batch")
                    for s in ("mean", "std")
                ],
                "steps_to_baseline_mean",
                "seeds_reaching_baseline",
                "wall_time_s_mean",
                "eval_set",
            ]
        )
        for r in rows:
            stats = [
                x
                for v in (r.final_moving, r.final_batch, r.best_moving, r.best_batch)
                for x in _mean_std(v)
            ]
            reached = [s for s in r.steps_to_baseline if s is not None]
            writer.writerow(
                [
                    r.norm,
                    r.label,
                    r.stat_batch,
                    r.seeds,
                    *[f"{x:.6f}" for x in stats],
                    f"{statistics.fmean(reached):.1f}" if reached else "",
                    len(reached),
                    f"{statistics.fmean(r.wall_time):.1f}",
                    r.eval_set,
                ]
            )


def plot_curves(rows: list[Row], path: Path) -> bool:
    """Validation accuracy against steps, both evaluation modes (mean over seeds, ± std band).

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, key, title in zip(
        axes, ("test_acc_moving", "test_acc_batch"), ("moving statistics", "batch statistics")
    ):
        for r in rows:
            steps = [rec["step"] for rec in r.curves[0]]
            per_seed = [
                [rec[key] for rec in curve] for curve in r.curves if len(curve) == len(steps)
            ]
            mean = [statistics.fmean(v) for v in zip(*per_seed)]
            std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*per_seed)]
            line = axis.plot(steps, [100 * m for m in mean], label=f"{r.label}, s={r.stat_batch}")
            axis.fill_between(
                steps,
                [100 * (m - s) for m, s in zip(mean, std)],
                [100 * (m + s) for m, s in zip(mean, std)],
                color=line[0].get_color(),
                alpha=0.2,
            )
        where = "holdout" if _held_out(rows) else "test"
        axis.set_title(f"{where} accuracy, {title}")
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def compare(cfg: CompareConfig, threads: int | None = None) -> str:
    """Run the grid of ``cfg`` (skipping finished runs), write and return the summary table."""
    start = time.perf_counter()
    specs = make_grid(cfg)
    searches = make_search_grid(cfg) if cfg.search else []
    out = Path(cfg.out)
    prepare_run_folder(out)
    (out / "compare.toml").write_text("# kalmannorm compare: resolved grid\n" + cfg.to_toml())
    searched = ""
    if searches:  # every norm's search on the holdout first; the grid trains the picks
        picks, searched = run_search(cfg, searches, threads)
        specs = make_grid(cfg, picks)
    outcomes = run_grid(specs, cfg.jobs, threads)
    rows = collect(specs)
    table = format_markdown(rows)
    failed = {folder: o for folder, o in outcomes.items() if o.startswith("failed")}
    (out / "summary.md").write_text(table)
    write_csv(rows, out / "summary.csv")
    print()
    print(table)
    sentence = " ".join(part for part in (conclusion(rows), searched) if part)
    if sentence:
        print(sentence)
        (out / "summary.md").write_text(table + "\n" + sentence + "\n")
    if not rows:
        print("curves: skipped (no finished runs)")
    elif plot_curves(rows, out / "curves.png"):
        print(f"curves: {out / 'curves.png'}")
    else:
        print("curves: skipped (matplotlib is not installed: pip install matplotlib)")
    for folder, outcome in failed.items():
        print(f"FAILED {folder}: {outcome[len('failed: ') :]}")
    seconds = time.perf_counter() - start
    print(f"summary: {out / 'summary.md'}, {out / 'summary.csv'} ({seconds:.0f} s)")
    if failed:
        raise RunsFailedError(
            f"{len(failed)} of {len(specs)} runs failed (logs: <run folder>/train.log)"
        )
    return table
