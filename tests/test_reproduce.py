"""``kalmannorm reproduce``: a tiny budget end to end on digits, the verdict rule, the budgets."""

from __future__ import annotations

import json
import math
import statistics
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kalmannorm.lab.reproduce import Budget, reproduce
from kalmannorm.lab.reproduce.budgets import WIDENED, paper, small, widened_width
from kalmannorm.lab.reproduce.evidence import Cell, collect_cells
from kalmannorm.lab.reproduce.verdict import difference, summarise_calls
from kalmannorm.lab.train.compare import CompareConfig, Variant, make_grid
from kalmannorm.lab.train.plan import ConfigError

TINY_TRAIN = {
    "dataset": "digits",
    "model": "small_cnn",
    "model_options": {"width": 8},
    "batch_size": 32,
    "lr": 0.05,
    "steps": 12,
    "eval_every": 12,
    "progress": "log",
}


def tiny_budget(root: Path) -> Budget:
    sweep = CompareConfig(
        train=TINY_TRAIN,
        norms=[Variant("bn", "bn"), Variant("bkn", "bkn"), Variant("gn", "gn")],
        stat_batch_sizes=[2, 4],
        seeds=[0, 1],
        baseline=None,
        jobs=2,
        out=str(root / "sweep"),
    )
    settings = CompareConfig(
        train={**TINY_TRAIN, "batch_size": 8, "steps": 6, "eval_every": 6},
        norms=[Variant("bn", "bn"), Variant("bkn", "bkn")],
        stat_batch_sizes=[2],
        seeds=[0],
        jobs=2,
        out=str(root / "settings-g8-s2"),
    )
    width, _, _ = widened_width(TINY_TRAIN, 2)
    widened = CompareConfig(
        train={**TINY_TRAIN, "model_options": {"width": width}},
        norms=[Variant("bn", f"bn-width{width}")],
        stat_batch_sizes=[2],
        seeds=[0],
        jobs=1,
        out=str(root / WIDENED),
    )
    grids = {"sweep": sweep, "settings-g8-s2": settings, WIDENED: widened}
    return Budget("tiny", root, grids, analysis_samples=200)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory) -> tuple[Budget, Path]:
    root = tmp_path_factory.mktemp("reproduce")
    budget = tiny_budget(root / "runs")
    report = reproduce(budget, out=root / "results", threads=1, argv=["--budget", "tiny"])
    return budget, report


def test_report_holds_the_measured_numbers(tiny_report) -> None:
    budget, report = tiny_report
    text = report.read_text()
    # every sweep cell's mean +- std over seeds, computed here from the runs' summary files
    for spec in make_grid(budget.grids["sweep"]):
        assert (spec.folder / "summary.json").exists(), spec.folder
    bkn_s2 = [
        json.loads((spec.folder / "summary.json").read_text())["final"]["test_acc_moving"]
        for spec in make_grid(budget.grids["sweep"])
        if spec.variant.label == "bkn" and spec.stat_batch_size == 2
    ]
    expected = f"{100 * statistics.fmean(bkn_s2):.2f} ± {100 * statistics.stdev(bkn_s2):.2f}"
    assert expected in text
    for section in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6."):
        assert section in text
    assert "kalmannorm reproduce --budget tiny" in text
    # the training periods end with the latest run's end
    summaries = [
        spec.folder / "summary.json" for grid in budget.grids.values() for spec in make_grid(grid)
    ]
    last = datetime.fromtimestamp(max(p.stat().st_mtime for p in summaries), UTC)
    span = next(line for line in text.splitlines() if "training wall clock" in line)
    assert f"-{last:%H:%M} UTC (" in span
    folder = report.parent
    for figure in ("sweep.png", "variance_gap_bn.png", "variance_gap_bkn.png", "gain.png"):
        assert (folder / figure).stat().st_size > 1000
        assert f"({figure})" in text
    assert "(8, 2)" in text and "bn-width" not in text  # the widened row is named by its width
    assert f"bn, width {budget.grids[WIDENED].train['model_options']['width']}" in text


def test_report_is_rewritten_from_finished_runs_without_training(tiny_report, tmp_path) -> None:
    budget, report = tiny_report
    again = reproduce(budget, out=tmp_path, train=False, argv=["--no-train"])
    first, second = report.read_text(), again.read_text()
    table = first[first.index("## 1.") : first.index("## 4.")]
    assert table == second[second.index("## 1.") : second.index("## 4.")]


def cell(moving: list[float]) -> Cell:
    return Cell("x", "x", 128, 2, moving=moving, batch=moving)


def test_difference_calls_only_beyond_two_standard_errors() -> None:
    a, b = cell([0.80, 0.82, 0.81]), cell([0.70, 0.71, 0.72])
    d = difference(a, b)
    assert d.points == pytest.approx(10.0)
    sem = math.hypot(statistics.stdev(a.moving), statistics.stdev(b.moving)) / math.sqrt(3)
    assert d.stderr == pytest.approx(100 * sem)
    assert d.call == "better" and difference(b, a).call == "worse"
    noisy = cell([0.60, 0.90, 0.75])
    assert difference(noisy, cell([0.74, 0.75, 0.76])).call == "tie"
    assert difference(cell([0.8]), cell([0.7])).call == "not measurable"
    text = summarise_calls({1: d, 2: difference(noisy, b)})
    assert text == "better at 1; tie at 2"


def test_collect_cells_ignores_unfinished_runs(tmp_path) -> None:
    cfg = CompareConfig(
        train=TINY_TRAIN, norms=[Variant("bn", "bn")], stat_batch_sizes=[2], out=str(tmp_path)
    )
    assert collect_cells(cfg) == {}


def test_small_budget_grids() -> None:
    budget = small("unused-root")
    assert list(budget.grids) == ["sweep", "settings-g16-s4", "settings-g8-s2", WIDENED]
    sweep = budget.grids["sweep"]
    assert sweep.stat_batch_sizes == [1, 2, 4, 8, 16, 32, 128] and sweep.seeds == [0, 1, 2]
    labels = [v.label for v in sweep.norms]
    assert labels == ["bn", "brn", "cbn", "gn", "bkn", "bkn-lr100", "bkn-propagate", "gkn"]
    # same samples at every gradient batch; learning rate scaled linearly
    for name, g in (("settings-g16-s4", 16), ("settings-g8-s2", 8)):
        train = budget.grids[name].train
        assert train["batch_size"] * train["steps"] == 128 * sweep.train["steps"]
        assert train["lr"] == pytest.approx(sweep.train["lr"] * g / 128)


def test_paper_budget_holds_the_paper_recipes() -> None:
    budget = paper("unused-root")
    cifar = budget.grids["cifar10"]
    assert cifar.train["model"] == "inception_cifar" and cifar.train["epochs"] == 400
    assert cifar.stat_batch_sizes == [2] and cifar.train["batch_size"] == 128
    imagenet = budget.grids["imagenet-resnet101"]
    assert imagenet.train["batch_size"] == 256 and imagenet.stat_batch_sizes == [4]


def test_paper_budget_starts_and_trains_some_steps(tmp_path, write_cifar) -> None:
    """The paper's CIFAR-10 grid (its Inception network, gradient batch 128 in statistics
    groups of 2) on CIFAR-format files, one step per run on the CPU."""
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    write_cifar(tmp_path / "data" / "cifar-10-batches-py", files, "labels", per_file=26)
    report = reproduce(
        "paper",
        out=tmp_path / "results",
        runs=tmp_path / "runs",
        grids=["cifar10"],
        norms=["bkn"],
        overrides={"steps": 1, "device": "cpu", "data_dir": str(tmp_path / "data")},
        threads=1,
        argv=["--budget", "paper", "--steps", "1"],
    )
    finished = sorted(p.parent.name for p in (tmp_path / "runs" / "cifar10").glob("*/summary.json"))
    assert finished == ["bkn-s2-seed0"]  # the other norms and the baseline were not selected
    summary = json.loads((tmp_path / "runs/cifar10/bkn-s2-seed0/summary.json").read_text())
    assert summary["steps"] == 1 and summary["config"]["model"] == "inception_cifar"
    assert summary["derived"]["stat_batch_size_used"] == 2
    text = report.read_text()
    assert "(paper budget)" in text and "## 4. Fig. 8" in text


def test_unknown_budget_and_grid_are_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="budgets: residual, small, paper"):
        reproduce("huge", out=tmp_path)
    with pytest.raises(ConfigError, match="its grids: cifar10, cifar100"):
        reproduce("paper", out=tmp_path, grids=["cifar1000"], runs=tmp_path / "runs")


def test_verdict_lines_from_synthetic_findings() -> None:
    from kalmannorm.lab.reproduce.report import Findings, verdict_lines

    def c(label: str, s: int | None, moving: list[float], batch: list[float]) -> Cell:
        return Cell(label, label, 128, s, moving=moving, batch=batch)

    sweep = {
        ("bn", 2): c("bn", 2, [0.60, 0.61, 0.62], [0.50, 0.51, 0.52]),
        ("bn", 128): c("bn", 128, [0.80, 0.81, 0.79], [0.80, 0.80, 0.80]),
        ("bkn", 2): c("bkn", 2, [0.70, 0.71, 0.72], [0.705, 0.715, 0.72]),
        ("bkn", 128): c("bkn", 128, [0.80, 0.81, 0.79], [0.80, 0.80, 0.80]),
    }
    findings = Findings("test", {}, sweep=sweep)
    findings.estimation_error = [
        {"norm": "bn", "stat_batch_size": 2, "var_error": 0.30},
        {"norm": "bkn", "stat_batch_size": 2, "var_error": 0.299},  # within 5 %: the same
    ]
    text = "\n".join(verdict_lines(findings))
    # +10 pt with a standard error of ~0.8 pt: better, in both evaluation modes
    assert (
        "*bkn beats BN with micro-batches (s ≤ 8), moving statistics at test*: **reproduced**"
        in text
    )
    assert "batch statistics at test*: **reproduced** — better at 2" in text
    # BKN's batch/moving gap is 0.17 pt (<= 1), BN's 10 pt
    assert "give the same accuracy; BN has a gap* (Table 3, s = 2): **reproduced**" in text
    assert "more accurately than BN* (variance error" in text and "s=2: the same" in text
    assert "**not reproduced** — s=2: the same" in text


def test_training_periods_join_runs_that_follow_each_other() -> None:
    from kalmannorm.lab.reproduce.runner import training_periods

    # two overlapping jobs, a run started 5 s after the last ended, then a run hours later
    runs = [(0.0, 100.0), (50.0, 160.0), (165.0, 300.0), (20_000.0, 20_100.0)]
    assert training_periods(runs) == [(0.0, 300.0), (20_000.0, 20_100.0)]
    assert training_periods(runs[::-1]) == training_periods(runs)
    assert training_periods(runs, gap=1.0) == [(0.0, 160.0), (165.0, 300.0), (20_000.0, 20_100.0)]
    assert training_periods([]) == []
