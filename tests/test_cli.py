"""The command line: demo on real digits, norm listing, argument errors."""

import pytest

from kalmannorm.lab.cli import main
from kalmannorm.lab.demo import run_demo


def test_demo_trains_on_real_digits_and_prints_estimated_statistics(capsys):
    results = run_demo(steps=40, batch_size=16, stat_batch_size=2, seed=0)
    out = capsys.readouterr().out
    assert [r.name.split()[0] for r in results] == ["BN", "BN", "BKN"]
    for r in results:
        assert 0.3 < r.accuracy_moving <= 1.0, r  # ten classes: chance is 0.1
        assert 0.0 <= r.accuracy_batch <= 1.0
    assert "prior var" in out and "features.3.1" in out
    bkn_rows = [line for line in out.splitlines() if line.startswith("features.")]
    assert len(bkn_rows) == 4 and bkn_rows[0].split()[2] == "-"  # the first layer has no prior


def test_norms_lists_the_registry(capsys):
    assert main(["norms"]) == 0
    out = capsys.readouterr().out
    assert "bkn" in out and "gkn" in out


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit):
        main(["nonsense"])
