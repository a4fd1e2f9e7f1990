"""What a run reports: metrics as JSON lines, TensorBoard scalars, progress on the terminal.

Only the main process writes. ``metrics.jsonl`` gets one record per evaluation; when a run is
resumed, records after the checkpoint's step (written after the last checkpoint by the process
that was killed, possibly half a line) are dropped first, so the file always reads as one
uninterrupted run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

#: Keys whose values depend on the machine's speed, not on the computation.
TIMING_KEYS = ("samples_per_s", "elapsed_s")

#: The progress bar reads the training loss at most this often (seconds).
LOSS_EVERY_S = 1.0


def read_metrics(path: Path, up_to_step: int | None = None) -> list[dict[str, Any]]:
    """The complete records of a metrics file (with ``step <= up_to_step`` if given)."""
    records = []
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step", 0), int):
            continue  # not a record of ours
        if up_to_step is None or record.get("step", 0) <= up_to_step:
            records.append(record)
    return records


class MetricsLog:
    """Metrics file, optional TensorBoard log and progress display of one run.

    Args:
        folder: the run's output folder.
        enabled: False on processes other than the main one (then every method is a no-op).
        start_step: the step the run starts or resumes at (later records are dropped).
        total_steps: for the progress bar.
        progress: ``"auto"`` (a tqdm bar on an interactive terminal if tqdm is installed, else
            log lines), ``"bar"``, ``"log"`` or ``"none"``.
    """

    def __init__(
        self, folder: Path, enabled: bool, start_step: int, total_steps: int, progress: str
    ) -> None:
        self.enabled = enabled
        self.path = folder / "metrics.jsonl"
        self.tensorboard = None
        self.bar = None
        self.quiet = progress == "none"
        self.loss_shown = -float("inf")
        if not enabled:
            return
        kept = read_metrics(self.path, start_step)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.tensorboard = _tensorboard(folder / "tensorboard", start_step)
        if progress == "bar" or (progress == "auto" and sys.stderr.isatty()):
            self.bar = _progress_bar(start_step, total_steps)

    def step(self, losses: torch.Tensor) -> None:
        """One optimizer step done, its loss per pass still on the device: the bar moves; it
        reads the loss (a host synchronisation) at most once every :data:`LOSS_EVERY_S` seconds,
        and without a bar nothing is read."""
        if self.bar is None:
            return
        self.bar.update(1)
        now = time.monotonic()
        if now - self.loss_shown >= LOSS_EVERY_S:
            self.loss_shown = now
            self.bar.set_postfix(loss=f"{float(losses.sum()):.3f}", refresh=False)

    def record(self, record: dict[str, Any]) -> None:
        """Append one evaluation record, and show it."""
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])
            self.tensorboard.flush()
        self.log(format_record(record))

    def log(self, message: str) -> None:
        if not self.enabled or self.quiet:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def format_record(r: dict[str, Any]) -> str:
    precise = f" precise {r['test_acc_precise']:.4f}" if "test_acc_precise" in r else ""
    return (
        f"step {r['step']:>6} epoch {r['epoch']:6.2f}  loss {r['train_loss']:.4f} "
        f"acc {r['train_acc']:.4f} | {r.get('eval_set', 'test')} acc moving "
        f"{r['test_acc_moving']:.4f} "
        f"batch {r['test_acc_batch']:.4f}{precise} | lr {r['lr']:.4g} | "
        f"{r['samples_per_s']:.0f} img/s"
    )


def _tensorboard(folder: Path, start_step: int):
    """A SummaryWriter if tensorboard is installed (events after ``start_step`` purged)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional dependency
        return None
    return SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)


def _progress_bar(start_step: int, total_steps: int):
    try:
        from tqdm import tqdm
    except ImportError:  # optional dependency
        return None
    return tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
