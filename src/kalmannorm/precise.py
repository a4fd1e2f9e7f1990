"""PreciseBN: recompute the moving statistics of a trained model as population averages.

A moving average of batch statistics lags the weights and carries the noise of its last few
batches. With the weights fixed, :func:`update_bn` replaces the statistics each norm normalises
with in eval mode (moving statistics) by their average over ``num_batches`` batches, as fvcore's
``update_bn_stats`` and ``torch.optim.swa_utils.update_bn`` do for BatchNorm (the latter skips
every layer of this library). For statistics group g (the layer's ``stat_batch_size``) of m
values per channel, averaged over every group of every batch:

=================================  ==========================  ===============================
layer                              running_mean                running_var
=================================  ==========================  ===============================
BatchNorm (torch), ghost BN        mean_g xbar_g               mean_g m/(m-1) S_g
("bn"), BRN, CBN
BKN (posterior)                    mean_g mu^{k|k}_g           mean_g (diag Sigma^{k|k}_g
                                                               + q S_g / (m - 1))
MABN                               mean_g xbar_g               mean_g chi2_g - running_mean^2
=================================  ==========================  ===============================

i.e. exactly what each layer's moving average would hold with ``momentum=None`` (a cumulative
average) over those groups: BatchNorm's unbiased variance, BKN's posterior with its batch
covariance unbiased (its moving-average convention), MABN's second moment chi2_g = E_g[x^2]
(``running_var + running_mean^2``, the statistic it normalises with). GroupNorm, GKN and the
other batch-free norms have no moving statistics and are left alone.

**How.** The model runs in eval mode (dropout off, nothing else changes state) with every
batch-statistics layer normalising with its own group statistics: ``eval_statistics="batch"``
for the layers of this library, no running buffers for torch's BatchNorm, so no window, schedule
clock, renormalisation or moving average moves and each layer sees inputs normalised by batch
statistics, as in training. Hooks sum the statistics in float64; afterwards each layer's running
statistics are overwritten, and its training flag and ``eval_statistics`` restored (``momentum``
and ``num_batches_tracked`` are not touched). Under ``torch.distributed`` the sums are
all-reduced, so every rank ends with the same statistics (the average over all ranks' batches).
Batches must divide into each layer's statistics groups (``drop_last=True``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from kalmannorm import functional as kf
from kalmannorm._torch_private import BatchNormBase, NormBase
from kalmannorm.layers.batch_kalman import BatchKalmanNorm
from kalmannorm.layers.batch_renorm import BatchRenorm
from kalmannorm.layers.cross_iteration import CrossIterationBatchNorm
from kalmannorm.layers.ghost_batch import GhostBatchNorm
from kalmannorm.layers.moving_average_batch import MovingAverageBatchNorm, group_second_moments

_BATCH_STATISTICS = (GhostBatchNorm, BatchRenorm, CrossIterationBatchNorm)


@dataclass
class _Sums:
    """Per-channel sums over statistics groups (float64) and the number of groups."""

    name: str
    layer: nn.Module
    kind: str  # "batch", "posterior" or "second"
    mean: Tensor | None = None
    spread: Tensor | None = None  # the variance (batch, posterior) or second moment (MABN)
    groups: int = 0
    handles: list = field(default_factory=list)

    def add(self, mean: Tensor, spread: Tensor) -> None:
        """Add the (G, C) statistics of one forward."""
        groups = mean.shape[0]
        mean, spread = mean.detach().double().sum(0), spread.detach().double().sum(0)
        if self.mean is None:
            self.mean, self.spread = mean, spread
        else:
            self.mean += mean
            self.spread += spread
        self.groups += groups


def _kind(layer: nn.Module) -> str | None:
    if getattr(layer, "running_var", None) is None:
        return None  # no moving statistics (GroupNorm, GKN, track_running_stats=False, ...)
    if isinstance(layer, MovingAverageBatchNorm):
        return "second"
    if isinstance(layer, BatchKalmanNorm):
        return "posterior"
    if isinstance(layer, (*_BATCH_STATISTICS, BatchNormBase)):
        return "batch"
    return "unknown"


def _unbiased(var: Tensor, count: int) -> Tensor:
    return var * (count / (count - 1)) if count > 1 else var


def _batch_hook(sums: _Sums, tracing: Callable[[], bool]):
    def hook(module: nn.Module, args: tuple) -> None:
        if tracing():
            return
        x = args[0]
        mean, var, count = kf.group_moments(x.detach(), getattr(module, "stat_batch_size", None))
        sums.add(mean, _unbiased(var, count))

    return hook


def _second_hook(sums: _Sums, tracing: Callable[[], bool]):
    def hook(module: nn.Module, args: tuple) -> None:
        if tracing():
            return
        mean, second, _ = group_second_moments(args[0].detach(), module.stat_batch_size)
        sums.add(mean, second)

    return hook


def _posterior_hook(sums: _Sums, tracing: Callable[[], bool]):
    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        if tracing():
            return
        stats = module.last_statistics
        x = args[0]
        groups = stats.posterior_mean.shape[0]
        count = (x.shape[0] // groups) * x[0, 0].numel()
        var = stats.posterior_var
        if count > 1:
            var = var + stats.gain * stats.batch_var / (count - 1)
        sums.add(stats.posterior_mean, var)

    return hook


def _inputs(batch: object, device: torch.device | str | None) -> object:
    """The model's input from a loader's batch: the first element of a list/tuple (swa_utils's
    convention), moved to ``device``."""
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    if device is not None and isinstance(batch, Tensor):
        batch = batch.to(device)
    return batch


def _all_reduce(entries: list[_Sums]) -> None:
    """Sum every entry's statistics and group count over the processes of the default group."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()) or not entries:
        return
    device = entries[0].layer.running_var.device
    parts = []
    for entry in entries:
        channels = entry.layer.running_var.numel()
        if entry.mean is None:  # did not run on this rank
            entry.mean = torch.zeros(channels, dtype=torch.float64, device=device)
            entry.spread = torch.zeros_like(entry.mean)
        parts += [entry.mean.to(device), entry.spread.to(device)]
    counts = torch.tensor([float(e.groups) for e in entries], dtype=torch.float64, device=device)
    flat = torch.cat([*parts, counts])
    torch_dist.all_reduce(flat)
    offset = 0
    for entry in entries:
        channels = entry.layer.running_var.numel()
        entry.mean = flat[offset : offset + channels]
        entry.spread = flat[offset + channels : offset + 2 * channels]
        offset += 2 * channels
    for entry, count in zip(entries, flat[offset:].tolist()):
        entry.groups = round(count)


def update_bn(
    loader: Iterable,
    model: nn.Module,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
) -> int:
    """Set every norm's moving statistics to its population average over batches of ``loader``.

    Args:
        loader: yields model inputs, or lists/tuples whose first element is the input (e.g.
            ``(images, labels)``); batch sizes must divide into each layer's statistics groups.
        model: the model (a ``DistributedDataParallel`` wrapper works: call it on every rank).
        num_batches: batches to use (``None``: the whole loader); fvcore uses 200.
        device: where to move each input (``None``: as the loader yields it).

    Returns the number of batches used (on this rank). The statistics are those of the module
    docstring (:mod:`kalmannorm.precise`); layers that did not run keep theirs (with a warning),
    layers this function does not know (other ``_NormBase`` subclasses with running statistics)
    too. Training flags and ``eval_statistics`` are restored afterwards, also on error.
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer or None, got {num_batches}")
    entries: list[_Sums] = []
    unknown: list[str] = []
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind == "unknown":
            if isinstance(module, NormBase):
                unknown.append(f"{name} ({type(module).__name__})")
        elif kind is not None:
            entries.append(_Sums(name, module, kind))
    if unknown:
        warnings.warn(
            f"update_bn keeps the moving statistics of {', '.join(unknown)}: it does not know how "
            f"they are computed.",
            stacklevel=2,
        )
    training = {module: module.training for module in model.modules()}
    eval_modes = {
        module: module.eval_statistics
        for module in model.modules()
        if isinstance(getattr(module, "eval_statistics", None), str)
    }
    hidden: dict[nn.Module, tuple[Tensor, Tensor]] = {}
    # A pass in which the chain traces the model (layers with a ``tracing`` flag pass their input
    # through) is not a batch: the hooks skip it.
    passing = [m for m in model.modules() if isinstance(getattr(m, "tracing", None), bool)]

    def tracing() -> bool:
        return any(m.tracing for m in passing)

    used = 0
    try:
        model.eval()
        for entry in entries:
            layer = entry.layer
            if entry.kind == "posterior":
                entry.handles.append(layer.register_forward_hook(_posterior_hook(entry, tracing)))
            elif entry.kind == "second":
                entry.handles.append(layer.register_forward_pre_hook(_second_hook(entry, tracing)))
            else:
                entry.handles.append(layer.register_forward_pre_hook(_batch_hook(entry, tracing)))
            if isinstance(layer, BatchNormBase):
                # without running buffers torch's BatchNorm normalises with the batch, statelessly
                hidden[layer] = (layer.running_mean, layer.running_var)
                layer.running_mean = None
                layer.running_var = None
            else:
                layer.eval_statistics = "batch"
        with torch.no_grad():
            for batch in loader:
                if num_batches is not None and used >= num_batches:
                    break
                model(_inputs(batch, device))
                used += 1
    finally:
        for entry in entries:
            for handle in entry.handles:
                handle.remove()
            entry.handles.clear()
        for layer, (running_mean, running_var) in hidden.items():
            layer.running_mean, layer.running_var = running_mean, running_var
        for module, mode in eval_modes.items():
            module.eval_statistics = mode
        for module, flag in training.items():
            module.training = flag
    if used == 0:
        raise ValueError("update_bn: the loader yielded no batches, so no statistics changed")
    _all_reduce(entries)
    missing = []
    with torch.no_grad():
        for entry in entries:
            if entry.groups == 0:
                missing.append(entry.name)
                continue
            layer = entry.layer
            mean = entry.mean / entry.groups
            spread = entry.spread / entry.groups
            if entry.kind == "second":  # running_var + running_mean^2 is the second moment
                spread = spread - mean.square()
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(spread)
    if missing:
        warnings.warn(
            f"update_bn: {', '.join(missing)} did not run on the batches given and keep their "
            f"moving statistics.",
            stacklevel=2,
        )
    return used


__all__ = ["update_bn"]
