"""The temporal prior: a layer's own statistics from previous iterations, as a Kalman filter.

A layer's population statistics (mean m and variance v per channel) drift slowly while the
weights take small steps; each statistics group g of the current step observes them with
sampling noise. Per channel, with the group observations (x_g, S_g) (the batch statistics, or
the depth prior's posterior when the layer has one):

    innovation         e_g = x_g - m,  E e_g^2 = P + N
    sampling noise     N   = Var_g(x_g) (G >= 2 groups) or S / n (one group of n values)
    prior uncertainty  P   = max(EMA_t(mean_g e_g^2) - EMA_t(N), 0)   (drift and estimation)
    gain               K   = P / (P + N)           (in [0, 1]; detached)
    posterior          mu_g = m + K (x_g - m)
                       sigma^2_g = v + K_v (S_g - v) + K (1 - K) (x_g - m)^2

with the same rule for the variance (innovation S_g - v, noise Var_g(S_g) or 2 S^2 / (n - 1)).
A large statistics group has N -> 0, so K -> 1: BatchNorm. One sample per group has a large N
(the spread of single samples' statistics): the layer leans on its history. The time update after
each training step combines the G groups: m <- m + K_G (mean_g x_g - m), K_G = P / (P + N / G),
and likewise v. The first ``warmup`` steps use K = 1 while the noise estimates settle.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

#: Moving-average factor of the innovation and noise estimates.
ERROR_MOMENTUM = 0.1


class TemporalGains(NamedTuple):
    """Gains on the current observation for the mean and the variance, (C,), detached."""

    mean: Tensor
    var: Tensor


def sampling_noise(obs_mean: Tensor, obs_var: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The sampling variance of one group's mean and variance, (C,) each: the spread between
    groups when there are several, else the i.i.d. formulas S / n and 2 S^2 / (n - 1)."""
    groups = obs_mean.shape[0]
    if groups >= 2:
        return obs_mean.var(0), obs_var.var(0)
    var = obs_var[0]
    return var / count, 2.0 * var.square() / max(count - 1, 1)


def gains(
    mean_error: Tensor, var_error: Tensor, mean_noise: Tensor, var_noise: Tensor
) -> TemporalGains:
    """K = P / (P + N) with P = max(E e^2 - N, 0), for the mean and the variance."""
    tiny = torch.finfo(mean_error.dtype).tiny
    prior_mean = (mean_error - mean_noise).clamp_min(0.0)
    prior_var = (var_error - var_noise).clamp_min(0.0)
    return TemporalGains(
        prior_mean / (prior_mean + mean_noise + tiny), prior_var / (prior_var + var_noise + tiny)
    )


def fuse(
    obs_mean: Tensor, obs_var: Tensor, mean: Tensor, var: Tensor, gain: TemporalGains
) -> tuple[Tensor, Tensor]:
    """Posterior per group: mu = m + K (x - m), sigma^2 = v + K_v (S - v) + K (1 - K)(x - m)^2."""
    innovation = obs_mean - mean
    out_mean = mean + gain.mean * innovation
    out_var = var + gain.var * (obs_var - var) + gain.mean * (1 - gain.mean) * innovation.square()
    return out_mean, out_var


@torch.no_grad()
def update(
    state: dict[str, Tensor],
    obs_mean: Tensor,
    obs_var: Tensor,
    count: int,
    warmup: int,
    steps: int,
) -> None:
    """The time update in place after training step ``steps`` (0-based; passed by the caller,
    which counts on the host, so the update needs no host sync): noise and innovation estimates,
    then the state (m, v) from all groups. ``state`` holds the layer's temporal buffers."""
    obs_mean, obs_var = obs_mean.to(state["mean"].dtype), obs_var.to(state["mean"].dtype)
    mean_noise, var_noise = sampling_noise(obs_mean, obs_var, count)
    factor = 1.0 if steps == 0 else ERROR_MOMENTUM
    if steps > 0:
        state["mean_error"].lerp_((obs_mean - state["mean"]).square().mean(0), factor)
        state["var_error"].lerp_((obs_var - state["var"]).square().mean(0), factor)
    state["mean_noise"].lerp_(mean_noise, factor)
    state["var_noise"].lerp_(var_noise, factor)
    groups = obs_mean.shape[0]
    if steps < warmup:
        follow = torch.full_like(state["mean"], max(1.0 / (steps + 1), ERROR_MOMENTUM))
        step_gain = TemporalGains(follow, follow)
    else:
        step_gain = gains(state["mean_error"], state["var_error"],
                          state["mean_noise"] / groups, state["var_noise"] / groups)  # fmt: skip
    state["mean"].add_(step_gain.mean * (obs_mean.mean(0) - state["mean"]))
    state["var"].add_(step_gain.var * (obs_var.mean(0) - state["var"]))
    state["steps"].add_(1)
