"""Checkpoints: everything a run needs to continue bit for bit, written atomically.

A checkpoint holds the model (its ``state_dict`` carries the norm layers' state: moving
statistics, and schedules or windows kept as buffers), the optimizer, the learning-rate
scheduler, each process's random generator states, the step (from which the data order and
augmentation are recomputed: they are pure functions of seed, epoch and step), the training
meters since the last evaluation, and the run's configuration fingerprint. It is written to a
temporary file in the same folder and renamed over the old one (``os.replace`` is atomic), so a
process killed at any moment leaves either the previous or the new checkpoint, never a torn one.
It loads with ``torch.load(weights_only=True)``: only tensors and plain Python values inside.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from kalmannorm.lab.train.config import TrainConfig, differences, fingerprint

FORMAT = 1


class CheckpointMismatchError(ValueError):
    """A checkpoint written under another configuration."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        torch.save({"format": FORMAT, **state}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint (tensors and plain values only: ``weights_only=True``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT:
        raise CheckpointMismatchError(f"{path} is not a kalmannorm checkpoint of format {FORMAT}")
    return state


def remove_stale_temporaries(folder: Path) -> None:
    """Delete temporary files left by a process killed while writing a checkpoint."""
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def check_fingerprint(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint whose configuration differs, listing the differences.

    Keys added to the configuration since the checkpoint was written count at their defaults.
    """
    diffs = differences(fingerprint(TrainConfig()) | saved, current)
    if diffs:
        raise CheckpointMismatchError(
            f"{path} was written by a run with another configuration; differing keys "
            f"(checkpoint -> now):\n  " + "\n  ".join(diffs) + "\nResume with the same "
            "configuration (e.g. --config <run>/config.toml) or start a new --out folder."
        )


def capture_rng() -> dict[str, Any]:
    """This process's random generator states (torch CPU and CUDA, Python's ``random``)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
