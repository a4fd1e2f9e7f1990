"""Group Kalman Normalization (Wang et al., NeurIPS 2018: Kalman Normalization, GKN).

Group Normalization's statistics, filtered across layers. For sample n and channel group g of
layer k (C_k channels in G_k groups, m = (C_k / G_k) * prod(spatial) values):

    xbar_{n,g} = (1/m) sum x,   s^2_{n,g} = (1/m) sum (x - xbar_{n,g})^2
    prior      mu^{k|k-1}_n = A^k mu^{k-1|k-1}_n,
               sigma^2_{k|k-1,n} = (A^k o A^k) sigma^2_{k-1|k-1,n} + R^k      (A^k: G_k x G_{k-1})
    posterior  mu^{k|k}_n = p mu^{k|k-1}_n + q xbar_n
               sigma^2_{k|k,n} = p sigma^2_{k|k-1,n} + q s^2_n + p q (xbar_n - mu^{k|k-1}_n)^2
    y_{n,c} = (x_{n,c} - mu^{k|k}_{n,g(c)}) / sqrt(sigma^2_{k|k,n,g(c)} + eps) * gamma_c + beta_c

with q, R per group (learned as in BKN). The statistics are per sample, so training and
evaluation compute the same thing and there are no moving averages. The first GKN layer of a
chain is exactly GroupNorm.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kalmannorm import functional as kf
from kalmannorm.autolink import await_link
from kalmannorm.fused import ChannelGroups, fused_applicable
from kalmannorm.layers.affine import empty_output, init_affine
from kalmannorm.layers.base import DEFAULT_NOISE, KalmanNormBase


class GroupKalmanNorm(KalmanNormBase):
    """Group Kalman Normalization over (N, C, *) inputs.

    Args:
        num_groups: channel groups G (must divide ``num_channels``).
        num_channels: channels C.
        eps, affine: as in :class:`torch.nn.GroupNorm`.
        gain, learn_gain, noise, guard, check_finite: as in :class:`BatchKalmanNorm`.

    Groups come first, as in :class:`torch.nn.GroupNorm`; the channel-first factory for a
    ``norm_layer`` argument is ``kalmannorm.norm_layer("gkn", num_groups=...)`` (unset: the
    default groups, at most 32 of at least 8 channels).

    Shape:
        - Input: (N, C, *), any N (statistics are per sample).
        - Output: the input's shape.

    Examples::

        >>> import torch, kalmannorm
        >>> layer = kalmannorm.GroupKalmanNorm(4, 16)  # alone: GroupNorm(4, 16)
        >>> layer(torch.randn(1, 16, 5, 5)).shape
        torch.Size([1, 16, 5, 5])
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        gain: float | None = None,
        learn_gain: bool | None = None,
        noise: float = DEFAULT_NOISE,
        guard: float | None = None,
        check_finite: bool = False,
    ) -> None:
        super().__init__()
        if num_groups < 1 or num_channels % num_groups != 0:
            raise ValueError(
                f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups}); "
                f"pick a group count that divides {num_channels}"
            )
        factory_kwargs = {"device": device, "dtype": dtype}
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.num_features = num_channels
        self.eps = eps
        self.affine = affine
        init_affine(self, num_channels, affine, factory_kwargs)
        self._init_kalman(
            num_groups,
            prior="learned",
            gain=gain,
            learn_gain=learn_gain,
            noise=noise,
            guard=guard,
            covariance="diag",
            check_finite=check_finite,
            factory_kwargs=factory_kwargs,
        )
        await_link(self)  # linked on its model's first forward unless linked before

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"{self.display_name} expects input (N, {self.num_channels}, ...), got shape "
                f"{tuple(x.shape)}; build it with the input's channel count as num_channels."
            )
        if self.tracing:
            return x.clone()
        if x.shape[0] == 0:  # as torch's GroupNorm: an empty batch in, an empty batch out
            return empty_output(x, self.weight, self.bias)
        upstream = self.upstream_posterior()
        inputs = self.estimate_inputs(upstream)
        if fused_applicable(x, (self.weight, *inputs)):
            return self._forward_fused(x, inputs)
        # (N, G, C/G, *spatial) -> per-sample group statistics, shape (N, G).
        grouped = x.unflatten(1, (self.num_groups, self.num_channels // self.num_groups))
        if grouped.dtype in (torch.float16, torch.bfloat16):
            grouped = grouped.float()
        dims = tuple(range(2, grouped.dim()))
        batch_var, batch_mean = torch.var_mean(grouped, dim=dims, correction=0)
        self.check_statistics(batch_mean, batch_var, grouped[0, 0].numel())
        estimate = self.estimate(batch_mean, batch_var, *inputs)
        self.record(batch_mean, batch_var, estimate)
        mean, var = estimate.mean, estimate.var
        per_channel = self.num_channels // self.num_groups
        return kf.normalize(
            x,
            mean.repeat_interleave(per_channel, dim=1),
            var.repeat_interleave(per_channel, dim=1),
            self.weight,
            self.bias,
            self.eps,
        )

    def _forward_fused(self, x: Tensor, inputs: tuple[Tensor | None, ...]) -> Tensor:
        """The same computation through :class:`kalmannorm.fused.FusedGroupNorm`."""
        count = x[0].numel() // self.num_groups
        y, _, _ = self.fused_step(x, ChannelGroups(self.num_groups), count, inputs)
        return y
