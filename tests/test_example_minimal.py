"""examples/train_minimal.py, the one-file example, runs (a few steps on a few images) and uses
the library alone."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_minimal.py"
FASHION = Path("/usr/share/datasets/fashion-mnist")


def _run(**env: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "STEPS": "3", "EVAL_EVERY": "2", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_example_uses_the_library_alone() -> None:
    source = EXAMPLE.read_text()
    imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert "import kalmannorm" in imports
    assert not [line for line in imports if "kalmannorm." in line or "from kalmannorm" in line]
    assert "convert_norm(model, NORM, stat_batch_size=STAT_BATCH)" in source
    assert 'center_conv_weights(model, layers="all")' in source  # the best configuration
    assert len(source.splitlines()) <= 180


def test_the_example_trains_on_digits_when_fashion_mnist_is_missing(tmp_path) -> None:
    out = _run(DATA_DIR=str(tmp_path), SUBSET="256")
    assert "bkn-flow, statistics groups of 2 in batches of 128: 3 steps on 256 digits" in out
    steps = re.findall(r"step +(\d+) +train loss ([\d.]+) +test accuracy \(eval mode\)", out)
    assert [s for s, _ in steps] == ["2", "3"] and all(0 < float(v) < 10 for _, v in steps)


@pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_the_example_trains_on_fashion_mnist() -> None:
    out = _run(SUBSET="256", STEPS="2")
    assert "2 steps on 256 fashion images" in out and "step     2" in out
