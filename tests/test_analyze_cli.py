"""`kalmannorm analyze` on a tiny trained run, checked against the analysis library directly."""

import json
from pathlib import Path

import pytest
from test_train import TINY_ARGS

from kalmannorm.lab import analysis
from kalmannorm.lab.analysis.run import load_run
from kalmannorm.lab.cli import main


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("analyze") / "run"
    args = ["train", *TINY_ARGS, "--steps", "30", "--norm", "bkn", "--stat-batch-size", "2"]
    assert main([*args, "--progress", "log", "--out", str(out)]) == 0
    return out


def test_load_run_restores_the_trained_model(trained_run: Path):
    run = load_run(trained_run)
    summary = json.loads((trained_run / "summary.json").read_text())
    result = analysis.eval_mode_accuracy(run.model, run.data.test_batches, stat_batch_size=2)
    assert run.step == 30
    assert result.moving == pytest.approx(summary["final"]["test_acc_moving"], abs=0.02)


@pytest.mark.parametrize(
    "what", ["variance-gap", "eval-modes", "estimation-error", "gain", "params", "prior-error"]
)
def test_analyze_commands_print_their_tables(trained_run: Path, what, capsys, tmp_path):
    assert main(["analyze", what, str(trained_run), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("|") > 4  # a Markdown table
    if what == "gain":
        snapshot = analysis.gain_snapshot(load_run(trained_run).model)
        assert (tmp_path / "gain.png").stat().st_size > 0 and len(snapshot) >= 2
    if what == "prior-error":
        # the table's layer rows are the library's measurement on the same batches
        rows = analysis_prior_rows(trained_run)
        assert all(f"| {r.name} ({r.category}) |" in out for r in rows)
        assert (tmp_path / "prior_error.png").stat().st_size > 0


def analysis_prior_rows(run_dir: Path):
    from kalmannorm.lab.analysis.prior_error import measure_prior_error

    run = load_run(run_dir)
    return measure_prior_error(run.model, run.data.test_batches(32))


def test_analyze_a_folder_without_a_run_says_what_it_needs(tmp_path):
    with pytest.raises(FileNotFoundError, match="--out folder of a `kalmannorm train` run"):
        load_run(tmp_path)
