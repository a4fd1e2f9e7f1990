"""Moving Average Batch Normalization (Yan et al., ICLR 2020), with statistics groups.

"Towards Stabilizing Batch Statistics in Backward Propagation of Batch Normalization". BatchNorm
depends on four batch statistics: the mean and variance in the forward pass and, in its backward
pass, g_B = mean(dL/dy_hat) and Psi_B = mean(dL/dy_hat * y_hat). With a small batch all four are
noisy. MABN (i) drops the mean, normalising by the quadratic mean chi (the second moment), which
also removes g_B from the backward pass, and (ii) replaces the two remaining statistics by moving
averages over iterations. Per statistics group g of s = ``stat_batch_size`` samples, channel c,
m = s * prod(spatial) values, at training iteration t:

    chi2_B,t  = (1/m) sum x^2                                   this batch's second moment
    chi2_t    = SMA_n(chi2_B) = (1/n) sum_{tau = t-n+1..t} chi2_B,tau       n = min(t, window)
    chi2_hat  = EMA of chi2_t   (the moving average, before this step's update)
    r         = stop_gradient(clip(sqrt(chi2_t + eps) / sqrt(chi2_hat + eps), 1/r_max, r_max))
    x_hat     = x / sqrt(chi2_t + eps)
    y         = gamma * r * x_hat + beta

and the backward pass, with g = dL/dx_hat = r * gamma * dL/dy:

    Psi_B,t   = (1/m) sum g * x_hat                             this batch's backward statistic
    Psi_t     = SMA_n(Psi_B)                                    over the same window
    dL/dx     = (g - x_hat * Psi_t) / sqrt(chi2_t + eps)
    dL/dgamma = sum dL/dy * r * x_hat,    dL/dbeta = sum dL/dy

(the paper's Algorithm 1, with the EMA entering the forward pass by renormalisation as in Batch
Renormalization: where r is not clipped, y = gamma x / sqrt(chi2_hat + eps) + beta). With a window
of one iteration and r = 1 this is exactly the gradient of y = gamma x / sqrt(chi2_B + eps) + beta
(BatchNorm without centring); the moving averages make the backward pass use ``window`` times more
samples than the batch holds, which autograd cannot express (a past iteration's Psi is a
statistic of its own gradient), hence the custom :class:`MovingAverageNormFunction`.

**Schedule** (the authors' code; the paper does not give its numbers). For the first
``warmup_steps`` training steps (default 100) both statistics are the batch's own (chi2_B, Psi_B),
the windows filling meanwhile; r = 1 for the first ``renorm_start`` steps (default 1000, the
forward pass normalises by the SMA), then r is clipped to [1/r_max, r_max] (r_max = 5). The clock
is the ``mabn_step`` buffer (training forwards), saved in the state_dict.

**The mean.** MABN never subtracts a mean; to keep the inputs of a normalisation near zero mean,
the paper centres the weights of every convolution (W - mean over its fan-in, per output
channel): :func:`center_conv_weights` applies that to a converted model.

**Moving statistics and checkpoints.** Buffer names are BatchNorm's. ``running_mean`` is the EMA
of the batch mean (not used to normalise: it tells how far from centred the input is) and
``running_var`` is kept such that ``running_var + running_mean^2`` is chi2_hat, the EMA of
chi2_t, so both keep BatchNorm's meaning and a BatchNorm checkpoint (or ``convert_norm``) gives
chi2_hat = var + mean^2, that layer's second moment. Eval mode normalises with chi2_hat
(``eval_statistics="batch"``: each test group by its own chi2_B). The windows of past statistics
(``window_sq``, ``window_psi``: (window - 1, G, C), allocated on first use, on the layer's device),
their counts (``sq_count``, ``psi_count``) and ``mabn_step`` are buffers, so a resumed run
continues them. ``momentum`` is BatchNorm's (weight of the new value); the paper uses 0.02
(its 0.98 on the old value): pass ``momentum=0.02`` for its setting.

**Statistics groups** are emulated devices, as in :mod:`kalmannorm.layers.cross_iteration`: each
group keeps its own window, so a group's statistics come from ``stat_batch_size * window_size``
samples, as on a device with that micro-batch (the authors' code instead fixes the per-GPU batch
in the layer). The batch size is free; a batch that splits into another number of groups restarts
the windows (with a warning). Under ``DistributedDataParallel`` use ``broadcast_buffers=False``
(as the training harness does) so that each rank keeps its own windows, as the paper's per-GPU
layer does. The second moment exists for a single value, so any ``stat_batch_size`` works, 1
included.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as torch_f

from kalmannorm import functional as kf
from kalmannorm._torch_private import NormBase
from kalmannorm.layers.affine import empty_output
from kalmannorm.layers.ghost_batch import (
    check_input,
    check_stat_batch_size,
    evaluates_with_batch,
    moving_average_factor,
    refuse_recomputation,
)

#: Iterations in the moving averages: the authors' ImageNet setting (normalisation batch 2,
#: emulating a batch of 32, i.e. 16 iterations).
DEFAULT_WINDOW_SIZE = 16
#: Training steps that use the batch's own statistics (the authors' ``warmup_iters``).
DEFAULT_WARMUP_STEPS = 100
#: Training steps with r = 1 before renormalising towards the moving average (authors' code).
DEFAULT_RENORM_START = 1000
#: Limit of the renormalisation factor r after ``renorm_start`` (authors' code: [1/5, 5]).
DEFAULT_R_MAX = 5.0

_WINDOW_KEYS = ("window_sq", "window_psi")
_STATE_KEYS = ("sq_count", "psi_count", "mabn_step")

#: ``record(psi_batch)``: called in the backward pass with Psi_B, detached, shape (G, C).
Recorder = Callable[[Tensor], None]


# -- the mathematics ----------------------------------------------------------------------------


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _spatial_dims(t: Tensor) -> tuple[int, ...]:
    return tuple(range(2, t.dim()))


def _values_per_group(x: Tensor, groups: int) -> int:
    """m = s * prod(spatial): the values of one channel in one statistics group."""
    return (x.shape[0] // groups) * math.prod(x.shape[2:])


def _group_sum(per_sample: Tensor, groups: int) -> Tensor:
    """(N, C) -> (G, C): the sum over each group's s samples."""
    return per_sample.unflatten(0, (groups, per_sample.shape[0] // groups)).sum(dim=1)


def group_second_moments(x: Tensor, stat_batch_size: int | None) -> tuple[Tensor, Tensor, int]:
    """Mean and second moment chi2_B = (1/m) sum x^2 per statistics group and channel.

    Returns ``(mean (G, C), second (G, C), m)``; low-precision inputs accumulate in float32. Both
    come from per-sample sums over positions (sum x and ||x||^2, contiguous reductions) added up
    over each group's samples: the second moment is a sum of squares, with no cancellation.
    """
    groups = kf.num_stat_groups(x.shape[0], stat_batch_size)
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    spatial = _spatial_dims(work)
    count = _values_per_group(x, groups)
    if spatial:
        sums = work.sum(dim=spatial)
        squares = torch.linalg.vector_norm(work, dim=spatial).square()
    else:
        sums, squares = work, work.square()
    return _group_sum(sums, groups) / count, _group_sum(squares, groups) / count, count


def window_average(current: Tensor, past: Tensor, weight: Tensor) -> Tensor:
    """SMA over the current value and the past records that count.

    ``current`` (G, C), ``past`` (R, G, C) and ``weight`` (R,) in {0, 1} (which records exist and
    are in use): (current + sum_r w_r past_r) / (1 + sum_r w_r).
    """
    if past.shape[0] == 0:
        return current
    weight = weight.to(current.dtype)
    total = current + torch.einsum("r,rgc->gc", weight, past.to(current.dtype))
    return total / (1.0 + weight.sum())


def renorm_factor(second: Tensor, moving_second: Tensor, r_max: Tensor, eps: float) -> Tensor:
    """r = clip(sqrt(chi2_t + eps) / sqrt(chi2_hat + eps), 1/r_max, r_max), without gradient."""
    with torch.no_grad():
        ratio = torch.sqrt((second + eps) / (moving_second.to(second.dtype) + eps))
        r_max = r_max.to(second.dtype)
        return torch.minimum(torch.maximum(ratio, r_max.reciprocal()), r_max)


class MovingAverageNormFunction(torch.autograd.Function):
    """y = gamma * r * x / sqrt(chi2 + eps) + beta with MABN's backward pass.

    Inputs: x (N, C, *spatial) in G groups; ``second`` chi2_t (G, C) and ``r`` (G, C), constants;
    ``psi_past_sum`` (G, C), the sum of the past Psi_B records in the window, and
    ``psi_past_count`` (scalar tensor), how many there are. The backward pass computes Psi_B,
    hands it to ``record`` (if given) and returns dL/dx = (g - x_hat Psi_t) / sqrt(chi2_t + eps)
    with Psi_t = (Psi_B + psi_past_sum) / (1 + psi_past_count).
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        second: Tensor,
        r: Tensor,
        psi_past_sum: Tensor,
        psi_past_count: Tensor,
        eps: float,
        record: Recorder | None,
    ) -> Tensor:
        groups = second.shape[0]
        inv_std = torch.rsqrt(second + eps)
        scale = inv_std * r
        if weight is not None:
            scale = scale * weight.to(scale.dtype)
        # per sample (N, C, 1, ...), so that y is a tensor of its own, not a view (in-place
        # activations after the layer are then allowed)
        spatial = (1,) * (x.dim() - 2)
        per_sample = scale.repeat_interleave(x.shape[0] // groups, dim=0)
        per_sample = per_sample.to(x.dtype).view(*per_sample.shape, *spatial)
        if bias is None:
            y = x * per_sample
        else:
            y = torch.addcmul(bias.to(x.dtype).view(-1, *spatial), x, per_sample)
        ctx.save_for_backward(x, weight, inv_std, r, psi_past_sum, psi_past_count)
        ctx.record = record
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        x, weight, inv_std, r, psi_past_sum, psi_past_count = ctx.saved_tensors
        groups = inv_std.shape[0]
        work = inv_std.dtype
        dy, x = grad_output.to(work), x.to(work)
        spatial = _spatial_dims(x)
        count = _values_per_group(x, groups)
        # sum over a group's values of dy * x, from one per-sample dot product over positions
        dot = torch.linalg.vecdot(x.flatten(2), dy.flatten(2)) if spatial else x * dy
        dot = _group_sum(dot, groups)
        # g = dL/dx_hat = r * gamma * dL/dy, x_hat = x * inv_std:
        # Psi_B = mean(g * x_hat) = r * gamma * inv_std * mean(dy * x)
        gain = r if weight is None else r * weight.to(work)
        psi_batch = gain * inv_std * dot / count
        if ctx.record is not None:
            ctx.record(psi_batch.detach())
        psi = (psi_batch + psi_past_sum.to(work)) / (1.0 + psi_past_count.to(work))
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # (g - x_hat Psi_t) / sqrt(chi2_t + eps) = dy r gamma inv_std - x Psi_t inv_std^2
            per_sample = (1,) * len(spatial)
            dy_scale = (gain * inv_std).repeat_interleave(x.shape[0] // groups, dim=0)
            x_scale = (psi * inv_std.square()).repeat_interleave(x.shape[0] // groups, dim=0)
            grad_x = dy * dy_scale.view(*dy_scale.shape, *per_sample)
            grad_x = grad_x.addcmul_(x, x_scale.view(*x_scale.shape, *per_sample), value=-1.0)
            grad_x = grad_x.to(grad_output.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            # sum dy * x_hat * r over every group, sample and position
            grad_weight = (r * inv_std * dot).sum(dim=0).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = (dy.sum(dim=spatial) if spatial else dy).sum(dim=0)
            grad_bias = grad_bias.to(grad_output.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


def moving_average_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    second: Tensor,
    r: Tensor,
    psi_past_sum: Tensor,
    psi_past_count: Tensor,
    eps: float,
    record: Recorder | None = None,
) -> Tensor:
    """MABN's training output and backward pass (:class:`MovingAverageNormFunction`)."""
    return MovingAverageNormFunction.apply(
        x, weight, bias, second, r, psi_past_sum, psi_past_count, eps, record
    )


def second_moment_norm(
    x: Tensor, second: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """y = gamma x / sqrt(chi2 + eps) + beta, chi2 (G, C) per group or (C,); plain autograd."""
    return kf.normalize(x, torch.zeros_like(second), second, weight, bias, eps)


# -- the layer ----------------------------------------------------------------------------------


class MovingAverageBatchNorm(NormBase):
    """Moving Average Batch Normalization over (N, C, *spatial); use the 1d/2d/3d classes.

    Args:
        num_features: channels C.
        eps, momentum, affine, track_running_stats: as in :class:`torch.nn.BatchNorm2d`
            (``momentum`` of the EMA chi2_hat; the paper's is 0.02). Without running statistics
            r = 1 and eval mode uses each group's own second moment.
        stat_batch_size: samples per statistics group (each keeps its own windows); ``None``: the
            whole batch is one group.
        window_size: n, iterations in the simple moving averages of chi2 and Psi (the current one
            included); 1 uses the batch's statistics alone.
        warmup_steps: training steps that use the batch's own chi2_B and Psi_B.
        renorm_start: training steps with r = 1 (normalising by the SMA chi2_t); afterwards r is
            clipped to [1/r_max, r_max].
        r_max: limit of the renormalisation factor (>= 1; 1 never renormalises).
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
        window_size: int = DEFAULT_WINDOW_SIZE,
        warmup_steps: int = DEFAULT_WARMUP_STEPS,
        renorm_start: int = DEFAULT_RENORM_START,
        r_max: float = DEFAULT_R_MAX,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        check_stat_batch_size(stat_batch_size)
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
            raise ValueError(
                f"window_size must be a positive integer (1: the batch's statistics alone), got "
                f"{window_size!r}"
            )
        for name, value in (("warmup_steps", warmup_steps), ("renorm_start", renorm_start)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if r_max < 1.0:
            raise ValueError(f"r_max must be >= 1 (r is clipped to [1/r_max, r_max]), got {r_max}")
        self.stat_batch_size = stat_batch_size
        #: statistics used in eval mode (``set_eval_statistics``; "moving" by default: MABN's
        #: forward normalises with moving averages, and its batch evaluation fails at s = 1)
        self.eval_statistics = "moving"
        self.window_size = window_size
        self.warmup_steps = int(warmup_steps)
        self.renorm_start = int(renorm_start)
        self.r_max = float(r_max)
        #: Set while the chain builder traces execution order: pass the input through unchanged.
        self.tracing = False
        for key in _WINDOW_KEYS:
            self.register_buffer(key, torch.zeros(0, device=device, dtype=dtype))
        for key in _STATE_KEYS:
            self.register_buffer(key, torch.zeros((), dtype=torch.long, device=device))

    def _check_input_dim(self, x: Tensor) -> None:
        check_input(self, x, self._expected_dims, "MovingAverageBatchNorm")

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, stat_batch_size={self.stat_batch_size}, "
            f"window_size={self.window_size}, warmup_steps={self.warmup_steps}, "
            f"renorm_start={self.renorm_start}, r_max={self.r_max}"
        )

    # -- statistics ---------------------------------------------------------------------------

    def moving_second_moment(self) -> Tensor:
        """chi2_hat = running_var + running_mean^2, the EMA of the second moment (C,)."""
        return self.running_var + self.running_mean.square()

    def eval_affine(self) -> tuple[Tensor, Tensor]:
        """Eval mode with moving statistics as y = x * scale + shift (used by ``fold``)."""
        scale = torch.rsqrt(self.moving_second_moment() + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = torch.zeros_like(scale) if self.bias is None else self.bias.expand_as(scale)
        return scale.detach().clone(), shift.detach().clone()

    def reset_window(self) -> None:
        """Drop every record of past iterations (the next steps refill the windows)."""
        for key in _WINDOW_KEYS:
            setattr(self, key, getattr(self, key).new_zeros(0))
        self.sq_count.zero_()
        self.psi_count.zero_()

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if self.tracing:
            return x
        if x.shape[0] == 0:  # as torch's BatchNorm: an empty batch in, an empty batch out
            return empty_output(x, self.weight, self.bias)
        if not self.training:
            if self.track_running_stats and not evaluates_with_batch(self):
                return second_moment_norm(
                    x, self.moving_second_moment(), self.weight, self.bias, self.eps
                )
            _, second, _ = group_second_moments(x, self.stat_batch_size)
            return second_moment_norm(x, second, self.weight, self.bias, self.eps)
        refuse_recomputation(self)
        groups = kf.num_stat_groups(x.shape[0], self.stat_batch_size)
        dtype = _stat_dtype(x)
        with torch.no_grad():
            batch_mean, batch_second, _ = group_second_moments(x.detach(), self.stat_batch_size)
            self._prepare_windows(groups, dtype)
            self.mabn_step.add_(1)
            averaging = self.mabn_step > self.warmup_steps  # device scalar: no host sync
            second = window_average(
                batch_second, self.window_sq, self._in_use(self.sq_count, averaging)
            )
            psi_weight = self._in_use(self.psi_count, averaging).to(dtype)
            psi_past_sum = torch.einsum("r,rgc->gc", psi_weight, self.window_psi.to(dtype))
            psi_past_count = psi_weight.sum()
            if self.track_running_stats:
                # (Python numbers, not tensors made from them: on a GPU each would be a blocking
                # copy from the host)
                renorming = self.mabn_step > self.renorm_start
                r_max = torch.where(renorming, self.r_max, 1.0).to(dtype)
                r = renorm_factor(second, self.moving_second_moment(), r_max, self.eps)
                self._update_running_stats(batch_mean, second)
            else:
                r = torch.ones_like(second)
            self._record(self.window_sq, self.sq_count, batch_second)
        record = self._record_psi if self.window_size > 1 else None
        return moving_average_norm(
            x, self.weight, self.bias, second, r, psi_past_sum, psi_past_count, self.eps, record
        )

    def _update_running_stats(self, batch_mean: Tensor, second: Tensor) -> None:
        """EMA of the batch mean and of chi2_t; running_var = chi2_hat - running_mean^2."""
        factor = moving_average_factor(self)
        if isinstance(factor, Tensor):  # momentum None: 1 / steps, a tensor
            factor = factor.to(second.dtype)
        moving_second = self.moving_second_moment().to(second.dtype)
        moving_second = moving_second.lerp(second.mean(0), factor)
        kf.exponential_average(self.running_mean, batch_mean.mean(0), factor)
        self.running_var.copy_(moving_second - self.running_mean.to(second.dtype).square())

    # -- the windows --------------------------------------------------------------------------

    def _prepare_windows(self, groups: int, dtype: torch.dtype) -> None:
        """Allocate the windows for ``groups`` statistics groups (restarting them if needed)."""
        shape = (self.window_size - 1, groups, self.num_features)
        if tuple(self.window_sq.shape) == shape and tuple(self.window_psi.shape) == shape:
            return
        if self.window_sq.numel() > 0 or self.window_psi.numel() > 0:
            warnings.warn(
                f"{type(self).__name__}: the batch splits into {groups} statistics groups but the "
                f"windows hold records of {self.window_sq.shape[1]}; the windows restart. Keep "
                f"the batch size fixed (e.g. drop_last=True) to avoid this.",
                stacklevel=3,
            )
        device = self.mabn_step.device
        self.window_sq = torch.zeros(shape, dtype=dtype, device=device)
        self.window_psi = torch.zeros(shape, dtype=dtype, device=device)
        self.sq_count.zero_()
        self.psi_count.zero_()

    def _in_use(self, count: Tensor, averaging: Tensor) -> Tensor:
        """Which of the window's records exist and are averaged (R,), as a bool tensor."""
        records = self.window_size - 1
        exists = torch.arange(records, device=count.device) < count
        return exists & averaging

    @staticmethod
    def _record(window: Tensor, count: Tensor, value: Tensor) -> None:
        """Write ``value`` into the ring ``window`` over its oldest record."""
        records = window.shape[0]
        if records == 0:
            return
        slot = torch.remainder(count, records).view(1)
        window.index_copy_(0, slot, value.to(window.dtype).unsqueeze(0))
        count.add_(1)

    def _record_psi(self, psi_batch: Tensor) -> None:
        """Store this step's Psi_B (called by the backward pass)."""
        if psi_batch.shape != self.window_psi.shape[1:]:
            return  # the windows restarted between this forward and its backward
        with torch.no_grad():
            self._record(self.window_psi, self.psi_count, psi_batch)

    # -- checkpoints --------------------------------------------------------------------------

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        for key in _WINDOW_KEYS:
            given = state_dict.get(prefix + key)
            if given is None:  # a BatchNorm checkpoint: no windows yet
                state_dict[prefix + key] = getattr(self, key).new_zeros(0)
                for count in ("sq_count", "psi_count"):
                    state_dict[prefix + count] = torch.zeros_like(getattr(self, count))
            elif isinstance(given, Tensor) and given.shape != getattr(self, key).shape:
                setattr(self, key, getattr(self, key).new_empty(given.shape, dtype=given.dtype))
        for key in _STATE_KEYS:
            if prefix + key not in state_dict:
                state_dict[prefix + key] = torch.zeros_like(getattr(self, key))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class MovingAverageBatchNorm1d(MovingAverageBatchNorm):
    """MABN over (N, C) or (N, C, L) inputs.

    Arguments: as :class:`MovingAverageBatchNorm`.

    Shape:
        - Input: (N, C) or (N, C, L), N a multiple of ``stat_batch_size``.
        - Output: the input's shape.
    """

    _expected_dims = (2, 3)


class MovingAverageBatchNorm2d(MovingAverageBatchNorm):
    """MABN over (N, C, H, W) inputs.

    Arguments: as :class:`MovingAverageBatchNorm`.

    Shape:
        - Input: (N, C, H, W), N a multiple of ``stat_batch_size``.
        - Output: the input's shape.

    Examples::

        >>> import torch
        >>> from kalmannorm.baselines import MovingAverageBatchNorm2d
        >>> layer = MovingAverageBatchNorm2d(16, stat_batch_size=2)
        >>> layer(torch.randn(8, 16, 5, 5)).shape
        torch.Size([8, 16, 5, 5])
    """

    _expected_dims = (4,)


class MovingAverageBatchNorm3d(MovingAverageBatchNorm):
    """MABN over (N, C, D, H, W) inputs.

    Arguments: as :class:`MovingAverageBatchNorm`.

    Shape:
        - Input: (N, C, D, H, W), N a multiple of ``stat_batch_size``.
        - Output: the input's shape.
    """

    _expected_dims = (5,)


# -- weight centring ----------------------------------------------------------------------------


def centered_weight(weight: Tensor) -> Tensor:
    """W - mean(W) over each output channel's fan-in (input channels / groups and taps).

    The output of a convolution with centred weights has mean sum_j (w_j - w_bar) E[u_j], which is
    zero when the inputs of the fan-in share their mean: the centring MABN drops from the norm
    moves into the convolution (the paper's "weight centralization").
    """
    return weight - weight.mean(dim=tuple(range(1, weight.dim())), keepdim=True)


class _CenteredWeight:
    """Mixin of the centring layers: they apply :func:`centered_weight` of their stored weight.

    The centred weight a forward computes is shared with the Kalman prior that reads it in the
    same pass (:meth:`convolved_weight`): one centring and one centring backward per step, where
    computing it twice made two weight-sized passes forward and three backward more. It is held
    by a weak reference, alive while the convolution's backward keeps it, so no weight-sized
    tensor outlives the step; it is reused only while the stored weight is the same tensor at
    the same version and grad mode is the same.
    """

    weight: Tensor

    def convolved_weight(self) -> Tensor:
        """The weight the forward uses (what a data-flow prior propagates through)."""
        shared = self.__dict__.get("_centred_in_forward")
        found = None if shared is None else shared.of(self.weight)
        return centered_weight(self.weight) if found is None else found

    def _centred_for_forward(self, weight: Tensor) -> Tensor:
        """:func:`centered_weight` of ``weight``, kept for the prior when it is the stored one."""
        centred = centered_weight(weight)
        if weight is self.weight and not torch.compiler.is_compiling():
            self.__dict__["_centred_in_forward"] = _SharedCentring.keep(centred, weight)
        return centred

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return super()._conv_forward(input, self._centred_for_forward(weight), bias)  # type: ignore[misc]

    def __getstate__(self) -> dict:
        # a copy (deepcopy, pickle) computes its own centred weight
        state = super().__getstate__()  # type: ignore[misc]
        state.pop("_centred_in_forward", None)
        return state


class _SharedCentring(NamedTuple):
    """A forward's centred weight, weakly held, and what it was centred from."""

    centred: weakref.ref
    weight: weakref.ref
    version: int
    grad_mode: bool

    @classmethod
    def keep(cls, centred: Tensor, weight: Tensor) -> _SharedCentring:
        return cls(
            weakref.ref(centred), weakref.ref(weight), weight._version, torch.is_grad_enabled()
        )

    def of(self, weight: Tensor) -> Tensor | None:
        """The centred weight, if it is still alive and centred from ``weight`` as it is now
        (same tensor, same version) in the current grad mode."""
        same = self.weight() is weight and self.version == weight._version
        return self.centred() if same and self.grad_mode == torch.is_grad_enabled() else None


class CenteredConv1d(_CenteredWeight, nn.Conv1d):
    """nn.Conv1d that convolves with :func:`centered_weight` (gradient through the centring)."""


class CenteredConv2d(_CenteredWeight, nn.Conv2d):
    """nn.Conv2d that convolves with :func:`centered_weight` (gradient through the centring)."""


class CenteredConv3d(_CenteredWeight, nn.Conv3d):
    """nn.Conv3d that convolves with :func:`centered_weight` (gradient through the centring)."""


class CenteredLinear(_CenteredWeight, nn.Linear):
    """nn.Linear with :func:`centered_weight` (each output's weights sum to zero)."""

    def forward(self, input: Tensor) -> Tensor:
        return torch_f.linear(input, self._centred_for_forward(self.weight), self.bias)


_CENTERED: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: CenteredConv1d,
    nn.Conv2d: CenteredConv2d,
    nn.Conv3d: CenteredConv3d,
    nn.Linear: CenteredLinear,
}
_CENTERED_TYPES = tuple(_CENTERED.values())


def center_conv_weights(
    model: nn.Module, layers: str = "feeding", example_input: object = None
) -> list[str]:
    """Centre the weights of convolutions in ``model`` as MABN's paper does; returns their names.

    ``layers="feeding"`` (default): the convolution/linear layer that produces the input of each
    :class:`MovingAverageBatchNorm` (found as the Kalman chain finds its feeders: the last one
    with matching width registered -- or, with ``example_input``, run -- before it; in a ResNet
    every convolution). ``layers="all"``: every ``Conv1d/2d/3d`` (not linear layers), as the
    authors' ResNet does. Each layer keeps its identity, parameters and state_dict keys (its class
    becomes the centring subclass, e.g. :class:`CenteredConv2d`, whose forward uses
    :func:`centered_weight`), so optimisers, hooks and checkpoints are unaffected; the stored
    weight stays uncentred, as in the authors' code. Calling it twice changes nothing. Layers
    of other classes (subclasses of the torch layers) are refused with a ``TypeError``.
    """
    if layers == "feeding":
        from kalmannorm.chain import find_feeding_layers

        found, _ = find_feeding_layers(
            model,
            lambda m: isinstance(m, MovingAverageBatchNorm),
            example_input,
            kind="MABN layer",
        )
        names = {id(m): n for n, m in model.named_modules()}
        targets = [(names[id(e.feeding)], e.feeding) for e in found if e.feeding is not None]
    elif layers == "all":
        conv_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
        targets = [(n, m) for n, m in model.named_modules() if isinstance(m, conv_types)]
    else:
        raise ValueError(f"layers must be 'feeding' or 'all', got {layers!r}")
    centred: list[str] = []
    for name, module in dict((id(m), (n, m)) for n, m in targets).values():
        if not isinstance(module, _CENTERED_TYPES):
            cls = _CENTERED.get(type(module))
            if cls is None:
                raise TypeError(
                    f"center_conv_weights: {name!r} is a {type(module).__name__}, not one of "
                    f"nn.Conv1d/2d/3d or nn.Linear, so its forward cannot be centred here; "
                    f"centre its weight in its own forward, or pass layers='feeding' on a model "
                    f"whose MABN layers follow plain torch layers."
                )
            module.__class__ = cls
        centred.append(name)
    return centred


__all__ = [
    "CenteredConv1d",
    "CenteredConv2d",
    "CenteredConv3d",
    "CenteredLinear",
    "MovingAverageBatchNorm",
    "MovingAverageBatchNorm1d",
    "MovingAverageBatchNorm2d",
    "MovingAverageBatchNorm3d",
    "MovingAverageNormFunction",
    "center_conv_weights",
    "centered_weight",
    "group_second_moments",
    "moving_average_norm",
    "renorm_factor",
    "second_moment_norm",
    "window_average",
]
