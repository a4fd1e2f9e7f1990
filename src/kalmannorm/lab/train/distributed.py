"""Data-parallel training with torchrun: process group, device, and the few collectives we use.

``torchrun --nproc_per_node=P -m kalmannorm train ...`` sets ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``; we join a process group (gloo on CPU, NCCL on GPU) and wrap the model in
DistributedDataParallel, which averages gradients. Normalization statistics stay local to each
process (the paper's multi-GPU setting). Moving averages are kept per process too, and averaged
over processes before each evaluation and checkpoint: an exponential moving average is linear in
its inputs, so the average equals what one process computing all groups would hold.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from kalmannorm.lab.train.plan import ConfigError


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    """Processes torchrun started (1 without torchrun)."""
    text = os.environ.get("WORLD_SIZE", "1")
    if not text.strip().isdigit() or int(text) < 1:
        raise ConfigError(f"WORLD_SIZE={text!r} in the environment is not a number of processes")
    return int(text)


def check_device(device: str, here: bool = True) -> torch.device:
    """The device ``device`` names, if this machine has it (``here=False``: on any machine: a
    grid for GPUs is checked on a CPU); else a ConfigError saying which devices there are."""
    names = ["cpu"] + (
        [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    try:
        target = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(
            f"unknown device {device!r}; this machine has: {', '.join(names)}"
        ) from None
    if target.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(
            f"device {device!r}: the harness runs on cpu, cuda[:N] or mps; this machine has: "
            f"{', '.join(names)}"
        )
    if not here:
        return target
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {device!r} requested but CUDA is not available here; use --device cpu"
            )
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s) "
                f"({', '.join(names[1:])})"
            )
    elif target.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r}: MPS is not available here; use --device cpu")
    return target


def setup(device: str) -> tuple[Distributed, torch.device]:
    """Join the process group if torchrun started us; pick this process's device."""
    world_size = world_size_from_env()
    ranks = {key: os.environ.get(key, "0") for key in ("RANK", "LOCAL_RANK")}
    for key, text in ranks.items():
        if not text.strip().isdigit():
            raise ConfigError(f"{key}={text!r} in the environment is not a process rank")
    dist = Distributed(int(ranks["RANK"]), world_size, int(ranks["LOCAL_RANK"]))
    target = check_device(device)
    if target.type == "cuda":
        if dist.enabled and target.index is None:
            target = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(target)
    if dist.enabled and not torch_dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend, rank=dist.rank, world_size=world_size)
    return dist, target


def teardown(dist: Distributed) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def wrap(model: nn.Module, dist: Distributed, device: torch.device) -> nn.Module:
    """DDP around ``model`` when distributed (buffers stay per process: see module docstring)."""
    if not dist.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:  # torch >= 2.14
        return ddp(model, device_ids=ids, forward_sync_buffers=False)
    return ddp(model, device_ids=ids, broadcast_buffers=False)


def all_reduce_sum(values: list[float], dist: Distributed, device: torch.device) -> list[float]:
    """Sums of ``values`` over processes (float64)."""
    if not dist.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(tensor)
    return tensor.tolist()


def average_buffers(model: nn.Module, dist: Distributed) -> None:
    """Average every floating-point buffer (moving statistics) over processes, in place."""
    if not dist.enabled:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            torch_dist.all_reduce(buffer)
            buffer.div_(dist.world_size)


def gather(obj: Any, dist: Distributed) -> list[Any]:
    """``obj`` of every process, in rank order."""
    if not dist.enabled:
        return [obj]
    out: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(out, obj)
    return out


def barrier(dist: Distributed) -> None:
    if dist.enabled:
        torch_dist.barrier()
