"""Evaluating a model with statistics-group batch statistics, without changing it.

Inside :func:`batch_statistics_mode` the model runs in eval mode (dropout off, no moving-average
update) and every normalization layer normalises each statistics group of s consecutive samples
with statistics of that group, the way it normalises in training:

- BatchNorm-like layers (``torch.nn.BatchNorm*``, torchvision's ``FrozenBatchNorm2d``, and any
  other layer with ``running_mean``/``running_var`` that is not a Kalman layer: ghost BN, BRN, CBN)
  are BatchNorm per group: a forward hook replaces the output by
  y = (x - xbar_g) / sqrt(S_g + eps) * gamma + beta with the group mean xbar_g and biased
  variance S_g (:func:`kalmannorm.functional.group_moments`); MABN, which never centres, by the
  group's second moment: y = x / sqrt(xbar_g^2 + S_g + eps) * gamma + beta. This is exactly
  ``convert_norm(copy.deepcopy(model), "bkn", stat_batch_size=s, gain=1.0, learn_gain=False)``
  in batch mode (tested), without the copy.
- Batch Kalman layers use their posterior mu^{k|k}_g, Sigma^{k|k}_g per group
  (``set_eval_statistics(model, "batch")``, the paper's inference option 'A').
- Group Kalman layers compute per-sample statistics in both modes, so they run unchanged.

``stat_batch_size=None`` keeps each layer's own group size (a BKN's or ghost BN's
``stat_batch_size``; a plain BatchNorm takes the whole forward batch as one group); an integer
applies to every layer. An observer sees each layer's input and its group statistics. Every
buffer, training flag, ``eval_statistics``, ``stat_batch_size`` and ``last_statistics`` is restored
on exit.

It lives in the training harness because its evaluation (:mod:`~kalmannorm.lab.train.evaluate`)
uses it; :mod:`kalmannorm.lab.analysis` imports it from here (analysis depends on train, never
the other way round).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from kalmannorm import functional as kf
from kalmannorm._torch_private import BatchNormBase, InstanceNormBase
from kalmannorm.layers.base import KalmanNormBase
from kalmannorm.layers.batch_kalman import BatchKalmanNorm
from kalmannorm.layers.ghost_batch import check_stat_batch_size
from kalmannorm.layers.group_kalman import GroupKalmanNorm
from kalmannorm.layers.moving_average_batch import MovingAverageBatchNorm

#: Layer kinds: BatchNorm-like, Batch Kalman Normalization, Group Kalman Normalization.
BATCHNORM, BKN, GKN = "batchnorm", "bkn", "gkn"


@dataclass(frozen=True)
class NormLayer:
    """A normalization layer the analysis looks at.

    ``group_size``: samples per statistics group (``None``: the whole forward batch; 1 for GKN,
    whose statistics are per sample). ``units``: what a statistic describes, ``"channel"`` or
    (GKN) ``"channel group"``.
    """

    name: str
    module: nn.Module
    kind: str
    group_size: int | None

    @property
    def units(self) -> str:
        return "channel group" if self.kind == GKN else "channel"


class GroupStatistics(NamedTuple):
    """One forward batch of one layer, shapes (G, W): G groups (GKN: samples), W units.

    ``batch_mean``/``batch_var``: the group's own mean and biased variance; ``mean``/``var``: what
    the layer normalised with (BatchNorm: the same; BKN/GKN: the posterior); ``gain``: the gain q
    applied (Kalman layers) or ``None``; ``count``: values per group and unit (m).
    """

    batch_mean: Tensor
    batch_var: Tensor
    mean: Tensor
    var: Tensor
    gain: Tensor | None
    count: int


#: ``observe(layer, layer_input, statistics)``, called after each layer's forward.
Observer = Callable[[NormLayer, Tensor, GroupStatistics], None]


def is_batchnorm_like(module: nn.Module) -> bool:
    """A non-Kalman norm with BatchNorm's moving statistics (or a BatchNorm without them)."""
    if isinstance(module, (KalmanNormBase, InstanceNormBase)):
        return False
    if isinstance(module, BatchNormBase):
        return True
    return isinstance(getattr(module, "running_mean", None), Tensor) and isinstance(
        getattr(module, "running_var", None), Tensor
    )


def find_norm_layers(model: nn.Module, stat_batch_size: int | None = None) -> list[NormLayer]:
    """The BatchNorm-like, BKN and GKN layers of ``model`` (registration order), with the group
    size each uses in batch mode (``stat_batch_size`` overrides every layer's own, but GKN's)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, GroupKalmanNorm):
            found.append(NormLayer(name, module, GKN, 1))
        elif isinstance(module, BatchKalmanNorm):
            size = module.stat_batch_size if stat_batch_size is None else stat_batch_size
            found.append(NormLayer(name, module, BKN, size))
        elif is_batchnorm_like(module):
            own = getattr(module, "stat_batch_size", None)
            size = own if stat_batch_size is None else stat_batch_size
            found.append(NormLayer(name, module, BATCHNORM, size))
    return found


def _check_count(layer: NormLayer, count: int) -> None:
    if count < 2:
        raise ValueError(
            f"norm layer '{layer.name}': a statistics group holds a single value per channel, so "
            f"its variance is undefined; use a larger stat_batch_size"
        )


def _batchnorm_hooks(layer: NormLayer, observe: Observer | None) -> list:
    """Replace the eval output of a BatchNorm-like layer by BatchNorm per statistics group."""
    module = layer.module
    size = layer.group_size

    def forward_hook(mod: nn.Module, args: tuple, output: Tensor) -> Tensor:
        x = args[0]
        mean, var, count = kf.group_moments(x, size)
        _check_count(layer, count)
        used_mean, used_var = mean, var
        if isinstance(mod, MovingAverageBatchNorm):  # the second moment, no centring
            used_mean, used_var = torch.zeros_like(mean), var + mean.square()
        y = kf.normalize(
            x,
            used_mean,
            used_var,
            getattr(mod, "weight", None),
            getattr(mod, "bias", None),
            float(getattr(mod, "eps", 1e-5)),
        )
        if observe is not None:
            observe(layer, x, GroupStatistics(mean, var, used_mean, used_var, None, count))
        return y

    return [module.register_forward_hook(forward_hook)]


def _kalman_hooks(layer: NormLayer, observe: Observer) -> list:
    """Report the statistics a Kalman layer recorded in its forward."""

    def pre_hook(mod: nn.Module, args: tuple) -> None:
        mod.last_statistics = None

    def forward_hook(mod: nn.Module, args: tuple, output: Tensor) -> None:
        stats = mod.last_statistics
        if stats is None:
            return
        x = args[0]
        groups = stats.batch_mean.shape[0]
        if layer.kind == GKN:
            count = x[0].numel() // mod.num_groups
        else:
            count = (x.shape[0] // groups) * x[0, 0].numel()
        observe(
            layer,
            x,
            GroupStatistics(
                stats.batch_mean,
                stats.batch_var,
                stats.posterior_mean,
                stats.posterior_var,
                stats.gain,
                count,
            ),
        )

    return [
        layer.module.register_forward_pre_hook(pre_hook),
        layer.module.register_forward_hook(forward_hook),
    ]


@contextlib.contextmanager
def batch_statistics_mode(
    model: nn.Module,
    stat_batch_size: int | None = None,
    observe: Observer | None = None,
) -> Iterator[list[NormLayer]]:
    """Run ``model`` with statistics-group batch statistics inside the block (see module doc).

    Yields the norm layers found. Forward passes inside the block should be whole groups (the
    batch a multiple of every layer's group size) and run under ``torch.no_grad``.
    """
    check_stat_batch_size(stat_batch_size)
    layers = find_norm_layers(model, stat_batch_size)
    training = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    restore: list[tuple[nn.Module, str, object]] = []
    handles: list = []
    try:
        model.eval()
        for layer in layers:
            module = layer.module
            if layer.kind == BATCHNORM:
                handles += _batchnorm_hooks(layer, observe)
                continue
            restore.append((module, "last_statistics", module.last_statistics))
            if layer.kind == BKN:
                restore += [
                    (module, "eval_statistics", module.eval_statistics),
                    (module, "stat_batch_size", module.stat_batch_size),
                ]
                module.eval_statistics = "batch"
                module.stat_batch_size = layer.group_size
            if observe is not None:
                handles += _kalman_hooks(layer, observe)
        yield layers
    finally:
        for handle in handles:
            handle.remove()
        for module, attribute, value in reversed(restore):
            setattr(module, attribute, value)
        for module, flag in training:
            module.training = flag
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)


@contextlib.contextmanager
def moving_statistics_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode with every layer that has an ``eval_statistics`` mode on its moving statistics
    (the ``"auto"`` default takes each sample's own with one-sample groups); modes, training
    flags and buffers restored after the block."""
    training = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.eval_statistics) for m in model.modules() if hasattr(m, "eval_statistics")]
    try:
        model.eval()
        for module, _ in modes:
            module.eval_statistics = "moving"
        yield model
    finally:
        for module, mode in modes:
            module.eval_statistics = mode
        for module, flag in training:
            module.training = flag
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)


def whole_groups(layers: list[NormLayer], batch_size: int) -> int:
    """The number every forward batch must be a multiple of so that each layer sees whole groups.

    The least common multiple of the layers' group sizes; if a layer takes the whole forward
    batch as its group (``group_size=None``), every batch must have exactly ``batch_size``
    samples (then ``batch_size`` itself, which must be a multiple of the other group sizes).
    """
    multiple = math.lcm(1, *(layer.group_size for layer in layers if layer.group_size is not None))
    if all(layer.group_size is not None for layer in layers):
        return multiple
    if batch_size % multiple:
        raise ValueError(
            f"batch_size={batch_size} is not a multiple of the statistics-group sizes "
            f"(least common multiple {multiple}); pick a batch size that is"
        )
    return batch_size
