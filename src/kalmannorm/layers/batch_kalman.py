"""Batch Kalman Normalization (Wang et al., CVPR 2018), 1d/2d/3d.

Training forward, per statistics group of ``stat_batch_size`` samples (Algorithm 1):

    xbar, S            batch mean and (biased) covariance over samples and positions of the group
    mu^{k|k}, Sigma^{k|k}  Eq. (5) from the upstream layer's posterior (see layers/base.py)
    y = (x - mu^{k|k}) / sqrt(diag Sigma^{k|k} + eps) * gamma + beta

Moving averages, used in eval mode, follow the posterior: running_mean <- (1-a) running_mean +
a mean_g mu^{k|k}_g and running_var <- (1-a) running_var + a mean_g v_g, where v_g is the
posterior variance with the batch covariance S taken unbiased (m/(m-1) S), i.e.
v_g = diag Sigma^{k|k}_g + q S_g / (m - 1). With q = 1 and one group this is exactly BatchNorm's
update. ``eval_statistics="batch"`` evaluates with the posterior of each test statistics group
instead (the paper's inference option 'A', Table 3).

Parameter and buffer names are BatchNorm's (``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``), so a BatchNorm checkpoint loads into a BKN layer; the
Kalman parameters it lacks keep their initial values.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from kalmannorm import functional as kf
from kalmannorm._torch_private import NormBase
from kalmannorm.autolink import await_link
from kalmannorm.chain import recomputing
from kalmannorm.fused import SampleGroups, fused_applicable
from kalmannorm.layers.affine import empty_output
from kalmannorm.layers.base import (
    DEFAULT_NOISE,
    KALMAN_STATE_VERSION,
    KalmanEstimate,
    KalmanNormBase,
)
from kalmannorm.layers.ghost_batch import (
    check_eval_statistics,
    check_stat_batch_size,
    evaluates_with_batch,
)


class BatchKalmanNorm(KalmanNormBase, NormBase):
    """Batch Kalman Normalization over (N, C, *spatial) inputs; use the 1d/2d/3d classes.

    Args:
        num_features: channels C.
        eps, momentum, affine, track_running_stats: as in :class:`torch.nn.BatchNorm2d`.
        stat_batch_size: samples per statistics group (the paper's statistics-batch size); the
            batch must divide into groups of this size. ``None``: the whole batch is one group.
        prior: ``"learned"`` (the paper: learned A, R, q) or ``"propagate"`` (the authors' code).
        gain: initial (or fixed) gain q in [0, 1]; default 0.9 (learned) or 0.1 (propagate).
        learn_gain: learn q (sigmoid-parametrised); default True for ``"learned"``.
        noise: initial process noise R > 0 of the learned prior.
        guard: skip the prior of a group when mean(prior_var / batch_var) reaches this;
            default ``None`` (learned) or 100 (propagate).
        covariance: ``"diag"`` tracks variances, ``"full"`` full covariance matrices.
        eval_statistics: in eval mode, ``"moving"`` statistics, each test group's posterior
            (``"batch"``), or ``"auto"`` (default): the posterior with one-sample groups (the
            moving averages do not fit a network trained on them), else moving.
        check_finite: raise ``FloatingPointError`` naming this layer when its input holds NaN
            or Inf (a debugging aid: one host sync per layer per training step). Off by default:
            a training step then never waits for the device, and, as with torch's BatchNorm, a
            non-finite input makes the output and the loss non-finite, which the training loop
            sees (the lab's harness stops there and keeps the last finite checkpoint).
        calibrate_prior: scale a data-flow prior's variance by the ratio of the batch variance
            to the prior variance measured over past training steps
            (:func:`kalmannorm.functional.calibrate_prior_variance`; buffers
            ``calibration_batch_var`` and ``calibration_prior_var``, moving averages with
            ``momentum``). Corrects the independence assumption of the variance propagation.
        detach_prior_weights: a prior propagated through convolutions (``prior="propagate"``,
            or any data-flow chain) reads their weights as constants: no gradient reaches a
            weight through the prior, which saves the weight-sized passes of the prior's
            backward (a large share of a step on wide networks at small batches,
            docs/performance.md). Off by default: the gradient of the norm as written.
    """

    _expected_dims: tuple[int, ...] = ()
    per_channel_statistics = True

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
        prior: str = "learned",
        gain: float | None = None,
        learn_gain: bool | None = None,
        noise: float = DEFAULT_NOISE,
        guard: float | None = None,
        covariance: str = "diag",
        eval_statistics: str = "auto",
        check_finite: bool = False,
        calibrate_prior: bool = False,
        detach_prior_weights: bool = False,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **factory_kwargs)
        check_stat_batch_size(stat_batch_size)
        check_eval_statistics(eval_statistics)
        self.stat_batch_size = stat_batch_size
        self.eval_statistics = eval_statistics
        if calibrate_prior and covariance == "full":
            raise ValueError("calibrate_prior scales variances only: use covariance='diag'")
        self.calibrate_prior = calibrate_prior
        self.detach_prior_weights = detach_prior_weights
        if calibrate_prior:
            for name in ("batch_var", "prior_var"):
                self.register_buffer(
                    f"calibration_{name}", torch.zeros((num_features,), device=device)
                )
        self._init_kalman(
            num_features,
            prior=prior,
            gain=gain,
            learn_gain=learn_gain,
            noise=noise,
            guard=guard,
            covariance=covariance,
            check_finite=check_finite,
            factory_kwargs=factory_kwargs,
        )
        await_link(self)  # linked on its model's first forward unless linked before

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in self._expected_dims:
            shapes = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ValueError(
                f"{self.display_name} expects {shapes} input (N, C, ...), got {x.dim()}D input of "
                f"shape {tuple(x.shape)}. Use the BatchKalmanNorm variant that matches your data "
                f"(1d for (N, C[, L]), 2d for (N, C, H, W), 3d for (N, C, D, H, W))."
            )
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{self.display_name} was built for {self.num_features} channels but the input "
                f"has {x.shape[1]} (shape {tuple(x.shape)}): the layer before it changed width; "
                f"build this norm with num_features={x.shape[1]}."
            )

    def extra_repr(self) -> str:
        detached = ", detach_prior_weights=True" if self.detach_prior_weights else ""
        return (
            f"{super().extra_repr()}, stat_batch_size={self.stat_batch_size}, prior={self.prior}, "
            f"covariance={self.covariance}{detached}"
        )

    def uses_batch_statistics(self) -> bool:
        """Whether this forward normalises with (Kalman-filtered) batch statistics."""
        return self.training or not self.track_running_stats or evaluates_with_batch(self)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if self.tracing:
            return x.clone()  # a tensor of its own, for the data-flow trace
        if x.shape[0] == 0:  # as torch's BatchNorm: an empty batch in, an empty batch out
            return empty_output(x, self.weight, self.bias)
        if not self.uses_batch_statistics():
            self.publish_fixed(self.running_mean, self.running_var)
            return kf.normalize(
                x, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        upstream = self.upstream_posterior()
        inputs = self.estimate_inputs(upstream)
        if self.covariance == "diag" and fused_applicable(x, (self.weight, *inputs)):
            return self._forward_fused(x, inputs)

        if self.covariance == "full":
            batch_mean, batch_second, count = kf.group_covariance(x, self.stat_batch_size)
            batch_var = batch_second.diagonal(dim1=-2, dim2=-1)
        else:
            batch_mean, batch_second, count = kf.group_moments(x, self.stat_batch_size)
            batch_var = batch_second
        self.check_statistics(batch_mean, batch_var, count)
        estimate = self.estimate(batch_mean, batch_second, *inputs)
        self.record(batch_mean, batch_second, estimate)
        var = kf.diagonal(estimate.var) if self.covariance == "full" else estimate.var
        self._update_running_stats(estimate, var, batch_var, count)
        return kf.normalize(x, estimate.mean, var, self.weight, self.bias, self.eps)

    def _forward_fused(self, x: Tensor, inputs: tuple[Tensor | None, ...]) -> Tensor:
        """The same computation through :class:`kalmannorm.fused.FusedGroupNorm`."""
        groups = kf.num_stat_groups(x.shape[0], self.stat_batch_size)
        count = (x.shape[0] // groups) * math.prod(x.shape[2:])
        after = self._after_step if self._updates_running_stats() else None
        y, _, _ = self.fused_step(x, SampleGroups(groups), count, inputs, after)
        return y

    def _after_step(self, count: int, outputs: tuple, extra: tuple) -> None:
        """The moving averages from the fused node's small step (``outputs``: scale, shift,
        posterior mean and var, batch mean and var; ``extra``: the rest of the estimate)."""
        _, _, mean, var, _, batch_var = outputs
        self._update_running_stats(KalmanEstimate(mean, var, *extra), var, batch_var, count)

    def _updates_running_stats(self) -> bool:
        """Whether this forward moves the averages (training, not a checkpoint's recomputation)."""
        return self.training and self.track_running_stats and not recomputing()

    @property
    def estimate_reads_updated_state(self) -> bool:
        return self.calibrate_prior

    def calibrated_prior_var(self, prior_var: Tensor) -> Tensor:
        """kappa o sigma^2_{k|k-1} with ``calibrate_prior`` (kappa from past steps)."""
        if not self.calibrate_prior:
            return prior_var
        return kf.calibrate_prior_variance(
            prior_var, self.calibration_batch_var, self.calibration_prior_var
        )

    def _update_calibration(self, batch_var: Tensor, predicted_var: Tensor, factor: float) -> None:
        """EMA of mean_g S_g and of mean_g sigma^2_{k|k-1,g} (before calibration); the first
        step sets them."""
        buffers = (self.calibration_batch_var, self.calibration_prior_var)
        started = self.calibration_prior_var > 0  # before either buffer changes (no host sync)
        for buffer, value in zip(buffers, (batch_var.mean(0), predicted_var.mean(0))):
            value = value.to(buffer.dtype)
            buffer.copy_(torch.where(started, torch.lerp(buffer, value, factor), value))

    def _update_running_stats(
        self, estimate: KalmanEstimate, var: Tensor, batch_var: Tensor, count: int
    ) -> None:
        """EMA of the posterior mean and of the posterior variance ``var`` with S unbiased
        (m/(m-1) S); with ``calibrate_prior``, of the calibration's averages."""
        if not self._updates_running_stats():
            return
        with torch.no_grad():
            unbiased_var = torch.addcmul(var, estimate.gain, batch_var, value=1.0 / (count - 1))
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = self.num_batches_tracked.to(self.running_mean.dtype).reciprocal()
            else:
                factor = self.momentum
            kf.exponential_average(self.running_mean, estimate.mean.mean(0), factor)
            kf.exponential_average(self.running_var, unbiased_var.mean(0), factor)
            if self.calibrate_prior and estimate.predicted_var is not None:
                momentum = self.momentum if self.momentum is not None else 0.1
                self._update_calibration(batch_var, estimate.predicted_var, momentum)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        if any(key.startswith(prefix + "temporal_") for key in state_dict):
            # torch reports these keys as unexpected (strict) or returns them (strict=False)
            warnings.warn(
                "the checkpoint holds the state of the temporal prior (temporal_* buffers of "
                "temporal_prior=True), an option since removed (docs/design.md, 'Tried and "
                "removed'); load it with strict=False to drop that state (everything else loads "
                "as saved)",
                stacklevel=2,
            )
        version = local_metadata.get("version")
        if version is None or version < KALMAN_STATE_VERSION:
            # A plain norm's checkpoint has no calibration state: keep the initial.
            for name, value in self._buffers.items():
                key = prefix + name
                if name.startswith("calibration_") and key not in state_dict:
                    state_dict[key] = value.detach().clone()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class BatchKalmanNorm1d(BatchKalmanNorm):
    """BKN over (N, C) or (N, C, L) inputs.

    Arguments: as :class:`BatchKalmanNorm`.

    Shape:
        - Input: (N, C) or (N, C, L), N a multiple of ``stat_batch_size``.
        - Output: the input's shape.
    """

    _expected_dims = (2, 3)


class BatchKalmanNorm2d(BatchKalmanNorm):
    """BKN over (N, C, H, W) inputs.

    Arguments: as :class:`BatchKalmanNorm`.

    Shape:
        - Input: (N, C, H, W), N a multiple of ``stat_batch_size``.
        - Output: the input's shape.

    Examples::

        >>> import torch, kalmannorm
        >>> layer = kalmannorm.BatchKalmanNorm2d(16, stat_batch_size=2)  # alone: BatchNorm
        >>> layer(torch.randn(8, 16, 5, 5)).shape  # 4 statistics groups of 2 samples
        torch.Size([8, 16, 5, 5])
        >>> net = torch.nn.Sequential(
        ...     torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        ...     torch.nn.Conv2d(16, 16, 3), torch.nn.BatchNorm2d(16))
        >>> x = torch.randn(4, 3, 8, 8)
        >>> net = kalmannorm.convert_norm(net, "bkn-flow", stat_batch_size=2, example_input=x)
        >>> type(net[4]).__name__, net(x).shape  # the second predicts from the first
        ('BatchKalmanNorm2d', torch.Size([4, 16, 4, 4]))
    """

    _expected_dims = (4,)


class BatchKalmanNorm3d(BatchKalmanNorm):
    """BKN over (N, C, D, H, W) inputs.

    Arguments: as :class:`BatchKalmanNorm`.

    Shape:
        - Input: (N, C, D, H, W), N a multiple of ``stat_batch_size``.
        - Output: the input's shape.
    """

    _expected_dims = (5,)
