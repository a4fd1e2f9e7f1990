"""A run killed with SIGKILL, at random moments, and resumed ends exactly like one never
interrupted: same metrics, bit-identical weights."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    "240",
    "--eval-every",
    "20",
    "--checkpoint-every",
    "2",
    "--lr",
    "0.05",
    "--threads",
    "1",
    "--progress",
    "none",
]
TIMING = ("samples_per_s", "elapsed_s")


def _records(folder: Path) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _checkpoint_step(folder: Path) -> int:
    try:
        return torch.load(folder / "checkpoint.pt", weights_only=True)["step"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1


def _start_and_kill(folder: Path, rng: random.Random) -> int:
    """Start (or resume) the run in a subprocess; SIGKILL it at a random moment after it has
    written a new checkpoint. Returns the step of the checkpoint it left."""
    before = _checkpoint_step(folder)
    process = subprocess.Popen(
        [sys.executable, "-m", "kalmannorm", *ARGS, "--out", str(folder), "--resume"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while _checkpoint_step(folder) <= before and process.poll() is None:
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.15))
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, (
        f"the run ended before it could be killed: {process.stderr.read().decode()[-2000:]}"
    )
    process.stderr.close()
    return _checkpoint_step(folder)


def test_sigkill_at_random_moments_then_resume_gives_identical_results(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    train(config_from_args(build_parser().parse_args([*ARGS, "--out", str(reference)])))

    killed = tmp_path / "killed"
    rng = random.Random(0)
    first = _start_and_kill(killed, rng)
    second = _start_and_kill(killed, rng)
    assert 0 < first < second < 240
    # what a kill can leave behind: half a metrics line, a half-written checkpoint
    with open(killed / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 9999, "train_lo')
    # (of a process that is gone: 2**31 - 1 exceeds every pid_max)
    (killed / ".checkpoint.pt.2147483647.tmp").write_bytes(b"\x80\x02partial")

    args = build_parser().parse_args(["train", "--out", str(killed), "--resume"])
    summary = train(config_from_args(args), resume=True)  # config.toml of the run is the base

    assert summary["steps"] == 240
    assert _records(killed) == _records(reference)
    assert not list(killed.glob(".*.tmp"))
    done = torch.load(killed / "checkpoint.pt", weights_only=True)
    expected = torch.load(reference / "checkpoint.pt", weights_only=True)
    for key, value in expected["model"].items():
        assert torch.equal(done["model"][key], value), key
    momentum = expected["optimizer"]["state"]
    for index, state in momentum.items():
        assert torch.equal(
            done["optimizer"]["state"][index]["momentum_buffer"], state["momentum_buffer"]
        )
