"""The residual budget's report, from run folders written here (no training)."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics

import pytest

from kalmannorm.lab.reproduce import reproduce
from kalmannorm.lab.reproduce.residual import FLOW, residual
from kalmannorm.lab.train.compare import make_grid, run_status

#: Final accuracies (moving, batch) per (label, s) and seed; s None: batch-independent.
ACCURACY = {
    ("none", None): [(0.87, 0.86), (0.88, 0.87), (0.86, 0.86)],
    ("bn128-centred", None): [(0.89, 0.88), (0.895, 0.885), (0.885, 0.88)],
    ("gn-groups-centred", None): [(0.76, 0.76), (0.77, 0.77), (0.75, 0.75)],
    ("gn", None): [(0.78, 0.78), (0.77, 0.77), (0.79, 0.79)],
    ("frn", None): [(0.70, 0.70), (0.71, 0.71), (0.69, 0.69)],
    ("bkn-flow-temporal", 2): [(0.82, 0.80), (0.83, 0.81), (0.81, 0.79)],  # a retired grid's
    ("bn", 2): [(0.81, 0.79), (0.815, 0.80), (0.805, 0.78)],
    (FLOW.label, 2): [(0.85, 0.84), (0.86, 0.85), (0.84, 0.85)],
    ("bn", 4): [(0.83, 0.82), (0.835, 0.83), (0.825, 0.82)],
    (FLOW.label, 4): [(0.832, 0.86), (0.828, 0.87), (0.836, 0.865)],
}


def _write_runs(root) -> None:
    budget = residual(root)
    for config in [*budget.grids.values(), *budget.retired.values()]:
        for spec in make_grid(config):
            key = (spec.variant.label, spec.stat_batch_size)
            if key not in ACCURACY or spec.seed >= len(ACCURACY[key]):
                continue
            _finished(spec, *ACCURACY[key][spec.seed])
            assert run_status(spec) == "finished"


@pytest.fixture
def report(tmp_path):
    _write_runs(tmp_path / "runs")
    path = reproduce(
        residual(tmp_path / "runs"), out=tmp_path / "out", train=False, argv=["--no-train"]
    )
    return path.read_text()


def _row(report: str, s: str, norm: str) -> list[str]:
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 10 and cells[0] == s and cells[1] == norm:
            return cells
    raise AssertionError(f"no row s={s} {norm} in the report")


def _mean_std(values):
    return 100 * statistics.fmean(values), 100 * statistics.stdev(values)


def test_the_table_gives_mean_std_and_the_gap_closed(report):
    moving = [m for m, _ in ACCURACY[(FLOW.label, 2)]]
    mean, std = _mean_std(moving)
    row = _row(report, "2", "bkn-flow")
    assert row[2] == "3" and row[3] == f"{mean:.2f} ± {std:.2f}"
    top = statistics.fmean(m for m, _ in ACCURACY[("none", None)])
    ghost = statistics.fmean(m for m, _ in ACCURACY[("bn", 2)])
    assert row[6] == f"{(statistics.fmean(moving) - ghost) / (top - ghost):.0%}"


def test_every_batch_free_norm_has_a_row_against_gn(report):
    row = _row(report, "any", "frn")
    mean, std = _mean_std([m for m, _ in ACCURACY[("frn", None)]])
    assert row[2] == "3" and row[3] == f"{mean:.2f} ± {std:.2f}"
    # 70 vs 78 %, each +- 1 point over 3 seeds: worse beyond 2 standard errors
    assert row[8].startswith("-8.00 ± 0.82 pt (worse)")
    assert _row(report, "any", "GN")[8] == ""


def _call(a, b) -> str:
    """``+d.dd ± e.ee pt (verdict)`` of moving accuracies ``a`` against ``b``, computed here."""
    a, b = [100 * m for m, _ in a], [100 * m for m, _ in b]
    diff = statistics.fmean(a) - statistics.fmean(b)
    se = math.hypot(statistics.stdev(a) / len(a) ** 0.5, statistics.stdev(b) / len(b) ** 0.5)
    verdict = "tie" if abs(diff) <= 2 * se else ("better" if diff > 0 else "worse")
    return f"{diff:+.2f} ± {se:.2f} pt ({verdict})"


def test_every_row_is_compared_with_the_strongest_whole_batch_bn(report):
    """The centred BN@128 (the higher mean here) is what every *vs BN@128* is against; the
    centred GN (the lower mean here) is not what *vs GN* is against."""
    centred = ACCURACY[("bn128-centred", None)]
    assert _row(report, "2", "bkn-flow")[9] == _call(ACCURACY[(FLOW.label, 2)], centred)
    assert _row(report, "128", "BN@128")[9] == _call(ACCURACY[("none", None)], centred)
    assert _row(report, "128", "BN@128, centred")[9] == ""  # not against itself
    gn_centred = _row(report, "any", "GN, 2 per group, centred")
    assert gn_centred[8] == _call(ACCURACY[("gn-groups-centred", None)], ACCURACY[("gn", None)])
    assert gn_centred[9] == _call(ACCURACY[("gn-groups-centred", None)], centred)


def test_a_retired_grid_is_reported_and_never_trained(report, tmp_path):
    row = _row(report, "2", "bkn-flow-temporal")
    assert row[2] == "3" and row[3].startswith("82.00 ± 1.00")
    budget = residual(tmp_path / "runs")
    trained = {v.label for cfg in budget.grids.values() for v in cfg.norms}
    assert "bkn-flow-temporal" not in trained and "temporal" not in budget.grids


def test_verdicts_follow_the_two_standard_error_rule(report):
    def call(a, b):
        a, b = [100 * m for m, _ in a], [100 * m for m, _ in b]
        diff = statistics.fmean(a) - statistics.fmean(b)
        se = math.hypot(statistics.stdev(a) / 3**0.5, statistics.stdev(b) / 3**0.5)
        return "tie" if abs(diff) <= 2 * se else ("better" if diff > 0 else "worse")

    for s in ("2", "4"):
        row = _row(report, s, "bkn-flow")
        expected = call(ACCURACY[(FLOW.label, int(s))], ACCURACY[("bn", int(s))])
        assert row[7].endswith(f"({expected})")
    assert _row(report, "4", "bkn-flow")[7].endswith("(tie)")  # 83.2 vs 83.0: within noise
    assert _row(report, "2", "bkn-flow")[8].endswith("(better)")  # vs GN


def test_the_recommendation_picks_the_best_evaluation_of_the_best_norm(report):
    lines = [line for line in report.splitlines() if line.startswith("| 4 | ")]
    pick = next(line for line in lines if "statistics |" in line)
    # at s = 4, bkn-flow with batch statistics (86.5) beats ghost BN (83.0) and GN (78.0)
    assert (
        "| 4 | bkn-flow | the recipe's 0.1 | the test group's batch statistics | 86.50 ± 0.50 | 3 |"
        in pick
    )


def test_a_missing_cell_is_left_out_not_invented(report):
    assert "| 1 | bkn-flow |" not in report
    assert "s = 1," not in report


def _finished(spec, moving: float, batch: float) -> None:
    spec.folder.mkdir(parents=True, exist_ok=True)
    summary = {
        "status": "finished",
        "final": {"test_acc_moving": moving, "test_acc_batch": batch},
        "wall_time_s": 60.0,
        "config": dataclasses.asdict(spec.config),
    }
    (spec.folder / "summary.json").write_text(json.dumps(summary))


def test_the_search_picks_have_their_own_table_beside_the_recipe(tmp_path):
    from kalmannorm.lab.train.compare import make_search_grid
    from kalmannorm.lab.train.search import Point

    root = tmp_path / "runs"
    _write_runs(root)
    grid = residual(root).grids["search"]
    for run in make_search_grid(grid):  # holdout scores: GN best at lr 0.05, the rest at 0.1
        best = 0.05 if run.group == ("gn", None) else 0.1
        _finished(run.spec, 0.9 if run.point.train["lr"] == best else 0.8, 0.8)
    gn_picked = [0.84, 0.85, 0.83]
    for spec in make_grid(grid, {("gn", None): Point({"lr": 0.05})}):
        if spec.variant.label == "gn":
            assert spec.folder.name == f"gn-sall-lr_0.05-seed{spec.seed}"
            _finished(spec, gn_picked[spec.seed], gn_picked[spec.seed])
    text = reproduce(residual(root), out=tmp_path / "out", train=False, argv=[]).read_text()
    recipe_mean, recipe_std = _mean_std([m for m, _ in ACCURACY[("gn", None)]])
    mean, std = _mean_std(gn_picked)
    main, own = text.split("## Each norm at its own learning rate")
    assert _row(main, "any", "GN")[3] == f"{recipe_mean:.2f} ± {recipe_std:.2f}"  # the recipe
    assert _row(own, "any", "GN")[3] == f"{mean:.2f} ± {std:.2f}"  # the pick, in its own table
    search = text.split("## Learning-rate search")[1]
    assert search.count("**yes**") == 4  # BN@128, ghost BN, GN and bkn-flow each pick one
    assert (
        f"GN: test accuracy (moving) with the recipe {recipe_mean:.2f} ± {recipe_std:.2f} "
        f"(3 seeds), with its pick lr=0.05 {mean:.2f} ± {std:.2f} (3 seeds)." in search
    )
    assert "ghost BN: test accuracy" not in search  # its pick is the recipe's lr
    # the recommendation at s = 2 weighs each norm at its pick: GN's 84 % against bkn-flow's 85
    pick = next(line for line in main.splitlines() if line.startswith("| 2 | ") and "pick" in line)
    assert pick.startswith("| 2 | bkn-flow | its held-out pick | moving statistics | 85.00")
    assert "GN (tie)" in pick


def test_no_gap_closed_is_claimed_where_bn128_does_not_lead_beyond_noise():
    from kalmannorm.lab.reproduce.evidence import Cell
    from kalmannorm.lab.reproduce.residual_report import gap_closed

    def cell(label, s, values):
        return Cell(label, "x", 128, s, moving=list(values))

    flow = cell(FLOW.label, 2, [0.85, 0.86, 0.84])
    clear = {("none", None): cell("none", None, [0.87, 0.875, 0.865])}
    clear[("bn", 2)] = cell("bn", 2, [0.81, 0.815, 0.805])
    assert gap_closed(clear, flow, 2) == pytest.approx((0.85 - 0.81) / (0.87 - 0.81))
    within = {**clear, ("bn", 2): cell("bn", 2, [0.86, 0.87, 0.875])}  # ghost BN at BN@128's
    assert gap_closed(within, flow, 2) is None


def test_every_vs_gn_verdict_is_against_the_strongest_gn_setting():
    from kalmannorm.lab.reproduce.evidence import Cell
    from kalmannorm.lab.reproduce.residual_report import table, verdicts

    def cell(label, norm, s, values):
        return Cell(label, norm, 128, s, moving=list(values), batch=list(values))

    cells = {
        ("gn", None): cell("gn", "gn", None, [0.76, 0.77, 0.78]),
        ("gn-old-groups", None): cell("gn-old-groups", "gn", None, [0.82, 0.83, 0.84]),
        ("frn", None): cell("frn", "frn", None, [0.90, 0.91, 0.92]),  # not a GN: never the bar
        (FLOW.label, 2): cell(FLOW.label, "bkn", 2, [0.84, 0.85, 0.86]),
    }
    # bkn-flow 85 vs the old-groups GN's 83 (not the default GN's 77): +2.00 +- 0.82, better
    (line,) = verdicts(cells)
    assert "vs gn-old-groups +2.00 ± 0.82 pt (better) (moving)" in line
    rows = {r.split("|")[2].strip(): r for r in table(cells)[2:]}
    assert rows["GN"].rstrip(" |").endswith("-6.00 ± 0.82 pt (worse)")
    assert rows["gn-old-groups"].split("|")[-2].strip() == ""  # the bar itself: no verdict


def test_a_search_that_has_not_run_shows_no_picks(report):
    # the fixture writes the grids' runs at the recipe's settings but no search run: nothing
    # may be shown as a held-out pick (the recipe's cells would otherwise pose as picks)
    assert "## Each norm at its own learning rate" not in report
    assert "## Learning-rate search" not in report
    assert "its held-out pick" not in report


def test_the_bn128_row_shows_its_precise_bn_accuracy_where_measured():
    from kalmannorm.lab.reproduce.evidence import Cell
    from kalmannorm.lab.reproduce.residual_report import table

    measured = Cell("none", "none", 128, None, moving=[0.87, 0.88], precise=[0.86, 0.88])
    (row,) = [r for r in table({("none", None): measured}) if r.startswith("| 128")]
    assert row.split("|")[6].strip() == "87.00 ± 1.41"
    unmeasured = Cell("none", "none", 128, None, moving=[0.87, 0.88])
    (row,) = [r for r in table({("none", None): unmeasured}) if r.startswith("| 128")]
    assert row.split("|")[6].strip() == "-"


def test_the_recommendation_reads_the_committed_step_times(tmp_path):
    """A ``step_time.json`` beside the runs (experiments/residual_step.py) gives each pick's
    cost in the recommendation table; without it the column is '-'."""
    import json

    from kalmannorm.lab.reproduce.residual import CANDIDATES, DISPLAY

    _write_runs(tmp_path / "runs")
    ratios = {label: 1.0 + 0.01 * (i + 1) for i, label in enumerate(CANDIDATES)}
    rows = [{"label": label, "ratio": ratio} for label, ratio in ratios.items()]
    (tmp_path / "runs" / "step_time.json").write_text(json.dumps({"rows": rows}))
    budget = residual(tmp_path / "runs")
    text = reproduce(budget, out=tmp_path / "out", train=False, argv=["--no-train"]).read_text()
    picks = [line for line in text.splitlines() if line.count("|") == 9 and "recipe's" in line]
    assert picks
    by_name = {DISPLAY.get(label, label): ratio for label, ratio in ratios.items()}
    for line in picks:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[7] == f"{by_name[cells[1].removesuffix(' (provisional)')]:.2f}x"
