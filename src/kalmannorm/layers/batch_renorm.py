"""Batch Renormalization (Ioffe, NeurIPS 2017), with statistics groups and a relaxation schedule.

Training forward, per statistics group g of ``stat_batch_size`` samples (m values a channel):

    mu_B, sigma_B = xbar_g, sqrt(S_g + eps)        group mean and biased variance (as BatchNorm)
    sigma         = sqrt(running_var + eps)        the moving statistics, before this step's update
    r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
    d = stop_gradient(clip((mu_B - running_mean) / sigma, -d_max, d_max))
    y = ((x - mu_B) / sigma_B * r + d) * gamma + beta

r and d are computed without autograd, so the backward pass is BatchNorm's backward scaled by r
(Algorithm 1 of the paper). The layer normalises with the equivalent statistics
mu' = mu_B - d sigma_B / r, sigma'^2 = sigma_B^2 / r^2 - eps (same output and gradient), so it
shares ghost BatchNorm's fused path. With r_max = 1 and d_max = 0 the layer is (ghost) BatchNorm
exactly. Moving averages follow BatchNorm's convention (running_var averages the unbiased group
variance, see :mod:`kalmannorm.layers.ghost_batch`); evaluation normalises with them, as
BatchNorm does.

**Schedule.** The paper trains with r_max = 1, d_max = 0 for the first 5k steps, then relaxes them
gradually to r_max = 3 (reached at 40k steps) and d_max = 5 (reached at 25k steps). Here, after
t training steps (forwards in training mode, counted by the ``renorm_step`` buffer, saved in the
state_dict so a resumed run continues the schedule):

    r_max(t) = 1 + (r_max - 1) * clamp((t - warmup_steps) / r_max_relax_steps, 0, 1)
    d_max(t) =          d_max  * clamp((t - warmup_steps) / d_max_relax_steps, 0, 1)

with defaults r_max = 3, d_max = 5, warmup_steps = 5000, r_max_relax_steps = 35000,
d_max_relax_steps = 20000 (the paper's numbers; "gradually" is taken to be linear). A relax length
of 0 jumps to the final value right after the warm-up; ``warmup_steps=0`` with both relax lengths 0
gives fixed limits from the first step. Scale the lengths to your run: they are in steps.

**Short runs.** Where r and d stay inside their limits (in practice almost always once relaxed),
the training forward is exactly (x - running_mean) / sigma: normalisation by the moving
averages, which lag the batch statistics by about 1 / momentum steps, while the gradient is
BatchNorm's scaled by r, so the offset d is invisible to it. When the weights move fast (a few
hundred steps at a high learning rate) this lag costs accuracy, mostly through d; it is the
method's behaviour (Algorithm 1), not an approximation error. See the BRN note in
docs/results/small-cnn/REPORT.md for the measurements.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from kalmannorm import functional as kf
from kalmannorm._torch_private import NormBase
from kalmannorm.layers.affine import empty_output
from kalmannorm.layers.ghost_batch import (
    check_input,
    check_stat_batch_size,
    evaluates_with_batch,
    grouped_batch_norm,
    refuse_recomputation,
    update_running_stats,
)

#: The paper's schedule (Sec. 4.1): final limits, warm-up, and steps from warm-up to each limit.
DEFAULT_R_MAX = 3.0
DEFAULT_D_MAX = 5.0
DEFAULT_WARMUP_STEPS = 5000
DEFAULT_R_MAX_RELAX_STEPS = 35000
DEFAULT_D_MAX_RELAX_STEPS = 20000


def relaxed_limit(step: Tensor, start: float, end: float, warmup: int, relax: int) -> Tensor:
    """Linear relaxation: ``start`` for ``warmup`` steps, then to ``end`` over ``relax`` steps.

    limit(t) = start + (end - start) * clamp((t - warmup) / relax, 0, 1); ``relax = 0`` jumps to
    ``end`` after the warm-up. Tensor arithmetic on the step's device (no host synchronisation).
    """
    elapsed = (step - warmup).to(torch.float64)
    if relax == 0:
        fraction = (elapsed >= 0).to(torch.float64)
    else:
        fraction = (elapsed / relax).clamp(0.0, 1.0)
    return start + (end - start) * fraction


def renorm_correction(
    batch_mean: Tensor,
    batch_std: Tensor,
    running_mean: Tensor,
    running_std: Tensor,
    r_max: Tensor | float,
    d_max: Tensor | float,
) -> tuple[Tensor, Tensor]:
    """r = clip(sigma_B / sigma, 1/r_max, r_max), d = clip((mu_B - mu) / sigma, -d_max, d_max).

    Computed from detached values: r and d are constants for autograd (stop_gradient).
    """
    dtype = batch_mean.dtype
    r_max = torch.as_tensor(r_max, dtype=dtype, device=batch_mean.device)
    d_max = torch.as_tensor(d_max, dtype=dtype, device=batch_mean.device)
    with torch.no_grad():
        ratio = batch_std.detach() / running_std
        r = torch.minimum(torch.maximum(ratio, r_max.reciprocal()), r_max)
        shift = (batch_mean.detach() - running_mean) / running_std
        d = torch.minimum(torch.maximum(shift, -d_max), d_max)
    return r, d


class BatchRenorm(NormBase):
    """Batch Renormalization over (N, C, *spatial) inputs; use the 1d/2d/3d classes.

    Args:
        num_features: channels C.
        eps, momentum, affine, track_running_stats: as in :class:`torch.nn.BatchNorm2d`. Without
            running statistics there is nothing to renormalise towards: the layer is BatchNorm.
        stat_batch_size: samples per statistics group; ``None``: the whole batch is one group.
        r_max, d_max: the limits the schedule relaxes towards (r_max >= 1, d_max >= 0).
        warmup_steps: training steps with r_max = 1, d_max = 0 (plain BatchNorm).
        r_max_relax_steps, d_max_relax_steps: steps after the warm-up until each limit is reached.
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
        r_max: float = DEFAULT_R_MAX,
        d_max: float = DEFAULT_D_MAX,
        warmup_steps: int = DEFAULT_WARMUP_STEPS,
        r_max_relax_steps: int = DEFAULT_R_MAX_RELAX_STEPS,
        d_max_relax_steps: int = DEFAULT_D_MAX_RELAX_STEPS,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        check_stat_batch_size(stat_batch_size)
        if r_max < 1.0:
            raise ValueError(f"r_max must be >= 1 (r is clipped to [1/r_max, r_max]), got {r_max}")
        if d_max < 0.0:
            raise ValueError(f"d_max must be >= 0 (d is clipped to [-d_max, d_max]), got {d_max}")
        for name, value in (
            ("warmup_steps", warmup_steps),
            ("r_max_relax_steps", r_max_relax_steps),
            ("d_max_relax_steps", d_max_relax_steps),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.stat_batch_size = stat_batch_size
        #: statistics used in eval mode (``set_eval_statistics``; "moving" by default: the
        #: corrections toward the moving averages are what this norm trains for)
        self.eval_statistics = "moving"
        self.final_r_max = float(r_max)
        self.final_d_max = float(d_max)
        self.warmup_steps = int(warmup_steps)
        self.r_max_relax_steps = int(r_max_relax_steps)
        self.d_max_relax_steps = int(d_max_relax_steps)
        # The schedule's clock: training steps taken. A buffer, so it is saved and restored.
        self.register_buffer(
            "renorm_step", torch.zeros((), dtype=torch.long, device=device), persistent=True
        )

    # -- the schedule -------------------------------------------------------------------------

    def limits(self) -> tuple[Tensor, Tensor]:
        """(r_max, d_max) for the next training step, as tensors on the layer's device."""
        step = self.renorm_step
        r_max = relaxed_limit(
            step, 1.0, self.final_r_max, self.warmup_steps, self.r_max_relax_steps
        )
        d_max = relaxed_limit(
            step, 0.0, self.final_d_max, self.warmup_steps, self.d_max_relax_steps
        )
        return r_max, d_max

    @property
    def r_max(self) -> float:
        """The limit on r for the next training step."""
        return float(self.limits()[0])

    @property
    def d_max(self) -> float:
        """The limit on |d| for the next training step."""
        return float(self.limits()[1])

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # A BatchNorm checkpoint has no schedule: start it from the beginning.
        key = prefix + "renorm_step"
        if key not in state_dict:
            state_dict[key] = torch.zeros_like(self.renorm_step)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # -- forward ------------------------------------------------------------------------------

    def _check_input_dim(self, x: Tensor) -> None:
        check_input(self, x, self._expected_dims, "BatchRenorm")

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, stat_batch_size={self.stat_batch_size}, "
            f"r_max={self.final_r_max}, d_max={self.final_d_max}, warmup_steps="
            f"{self.warmup_steps}, r_max_relax_steps={self.r_max_relax_steps}, "
            f"d_max_relax_steps={self.d_max_relax_steps}"
        )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if x.shape[0] == 0:  # as torch's BatchNorm: an empty batch in, an empty batch out
            return empty_output(x, self.weight, self.bias)
        if not (self.training or not self.track_running_stats or evaluates_with_batch(self)):
            return kf.normalize(
                x, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        if not (self.training and self.track_running_stats):
            return grouped_batch_norm(self, x).output
        refuse_recomputation(self)
        r_max, d_max = self.limits()
        self.renorm_step.add_(1)
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        small = (
            self.running_mean.to(dtype, copy=True),
            torch.sqrt(self.running_var.to(dtype) + self.eps),
            r_max.to(dtype),
            d_max.to(dtype),
        )
        result = grouped_batch_norm(self, x, partial(renormalized_statistics, eps=self.eps), small)
        update_running_stats(self, result.batch_mean, result.batch_var, result.count)
        return result.output


def renormalized_statistics(
    batch_mean: Tensor,
    batch_var: Tensor,
    running_mean: Tensor,
    running_std: Tensor,
    r_max: Tensor,
    d_max: Tensor,
    *,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """The statistics (mu', sigma'^2) that make BatchNorm's formula Batch Renormalization.

    With sigma_B = sqrt(S + eps) and r, d from :func:`renorm_correction` (constants for autograd),
    mu' = mu_B - d sigma_B / r and sigma'^2 + eps = sigma_B^2 / r^2 give
    (x - mu') / sqrt(sigma'^2 + eps) = (x - mu_B) / sigma_B * r + d, whose gradient with respect to
    (mu_B, S) is the paper's (Algorithm 1).
    """
    batch_std = torch.sqrt(batch_var + eps)
    r, d = renorm_correction(batch_mean, batch_std, running_mean, running_std, r_max, d_max)
    return batch_mean - d * batch_std / r, (batch_var + eps) / r.square() - eps


class BatchRenorm1d(BatchRenorm):
    """Batch Renormalization over (N, C) or (N, C, L) inputs.

    Arguments: as :class:`BatchRenorm`.

    Shape:
        - Input: (N, C) or (N, C, L), N a multiple of ``stat_batch_size``.
        - Output: the input's shape.
    """

    _expected_dims = (2, 3)


class BatchRenorm2d(BatchRenorm):
    """Batch Renormalization over (N, C, H, W) inputs.

    Arguments: as :class:`BatchRenorm`.

    Shape:
        - Input: (N, C, H, W), N a multiple of ``stat_batch_size``.
        - Output: the input's shape.

    Examples::

        >>> import torch
        >>> from kalmannorm.baselines import BatchRenorm2d
        >>> layer = BatchRenorm2d(16, stat_batch_size=2)
        >>> layer(torch.randn(8, 16, 5, 5)).shape
        torch.Size([8, 16, 5, 5])
    """

    _expected_dims = (4,)


class BatchRenorm3d(BatchRenorm):
    """Batch Renormalization over (N, C, D, H, W) inputs.

    Arguments: as :class:`BatchRenorm`.

    Shape:
        - Input: (N, C, D, H, W), N a multiple of ``stat_batch_size``.
        - Output: the input's shape.
    """

    _expected_dims = (5,)
