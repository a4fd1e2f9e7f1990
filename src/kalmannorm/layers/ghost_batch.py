"""Ghost Batch Normalization: BatchNorm with statistics per group of ``stat_batch_size`` samples.

Training forward, per statistics group g of s = ``stat_batch_size`` consecutive samples (all
groups in one vectorised pass, :func:`kalmannorm.functional.group_moments`):

    xbar_g   = (1/m) sum_{i in g} x_i                       m = s * prod(spatial) values a channel
    S_g      = (1/m) sum_{i in g} (x_i - xbar_g)^2          biased, as BatchNorm normalises with
    y        = (x - xbar_g) / sqrt(S_g + eps) * gamma + beta

Moving averages (used in eval mode) take every group: running_mean <- (1 - a) running_mean +
a mean_g xbar_g and running_var <- (1 - a) running_var + a mean_g (m / (m - 1)) S_g, the same
convention as :class:`~kalmannorm.BatchKalmanNorm2d`; with one group (``stat_batch_size=None`` or
equal to the batch) this is exactly :class:`torch.nn.BatchNorm2d`, running statistics included.

Parameter and buffer names are BatchNorm's, so BatchNorm checkpoints load unchanged. The class
derives from ``_NormBase``, not ``_BatchNorm``, so torch's own converters (SyncBatchNorm, fusers)
leave it alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from kalmannorm import functional as kf
from kalmannorm._torch_private import NormBase
from kalmannorm.chain import recomputing
from kalmannorm.fused import (
    BatchStatisticsStep,
    FusedGroupNorm,
    SampleGroups,
    SmallStep,
    TracedStep,
    fused_applicable,
    statistics_dtype,
    variance_guard,
    with_affine,
)
from kalmannorm.layers.affine import empty_output

#: ``estimate(batch_mean, batch_var, *small) -> (mean, var)``: the statistics to normalise with.
Estimate = Callable[..., tuple[Tensor, Tensor]]


def check_input(layer: NormBase, x: Tensor, expected_dims: tuple[int, ...], family: str) -> None:
    """Reject inputs of the wrong dimensionality or channel count, naming the layer and the fix."""
    name = type(layer).__name__
    if x.dim() not in expected_dims:
        shapes = " or ".join(f"{d}D" for d in expected_dims)
        raise ValueError(
            f"{name} expects {shapes} input (N, C, ...), got {x.dim()}D input of shape "
            f"{tuple(x.shape)}. Use the {family} variant that matches your data (1d for "
            f"(N, C[, L]), 2d for (N, C, H, W), 3d for (N, C, D, H, W))."
        )
    if x.shape[1] != layer.num_features:
        raise ValueError(
            f"{name} was built for {layer.num_features} channels but the input has {x.shape[1]} "
            f"(shape {tuple(x.shape)}): build it with num_features={x.shape[1]}."
        )


def check_group_size(layer: NormBase, count: int) -> None:
    """A statistics group of one value per channel has no variance."""
    if count < 2:
        raise ValueError(
            f"{type(layer).__name__}: each statistics group holds a single value per channel, so "
            f"its variance is undefined. Use a larger stat_batch_size (or batch), inputs with "
            f"spatial extent, or a batch-free norm ('gn', 'frn', 'evonorm_s0')."
        )


def refuse_recomputation(layer: NormBase) -> None:
    """Refuse activation checkpointing for a layer whose training forward reads state that its
    previous forward changed (moving averages, a window of past batches): a recomputation in the
    backward would not reproduce the original output."""
    if recomputing():
        raise RuntimeError(
            f"{type(layer).__name__}: activation checkpointing recomputes this layer's forward "
            f"after it has updated the state that forward reads, so the recomputed output would "
            f"differ. Keep it outside checkpointed segments (or use 'bn', 'bkn', 'gkn', 'gn')."
        )


#: What a batch-statistics layer normalises with in eval mode (``set_eval_statistics``).
EVAL_STATISTICS = ("auto", "moving", "batch")


def evaluates_with_batch(layer: object) -> bool:
    """Whether ``layer`` in eval mode normalises each test statistics group with its own
    statistics: ``eval_statistics="batch"``, or ``"auto"`` with groups of one sample. A network
    trained on one-sample groups learned each sample's own normalisation, which the moving
    averages do not reproduce (preact ResNet-20, s = 1: BKN 83.6 % with each sample's statistics
    against 76.1 % with moving ones, ghost BN 77.9 against 33.2; docs/results/REPORT.md)."""
    mode = getattr(layer, "eval_statistics", "moving")
    return mode == "batch" or (mode == "auto" and getattr(layer, "stat_batch_size", None) == 1)


def check_eval_statistics(mode: str) -> None:
    """Refuse an eval-statistics mode other than :data:`EVAL_STATISTICS`."""
    if mode not in EVAL_STATISTICS:
        raise ValueError(f"eval_statistics must be one of {EVAL_STATISTICS}, got {mode!r}")


def check_stat_batch_size(stat_batch_size: int | None) -> None:
    """Refuse a statistics-batch size that is not None or a positive int (True, 2.0, 0)."""
    if stat_batch_size is not None and (
        isinstance(stat_batch_size, bool) or not isinstance(stat_batch_size, int)
    ):
        raise TypeError(f"stat_batch_size must be an int or None, got {stat_batch_size!r}")
    if stat_batch_size is not None and stat_batch_size < 1:
        raise ValueError(f"stat_batch_size must be a positive integer, got {stat_batch_size}")


def moving_average_factor(layer: NormBase) -> float | Tensor:
    """Count the step and return BatchNorm's averaging factor (1/steps when momentum is None, as
    a tensor: torch's BatchNorm reads the count to the host there, this does not)."""
    layer.num_batches_tracked.add_(1)
    if layer.momentum is None:
        return layer.num_batches_tracked.to(layer.running_mean.dtype).reciprocal()
    return layer.momentum


def update_running_stats(layer: NormBase, mean: Tensor, var: Tensor, count: int) -> None:
    """running <- (1 - a) running + a mean over groups; ``var`` is biased and made unbiased."""
    factor = moving_average_factor(layer)
    kf.exponential_average(layer.running_mean, mean.detach().mean(0), factor)
    kf.exponential_average(layer.running_var, var.detach().mean(0) * (count / (count - 1)), factor)


def batch_statistics(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """The estimate of plain (ghost) BatchNorm: the group's own statistics."""
    return mean, var


class GroupedNorm(NamedTuple):
    """Output of :func:`grouped_batch_norm`: y, the detached batch statistics (G, C), the
    statistics normalised with (G, C), and m, the values per group and channel."""

    output: Tensor
    batch_mean: Tensor
    batch_var: Tensor
    mean: Tensor
    var: Tensor
    count: int


def _no_inspection(total: Tensor, total_square: Tensor) -> None:
    """The fused node's inspection hook, unused by the batch-statistics baselines."""


def grouped_batch_norm(
    layer: NormBase,
    x: Tensor,
    estimate: Estimate = batch_statistics,
    small: Sequence[Tensor] = (),
) -> GroupedNorm:
    """y = (x - mu_g) / sqrt(sigma2_g + eps) * gamma + beta with (mu_g, sigma2_g) =
    ``estimate(xbar_g, S_g, *small)`` for each statistics group g of ``layer.stat_batch_size``.

    The gradient flows through ``estimate`` (``small`` tensors are constants unless they require
    grad). Contiguous inputs take :class:`kalmannorm.fused.FusedGroupNorm` (one autograd node,
    BatchNorm's number of passes; float32 statistics for half precision); others the composite
    path, with the same result.
    """
    groups = kf.num_stat_groups(x.shape[0], layer.stat_batch_size)
    count = (x.shape[0] // groups) * math.prod(x.shape[2:])
    check_group_size(layer, count)
    if fused_applicable(x, (layer.weight, layer.bias)) and all(
        t.dtype in (x.dtype, statistics_dtype(x), torch.bool) for t in small
    ):
        layout = SampleGroups(groups)
        step: SmallStep = TracedStep(with_affine(estimate, layout, layer.eps), layout)
        if estimate is batch_statistics and not small:  # its backward written out
            step = BatchStatisticsStep(layout, layer.eps)
        y, mean, var, batch_mean, batch_var = FusedGroupNorm.apply(
            x, layout, variance_guard(layer), step, _no_inspection, layer.weight, layer.bias,
            *small,
        )  # fmt: skip
        return GroupedNorm(
            y, batch_mean.detach(), batch_var.detach(), mean.detach(), var.detach(), count
        )
    batch_mean, batch_var, _ = kf.group_moments(x, layer.stat_batch_size)
    mean, var = estimate(batch_mean, batch_var, *small)
    y = kf.normalize(x, mean, var, layer.weight, layer.bias, layer.eps)
    return GroupedNorm(
        y, batch_mean.detach(), batch_var.detach(), mean.detach(), var.detach(), count
    )


class GhostBatchNorm(NormBase):
    """BatchNorm whose batch statistics come from groups of ``stat_batch_size`` samples.

    Args:
        num_features: channels C.
        eps, momentum, affine, track_running_stats: as in :class:`torch.nn.BatchNorm2d`.
        stat_batch_size: samples per statistics group (the batch must divide into groups of this
            size); ``None``: the whole batch is one group, i.e. plain BatchNorm.
        eval_statistics: in eval mode, ``"moving"`` statistics, each test group's own
            (``"batch"``), or ``"auto"`` (default): its own with one-sample groups, else moving.
    """

    _expected_dims: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        stat_batch_size: int | None = None,
        eval_statistics: str = "auto",
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        check_stat_batch_size(stat_batch_size)
        check_eval_statistics(eval_statistics)
        self.stat_batch_size = stat_batch_size
        #: statistics used in eval mode (:data:`EVAL_STATISTICS`, :func:`evaluates_with_batch`)
        self.eval_statistics = eval_statistics

    def _check_input_dim(self, x: Tensor) -> None:
        check_input(self, x, self._expected_dims, "GhostBatchNorm")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stat_batch_size={self.stat_batch_size}"

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if x.shape[0] == 0:  # as torch's BatchNorm: an empty batch in, an empty batch out
            return empty_output(x, self.weight, self.bias)
        if not (self.training or not self.track_running_stats or evaluates_with_batch(self)):
            return kf.normalize(
                x, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        result = grouped_batch_norm(self, x)
        # a recomputation (activation checkpointing) must not count the batch twice
        if self.training and self.track_running_stats and not recomputing():
            update_running_stats(self, result.batch_mean, result.batch_var, result.count)
        return result.output


class GhostBatchNorm1d(GhostBatchNorm):
    """Ghost BatchNorm over (N, C) or (N, C, L) inputs.

    Arguments: as :class:`GhostBatchNorm`.

    Shape:
        - Input: (N, C) or (N, C, L), N a multiple of ``stat_batch_size``.
        - Output: the input's shape.
    """

    _expected_dims = (2, 3)


class GhostBatchNorm2d(GhostBatchNorm):
    """Ghost BatchNorm over (N, C, H, W) inputs.

    Arguments: as :class:`GhostBatchNorm`.

    Shape:
        - Input: (N, C, H, W), N a multiple of ``stat_batch_size``.
        - Output: the input's shape.

    Examples::

        >>> import torch
        >>> from kalmannorm.baselines import GhostBatchNorm2d
        >>> layer = GhostBatchNorm2d(16, stat_batch_size=2)
        >>> layer(torch.randn(8, 16, 5, 5)).shape
        torch.Size([8, 16, 5, 5])
    """

    _expected_dims = (4,)


class GhostBatchNorm3d(GhostBatchNorm):
    """Ghost BatchNorm over (N, C, D, H, W) inputs.

    Arguments: as :class:`GhostBatchNorm`.

    Shape:
        - Input: (N, C, D, H, W), N a multiple of ``stat_batch_size``.
        - Output: the input's shape.
    """

    _expected_dims = (5,)
