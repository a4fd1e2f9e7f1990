"""torchrun with 2 processes on CPU (gloo) computes what 1 process computes with the same
gradient batch and statistics groups: gradients are averaged, statistics stay per process, and
the moving averages (averaged before evaluation) equal the single-process ones, with
accumulation passes too (pass j of every process together is pass j of the single process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kalmannorm.lab.cli import build_parser, config_from_args
from kalmannorm.lab.train import train

ARGS = [
    "train",
    "--dataset",
    "digits",
    "--model",
    "small_cnn",
    "--model-option",
    "width=8",
    "--norm",
    "bkn",
    "--stat-batch-size",
    "2",
    "--batch-size",
    "16",
    "--steps",
    "12",
    "--eval-every",
    "6",
    "--lr",
    "0.05",
    "--threads",
    "1",
    "--progress",
    "log",
]


#: (norm, statistics batch, accumulation passes): the plans 2 processes must equal 1 in
PLANS = [("bkn", 2, 1), ("bn", 4, 2), ("bkn", 2, 2)]


@pytest.mark.parametrize(("norm", "stat", "passes"), PLANS, ids=lambda v: str(v))
def test_two_processes_equal_one(tmp_path: Path, norm: str, stat: int, passes: int) -> None:
    args = [
        *ARGS,
        "--norm",
        norm,
        "--stat-batch-size",
        str(stat),
        "--accumulation-steps",
        str(passes),
    ]
    two = tmp_path / "two"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "kalmannorm",
            *args,
            "--out",
            str(two),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    per_pass = 16 // (2 * passes)
    assert f"2 process(es) x {passes} pass(es) x {per_pass}" in result.stdout  # rank 0 reports
    one = tmp_path / "one"
    train(config_from_args(build_parser().parse_args([*args, "--out", str(one)])))

    a = torch.load(one / "checkpoint.pt", weights_only=True)
    b = torch.load(two / "checkpoint.pt", weights_only=True)
    assert b["world_size"] == 2 and len(b["rng"]) == 2
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    records = [
        [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        for folder in (one, two)
    ]
    for r1, r2 in zip(*records, strict=True):
        assert r1["train_loss"] == pytest.approx(r2["train_loss"], rel=1e-5)
        for key in ("train_acc", "test_acc_moving", "test_acc_batch"):
            assert r1[key] == pytest.approx(r2[key], abs=1 / 360 + 1e-9), key  # <= 1 image
