"""Learning-rate schedules as pure functions of the step (so a resumed run needs no state)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch


def lr_factor(
    step: int,
    *,
    total_steps: int,
    schedule: str,
    warmup_steps: int = 0,
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Linear warm-up from 1/warmup to 1 over ``warmup_steps``, then ``"cosine"`` (to 0 at
    ``total_steps``), ``"step"`` (times ``gamma`` at each milestone, a fraction of
    ``total_steps``) or ``"constant"``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "step":
        return gamma ** sum(step >= round(m * total_steps) for m in milestones)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}; use cosine, step or constant")


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, config
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping once per optimizer step with :func:`lr_factor`."""
    factor = partial(
        lr_factor,
        total_steps=total_steps,
        schedule=config.schedule,
        warmup_steps=config.warmup_steps,
        milestones=tuple(config.milestones),
        gamma=config.gamma,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
