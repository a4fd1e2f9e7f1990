"""Test accuracy with moving statistics and with batch statistics (the paper's Table 3).

*Moving*: the model in eval mode, as deployed. *Batch*: each test batch normalised with its own
statistics, in groups of the training statistics-batch size, the way the network was trained:

- a layer with an ``eval_statistics`` attribute (BKN, ghost BN, BRN, CBN, and any layer that
  adopts the convention) is switched to ``"batch"`` and groups the test batch by its own
  ``stat_batch_size``;
- a plain ``torch.nn.BatchNorm1d/2d/3d`` runs its training-mode forward on the whole test
  batch, which is therefore cut to the training forward-pass size (momentum 0: its moving
  averages are not touched);
- every other layer runs as in eval mode. For batch-independent norms (GroupNorm, LayerNorm,
  GKN, ...) both columns are the same computation; a layer with moving statistics but no batch
  mode (e.g. a BatchNorm subclass without ``eval_statistics``) uses its moving statistics and is
  named in :attr:`EvalReport.moving_only`.

All buffers are restored afterwards, so evaluation never changes the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from kalmannorm.train.distributed import Distributed, all_reduce_sum


def _training_forward_is_batch_statistics(module: nn.Module) -> bool:
    """Whether ``module``'s training-mode forward normalises with batch statistics only:
    torch's own BatchNorm classes (not subclasses, which may do more)."""
    return type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class EvalReport:
    """Which layers the batch-statistics evaluation switched, by kind."""

    switched: list[str] = field(default_factory=list)
    plain_batchnorm: list[str] = field(default_factory=list)
    moving_only: list[str] = field(default_factory=list)
    #: layers that normalise a whole forward batch as one group (no ``stat_batch_size``)
    whole_batch: list[str] = field(default_factory=list)


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[EvalReport]:
    """Evaluate ``model`` (in eval mode) with batch statistics inside the block."""
    report = EvalReport()
    saved_buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    restore: list[tuple[nn.Module, str, object]] = []
    for name, module in model.named_modules():
        if hasattr(module, "eval_statistics"):
            restore.append((module, "eval_statistics", module.eval_statistics))
            module.eval_statistics = "batch"
            report.switched.append(name)
        elif _training_forward_is_batch_statistics(module):
            restore += [
                (module, "training", module.training),
                (module, "momentum", module.momentum),
            ]
            module.training, module.momentum = True, 0.0
            report.plain_batchnorm.append(name)
        elif isinstance(module, _NormBase) and module.track_running_stats:
            report.moving_only.append(name)
            continue
        else:
            continue
        if getattr(module, "stat_batch_size", None) is None:
            report.whole_batch.append(name)
    try:
        yield report
    finally:
        for module, attribute, value in reversed(restore):
            setattr(module, attribute, value)
        _restore_buffers(model, saved_buffers)


@torch.no_grad()
def _restore_buffers(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, value in saved.items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        current = module._buffers[leaf]
        if current is not None and current.shape == value.shape:
            current.copy_(value)
        else:  # a layer that replaced its buffer (e.g. a window that grew)
            module._buffers[leaf] = value


@torch.no_grad()
def _accuracy(
    model: nn.Module,
    data,
    batch_size: int,
    dist: Distributed,
    device: torch.device,
    whole: int = 1,
) -> tuple[float, int]:
    """Correct fraction over the test set, in batches of ``batch_size``, each cut to a multiple
    of ``whole`` (the samples of an incomplete last group are left out); batches are shared
    round-robin among processes. NaN when no sample could be scored."""
    correct = count = 0
    for index, (x, y) in enumerate(data.test_batches(batch_size)):
        keep = len(y) - len(y) % whole
        if keep == 0 or index % dist.world_size != dist.rank:
            continue
        logits = model(x[:keep].to(device, non_blocking=True))
        correct += int((logits.argmax(1) == y[:keep].to(device)).sum())
        count += keep
    correct, count = all_reduce_sum([correct, count], dist, device)
    return (correct / count if count else float("nan")), int(count)


def evaluate(
    model: nn.Module,
    data,
    *,
    stat_batch_size: int,
    eval_batch_size: int,
    dist: Distributed,
    device: torch.device,
) -> dict[str, float]:
    """``test_acc_moving`` and ``test_acc_batch`` of ``model`` (left in eval mode).

    Args:
        model: the bare model (not the DDP wrapper).
        data: the data set (``test_batches``).
        stat_batch_size: the training statistics group. Layers that group by themselves get
            test batches of the largest multiple of it up to ``eval_batch_size``; a model with
            layers that normalise the whole forward batch (plain BatchNorm) gets test batches of
            exactly this size, which for them is the training forward pass. The samples of an
            incomplete last group are left out, so the evaluated images depend only on these
            two sizes, never on the number of processes. A model without batch-dependent layers
            scores the same in both columns.
        eval_batch_size: test batch for the moving-statistics evaluation.
    """
    model.eval()
    moving, _ = _accuracy(model, data, eval_batch_size, dist, device)
    with batch_statistics(model) as report:
        if not (report.switched or report.plain_batchnorm):  # batch-independent: the same
            batch = moving
        elif report.whole_batch:  # the forward batch is the statistics group
            batch, _ = _accuracy(model, data, stat_batch_size, dist, device, stat_batch_size)
        else:  # layers group by themselves: any whole number of groups
            size = max(stat_batch_size, eval_batch_size // stat_batch_size * stat_batch_size)
            batch, _ = _accuracy(model, data, size, dist, device, stat_batch_size)
    return {"test_acc_moving": moving, "test_acc_batch": batch}
