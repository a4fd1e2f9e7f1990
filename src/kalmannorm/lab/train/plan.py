"""How a gradient batch is cut: processes, accumulation passes and statistics groups.

A gradient batch of ``B`` samples is split over ``P`` processes (``B / P`` each), each process's
share into ``k`` accumulation passes of ``B / (P k)`` samples (one forward/backward each), and
each pass into statistics groups of ``s`` samples. A group never straddles two processes or two
passes, so the same (B, s) gives the same groups, and the same gradient up to float rounding,
whatever P and k are; the j-th passes of all processes together hold the j-th pass of a single
process (:meth:`BatchPlan.process_part`), so moving averages agree too. Everything is checked
here, before any data is read or model built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kalmannorm.lab.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message says why and what to change."""


@dataclass(frozen=True)
class BatchPlan:
    batch_size: int  # gradient batch, all processes
    processes: int
    accumulation_steps: int
    stat_batch_size: int  # samples per statistics group, as used

    @property
    def per_process(self) -> int:
        return self.batch_size // self.processes

    @property
    def per_pass(self) -> int:
        """Samples per forward pass: the batch the norm layers see."""
        return self.per_process // self.accumulation_steps

    def process_slice(self, rank: int) -> slice:
        """This process's samples when it takes one contiguous share of each global batch."""
        return slice(rank * self.per_process, (rank + 1) * self.per_process)

    def process_part(self, rank: int) -> slice | torch.Tensor:
        """The positions in each global batch of this process's samples, in pass order.

        Pass j of process r holds the r-th of P equal parts of the j-th of k equal parts of the
        global batch, so the j-th passes of all processes together hold exactly the samples of
        the j-th pass of one process with the same batch: moving averages, updated once per
        pass, then average over processes to the single-process values in every batch plan.
        One pass or one process: a contiguous slice.
        """
        if self.processes == 1 or self.accumulation_steps == 1:
            return self.process_slice(rank)
        chunk = self.batch_size // self.accumulation_steps  # one pass of all processes
        starts = torch.arange(self.accumulation_steps) * chunk + rank * self.per_pass
        return (starts[:, None] + torch.arange(self.per_pass)).reshape(-1)


def plan_batches(
    batch_size: int,
    stat_batch_size: int | None,
    processes: int = 1,
    accumulation_steps: int = 1,
    *,
    norm: str | None = None,
) -> BatchPlan:
    """Check that the batch divides as asked and return the plan.

    Args:
        batch_size: gradient batch.
        stat_batch_size: statistics group; ``None`` means one group per forward pass.
        processes: data-parallel processes.
        accumulation_steps: forward/backward passes per optimizer step and process.
        norm: the norm's name; ``"none"`` (plain BatchNorm) takes no statistics groups.
    """
    for name, value in (("batch_size", batch_size), ("accumulation_steps", accumulation_steps)):
        if value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value}")
    if stat_batch_size is not None and stat_batch_size < 1:
        raise ConfigError(f"stat_batch_size must be a positive integer, got {stat_batch_size}")
    if batch_size % processes:
        raise ConfigError(
            f"batch size {batch_size} does not divide over {processes} processes; use a "
            f"multiple of {processes}"
        )
    per_process = batch_size // processes
    if per_process % accumulation_steps:
        raise ConfigError(
            f"each process's batch of {per_process} does not split into {accumulation_steps} "
            f"accumulation passes; use a batch size that is a multiple of "
            f"{processes * accumulation_steps}"
        )
    per_pass = per_process // accumulation_steps
    if stat_batch_size is None:
        return BatchPlan(batch_size, processes, accumulation_steps, per_pass)
    if per_pass % stat_batch_size:
        raise ConfigError(
            f"batch size {batch_size} over {processes} process(es) and {accumulation_steps} "
            f"accumulation pass(es) leaves {per_pass} samples per forward pass, which does not "
            f"divide into statistics groups of {stat_batch_size}; statistics groups never "
            f"straddle processes or passes"
        )
    if norm == "none" and stat_batch_size != per_pass:
        raise ConfigError(
            f"plain BatchNorm (--norm none) normalises each forward pass of {per_pass} samples "
            f"as one group; for statistics groups of {stat_batch_size} use a norm that takes "
            f"stat_batch_size (e.g. bn or bkn), or leave --stat-batch-size unset"
        )
    return BatchPlan(batch_size, processes, accumulation_steps, stat_batch_size)
