"""Pure tensor math of Batch/Group Kalman Normalization.

Every function here is stateless: the layers in :mod:`kalmannorm.layers` hold parameters and
buffers and call these. Notation follows Wang et al., "Batch Kalman Normalization" (Eq. 5 and
Algorithm 1): for layer k and one statistics group,

    prior      mu^{k|k-1}  = A mu^{k-1|k-1}
               Sigma^{k|k-1} = A Sigma^{k-1|k-1} A^T + R
    posterior  mu^{k|k}    = p mu^{k|k-1} + q xbar
               Sigma^{k|k} = p Sigma^{k|k-1} + q S + p q (xbar - mu^{k|k-1})(xbar - mu^{k|k-1})^T

with p = 1 - q. Statistics tensors are shaped ``(G, C)`` (G statistics groups, C channels) and
full covariances ``(G, C, C)``. Gains are per channel, shape ``(C,)``, or per group and channel.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor


def num_stat_groups(batch_size: int, stat_batch_size: int | None) -> int:
    """Number of statistics groups G = N / s; ``None`` means one group holding the whole batch."""
    if stat_batch_size is None:
        return 1
    if stat_batch_size < 1:
        raise ValueError(f"stat_batch_size must be a positive integer, got {stat_batch_size}")
    if batch_size % stat_batch_size != 0:
        raise ValueError(
            f"batch size {batch_size} is not divisible by stat_batch_size={stat_batch_size}: "
            f"use a batch size that is a multiple of {stat_batch_size}, or a stat_batch_size "
            f"that divides {batch_size}"
        )
    return batch_size // stat_batch_size


def split_groups(x: Tensor, stat_batch_size: int | None) -> Tensor:
    """View ``x`` (N, C, *spatial) as (G, s, C, *spatial); works for any memory format."""
    groups = num_stat_groups(x.shape[0], stat_batch_size)
    return x.unflatten(0, (groups, x.shape[0] // groups))


def reduction_dims(grouped: Tensor) -> tuple[int, ...]:
    """Dims of a (G, s, C, *spatial) tensor that statistics reduce over: samples and positions."""
    return (1, *range(3, grouped.dim()))


def group_moments(x: Tensor, stat_batch_size: int | None) -> tuple[Tensor, Tensor, int]:
    """Batch mean xbar and biased variance diag(S) per statistics group, in one pass.

    xbar = (1/m) sum_i x_i and S_cc = (1/m) sum_i (x_ic - xbar_c)^2 over the m = s * prod(spatial)
    values of channel c in a group. Returns ``(mean (G, C), var (G, C), m)``. Low-precision inputs
    accumulate in float32.
    """
    grouped = split_groups(x, stat_batch_size)
    count = grouped.shape[1] * math.prod(grouped.shape[3:])
    if grouped.dtype in (torch.float16, torch.bfloat16):
        grouped = grouped.float()
    var, mean = torch.var_mean(grouped, dim=reduction_dims(grouped), correction=0)
    return mean, var, count


def group_covariance(x: Tensor, stat_batch_size: int | None) -> tuple[Tensor, Tensor, int]:
    """Batch mean xbar (G, C) and full covariance S (G, C, C) per statistics group.

    S = (1/m) sum_i (x_i - xbar)(x_i - xbar)^T over samples and spatial positions of the group.
    """
    grouped = split_groups(x, stat_batch_size)
    if grouped.dtype in (torch.float16, torch.bfloat16):
        grouped = grouped.float()
    g, c = grouped.shape[0], grouped.shape[2]
    # (G, C, s * positions): channels first, every value of a channel in one row.
    rows = grouped.movedim(2, 1).reshape(g, c, -1)
    count = rows.shape[-1]
    mean = rows.mean(dim=-1)
    centred = rows - mean.unsqueeze(-1)
    cov = centred @ centred.transpose(1, 2) / count
    return mean, cov, count


def diagonal(cov: Tensor) -> Tensor:
    """The variances diag(Sigma) of a batch of covariance matrices (G, C, C) -> (G, C)."""
    return cov.diagonal(dim1=-2, dim2=-1)


def predict_prior(
    upstream_mean: Tensor,
    upstream_var: Tensor,
    transition: Tensor,
    noise: Tensor,
) -> tuple[Tensor, Tensor]:
    """Diagonal prior: mu^{k|k-1} = A mu^{k-1|k-1}, diag(Sigma^{k|k-1}) = (A o A) sigma^2 + R.

    For a diagonal upstream covariance, diag(A Sigma A^T) = (A o A) sigma^2 exactly. An upstream
    full covariance (G, C', C') is also accepted: diag(A Sigma A^T)_c = sum_j (A Sigma)_cj A_cj.
    Parameters of a half-precision model meet the statistics in the statistics' dtype.
    """
    transition, noise = transition.to(upstream_mean.dtype), noise.to(upstream_mean.dtype)
    prior_mean = upstream_mean @ transition.T
    if upstream_var.dim() == upstream_mean.dim() + 1:
        prior_var = ((transition @ upstream_var) * transition).sum(-1)
    else:
        prior_var = upstream_var @ (transition * transition).T
    return prior_mean, prior_var + noise


def predict_data_flow_prior(
    input_mean: Tensor,
    input_var: Tensor,
    scale: Tensor | None = None,
    noise_raw: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Prior from the data-flow prediction (m, v) of the layer's own input (:mod:`dataflow`).

    Propagated (no learned parameters): mu^{k|k-1} = m, sigma^2_{k|k-1} = v. Learned, with a
    diagonal transition a and noise R = softplus(r): mu^{k|k-1} = a o m,
    sigma^2_{k|k-1} = (a o a) v + R — the paper's prior with A = diag(a) acting on the moments
    the feeding operations imply instead of on the upstream posterior.
    """
    if scale is None:
        return input_mean, input_var
    noise = torch.nn.functional.softplus(noise_raw)
    return input_mean * scale, input_var * scale.square() + noise


#: Range of the prior-variance calibration factor kappa (:func:`calibrate_prior_variance`).
CALIBRATION_RANGE = (0.1, 10.0)


def calibrate_prior_variance(
    prior_var: Tensor, batch_var_average: Tensor, prior_var_average: Tensor
) -> Tensor:
    """kappa o sigma^2_{k|k-1}, kappa_c = EMA_t(mean_g S_gc) / EMA_t(mean_g sigma^2_{k|k-1,gc}).

    The data-flow prior's variance treats a layer's inputs as independent across channels and
    positions; correlated features make it off by a factor that changes as slowly as the weights.
    kappa is that factor measured over past training steps (detached, clamped to
    :data:`CALIBRATION_RANGE`; 1 before the first measurement).
    """
    low, high = CALIBRATION_RANGE
    measured = prior_var_average > 0
    ones = torch.ones_like(prior_var_average)
    ratio = batch_var_average / torch.where(measured, prior_var_average, ones)
    kappa = torch.where(measured, ratio.clamp(low, high), ones)
    return prior_var * kappa.to(prior_var.dtype)


def predict_prior_full(
    upstream_mean: Tensor,
    upstream_cov: Tensor,
    transition: Tensor,
    noise: Tensor,
) -> tuple[Tensor, Tensor]:
    """Full prior: mu^{k|k-1} = A mu^{k-1|k-1}, Sigma^{k|k-1} = A Sigma^{k-1|k-1} A^T + diag(R).

    A diagonal upstream (G, C') is treated as diag_embed of its variances.
    """
    if upstream_cov.dim() == upstream_mean.dim():
        upstream_cov = torch.diag_embed(upstream_cov)
    transition, noise = transition.to(upstream_mean.dtype), noise.to(upstream_mean.dtype)
    prior_mean = upstream_mean @ transition.T
    prior_cov = transition @ upstream_cov @ transition.T + torch.diag(noise)
    return prior_mean, prior_cov


def guard_gain(
    gain: Tensor, prior_var: Tensor, batch_var: Tensor, limit: float
) -> tuple[Tensor, Tensor]:
    """The authors' guard: q where mean_c(sigma^2_{k|k-1} / S) < ``limit`` in a statistics
    group, else 1 (the batch statistics alone); and whether each group kept its prior (G, 1).

    Variances are diagonal (G, C); a prior variance (1, C) broadcasts over the groups.
    """
    accepted = (prior_var / batch_var).mean(-1, keepdim=True) < limit
    return torch.where(accepted, gain, 1.0), accepted


def kalman_update(
    batch_mean: Tensor,
    batch_var: Tensor,
    prior_mean: Tensor,
    prior_var: Tensor,
    gain: Tensor,
) -> tuple[Tensor, Tensor]:
    """Eq. (5), diagonal: fuse the prior with the batch statistics through the gain q.

    mu^{k|k} = p mu^{k|k-1} + q xbar
    sigma^2_{k|k} = p sigma^2_{k|k-1} + q S + p q (xbar - mu^{k|k-1})^2
    """
    # The same, in fewer operations: mu = mu_prior + q r and
    # sigma^2 = sigma^2_prior + q (S - sigma^2_prior + p r^2), with innovation r = xbar - mu_prior.
    innovation = batch_mean - prior_mean
    mean = torch.addcmul(prior_mean, gain, innovation)
    spread = torch.addcmul(batch_var - prior_var, 1.0 - gain, innovation.square())
    var = torch.addcmul(prior_var, gain, spread)
    return mean, var


def kalman_update_full(
    batch_mean: Tensor,
    batch_cov: Tensor,
    prior_mean: Tensor,
    prior_cov: Tensor,
    gain: Tensor,
) -> tuple[Tensor, Tensor]:
    """Eq. (5) with full covariances and a per-channel gain q (C,).

    Per-channel gains enter the matrix equation as the symmetric weights
    P_ij = sqrt(p_i p_j), Q_ij = sqrt(q_i q_j), (PQ)_ij = sqrt(p_i q_i p_j q_j) (Hadamard products),
    so that Sigma^{k|k} = P o Sigma^{k|k-1} + Q o S + (PQ) o (d d^T), d = xbar - mu^{k|k-1}.
    For a scalar gain this is Eq. (5) exactly; the diagonal always equals :func:`kalman_update`;
    Hadamard products of positive semi-definite matrices keep Sigma^{k|k} positive semi-definite.
    """
    keep = 1.0 - gain
    innovation = batch_mean - prior_mean
    mean = keep * prior_mean + gain * batch_mean
    root_keep = keep.sqrt()
    root_gain = gain.sqrt()
    root_both = root_keep * root_gain
    weights_prior = root_keep.unsqueeze(-1) * root_keep.unsqueeze(-2)
    weights_batch = root_gain.unsqueeze(-1) * root_gain.unsqueeze(-2)
    scaled_innovation = root_both * innovation
    cov = (
        weights_prior * prior_cov
        + weights_batch * batch_cov
        + scaled_innovation.unsqueeze(-1) * scaled_innovation.unsqueeze(-2)
    )
    return mean, cov


#: The standard deviation's floor relative to the mean, squared (:func:`safe_std`).
STD_FLOOR_SCALE = 1e-6


def safe_std(mean: Tensor, var: Tensor) -> Tensor:
    """s = sqrt(max(var, 0) + 1e-6 mean^2 + eps^2), eps the dtype's machine epsilon: the standard
    deviation with a floor, so that d s / d var = 1 / (2 s) stays finite in float32 (with the
    floor at the smallest normal number it reached 5e18 at var = 0 and overflowed to inf through
    a few layers: NaN gradients in MobileNetV2 at 32 px)."""
    floor = STD_FLOOR_SCALE * mean.square() + torch.finfo(var.dtype).eps ** 2
    return (var.clamp_min(0.0) + floor).sqrt()


def normal_cdf(x: Tensor) -> Tensor:
    """Phi(x) = erfc(-x / sqrt 2) / 2, the standard normal cdf (accurate in the lower tail)."""
    return 0.5 * torch.erfc(-x / math.sqrt(2.0))


def normal_pdf(x: Tensor) -> Tensor:
    """phi(x) = exp(-x^2 / 2) / sqrt(2 pi), the standard normal density."""
    return torch.exp(-0.5 * x.square()) / math.sqrt(2.0 * math.pi)


def relu_moments(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of ReLU(z) for z ~ N(mean, u), elementwise, in closed form.

    With u = :func:`safe_std` ``(mean, var)^2`` (var with a floor), s = sqrt(u), a = mean / s and
    Phi/phi the standard normal cdf/pdf:

        E[relu z] = mean Phi(a) + s phi(a),   E[(relu z)^2] = (mean^2 + u) Phi(a) + mean s phi(a).

    In eager mode its backward is analytic (:class:`_ReluMoments`): a dozen elementwise
    operations instead of autograd's seventy through erf and exp. Finite at any input, since
    |a| stays below 1000, where Phi and phi are 0 or 1 to any precision (a near-zero variance
    with a large mean, a deterministic input, gives the exact moments and finite derivatives).
    """
    if torch.compiler.is_compiling():  # the compiler fuses autograd's backward itself (and a
        # custom Function inside a compiled checkpoint breaks dynamo)
        _, _, _, first, second = _relu_moment_terms(mean, var)
        return first, (second - first.square()).clamp_min(0.0)
    return _ReluMoments.apply(mean, var)


def _relu_moment_terms(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(std, Phi(a), phi(a), E[relu z], E[(relu z)^2]) of :func:`relu_moments`."""
    std = safe_std(mean, var)
    ratio = mean / std
    cdf, pdf = normal_cdf(ratio), normal_pdf(ratio)
    first = mean * cdf + std * pdf
    second = (mean.square() + std.square()) * cdf + mean * std * pdf
    return std, cdf, pdf, first, second


class _ReluMoments(torch.autograd.Function):
    """:func:`relu_moments` with its derivatives in closed form. For z ~ N(m, u) (Stein's lemma):

        d E[relu z] / dm = Phi,   d E[relu z] / du = phi / (2 s),
        d E[(relu z)^2] / dm = 2 E[relu z],   d E[(relu z)^2] / du = Phi,

    and u = max(var, 0) + 1e-6 m^2 + eps^2 adds d u / dm = 2e-6 m, d u / d var = [var >= 0].
    The backward reuses the forward's terms; under ``create_graph`` it recomputes them from the
    inputs, so that it has a backward too.
    """

    @staticmethod
    def forward(ctx, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        terms = _relu_moment_terms(mean, var)
        _, _, _, first, second = terms
        out_var = second - first.square()
        ctx.save_for_backward(mean, var, *terms)
        return first, out_var.clamp_min(0.0)

    @staticmethod
    def backward(ctx, grad_first: Tensor, grad_var: Tensor) -> tuple[Tensor, Tensor]:
        mean, var, *terms = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the terms as functions of the inputs
            terms = _relu_moment_terms(mean, var)
        std, cdf, pdf, first, second = terms
        grad_second = grad_var * (second - first.square() >= 0)  # clamp_min's mask
        grad_first = grad_first - 2.0 * first * grad_second  # var_out = E2 - E1^2
        grad_u = grad_first * pdf / (2.0 * std) + grad_second * cdf
        grad_mean = grad_first * cdf + 2.0 * first * grad_second
        grad_mean = grad_mean + grad_u * (2.0 * STD_FLOOR_SCALE * mean)
        return grad_mean, grad_u * (var >= 0)


def clipped_moments(mean: Tensor, var: Tensor, low: float, high: float) -> tuple[Tensor, Tensor]:
    """Mean and variance of clamp(z, low, high) for z ~ N(mean, u), elementwise, in closed form
    (ReLU6: low 0, high 6).

    With u = :func:`safe_std` ``(mean, var)^2``, s = sqrt(u), a = (low - mean) / s,
    b = (high - mean) / s and c = clamp(Z, a, b) for a standard normal Z, so that
    clamp(z, low, high) = mean + s c:

        E c = a Phi(a) + b Phi(-b) + phi(a) - phi(b),
        E c^2 = a^2 Phi(a) + b^2 Phi(-b) + Phi(b) - Phi(a) + a phi(a) - b phi(b),

    mean_out = mean + s E c and var_out = u (E c^2 - (E c)^2): centred on the mean, so that a
    value well inside the interval keeps its small variance without cancellation. Exact, where
    Gauss-Hermite quadrature (:func:`kalmannorm.moments.gaussian_moments`) converges slowly on
    the kinks; in eager mode its backward is analytic (:class:`_ClippedMoments`).
    """
    if torch.compiler.is_compiling():  # as relu_moments: the compiler differentiates the terms
        return _clipped_moment_terms(mean, var, low, high)[-2:]
    return _ClippedMoments.apply(mean, var, low, high)


def _clipped_moment_terms(
    mean: Tensor, var: Tensor, low: float, high: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(s, P(low < z < high), phi(a), phi(b), mean_out, var_out) of :func:`clipped_moments`."""
    std = safe_std(mean, var)
    # both bounds in one tensor: each of Phi and phi is one chain of operations for the two
    bounds = torch.stack((low - mean, mean - high)) / std  # (a, -b)
    (below, above), (pdf_a, pdf_b) = normal_cdf(bounds), normal_pdf(bounds)
    a, b = bounds[0], -bounds[1]
    inside = 1.0 - below - above
    first = a * below + b * above + pdf_a - pdf_b
    second = a.square() * below + b.square() * above + inside + a * pdf_a - b * pdf_b
    out_var = (std.square() * (second - first.square())).clamp_min(0.0)
    return std, inside, pdf_a, pdf_b, mean + std * first, out_var


class _ClippedMoments(torch.autograd.Function):
    """:func:`clipped_moments` with its derivatives in closed form. For f = clamp(., low, high)
    and z ~ N(m, u), Stein's lemma (d/dm E g = E g', d/du E g = E g'' / 2) gives, with
    P = P(low < z < high) and the density p(low) = phi(a) / s, p(high) = phi(b) / s:

        d E f / dm = P,                      d E f / du = (phi(a) - phi(b)) / (2 s),
        d E f^2 / dm = 2 (m P + s (phi(a) - phi(b))),
        d E f^2 / du = P + (low phi(a) - high phi(b)) / s,

    then var_out = E f^2 - (E f)^2 and u = max(var, 0) + 1e-6 m^2 + eps^2, as for ReLU
    (:class:`_ReluMoments`). Under ``create_graph`` the terms are recomputed from the inputs, so
    that the backward has a backward too.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, mean: Tensor, var: Tensor, low: float, high: float
    ) -> tuple[Tensor, Tensor]:
        terms = _clipped_moment_terms(mean, var, low, high)
        ctx.save_for_backward(mean, var, *terms)
        ctx.bounds = (low, high)
        return terms[-2], terms[-1]

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_first: Tensor, grad_var: Tensor
    ) -> tuple[Tensor | None, ...]:
        mean, var, *terms = ctx.saved_tensors
        low, high = ctx.bounds
        if torch.is_grad_enabled():  # create_graph: the terms as functions of the inputs
            terms = _clipped_moment_terms(mean, var, low, high)
        std, inside, pdf_a, pdf_b, first, out_var = terms
        grad_second = grad_var * (out_var > 0)  # clamp_min's mask; var_out = E f^2 - (E f)^2
        grad_first = grad_first - 2.0 * first * grad_second
        density_step = pdf_a - pdf_b
        grad_u = grad_first * density_step / (2.0 * std) + grad_second * (
            inside + (low * pdf_a - high * pdf_b) / std
        )
        grad_mean = grad_first * inside + grad_second * 2.0 * (mean * inside + std * density_step)
        grad_mean = grad_mean + grad_u * (2.0 * STD_FLOOR_SCALE * mean)
        return grad_mean, grad_u * (var >= 0), None, None


def channel_weights(weight: Tensor, groups: int = 1) -> tuple[Tensor, Tensor]:
    """Collapse a conv/linear weight (C_out, C_in/groups, *kernel) to channel-to-channel maps.

    Returns ``(W_sum, W_sq)`` of shape (C_out, C_in): the sum of the kernel taps and the sum of
    their squares, block-diagonal over convolution groups.
    """
    taps = weight.flatten(2) if weight.dim() > 2 else weight.unsqueeze(-1)
    summed, squared = taps.sum(-1), taps.square().sum(-1)
    if groups == 1:
        return summed, squared
    return (
        torch.block_diag(*summed.chunk(groups, dim=0)),
        torch.block_diag(*squared.chunk(groups, dim=0)),
    )


def linear_moments(
    mean: Tensor,
    var: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Moments of a conv/linear output whose inputs are independent with the given moments.

    mean_out = W_sum mean + b;  var_out = W_sq var, where the sums run over input channels and
    kernel taps (border padding ignored). This is the expectation of what pushing i.i.d. Gaussian
    samples through the layer estimates, without the sampling noise.
    """
    summed, squared = channel_weights(weight.to(mean.dtype), groups)
    out_mean = mean @ summed.T
    if bias is not None:
        out_mean = out_mean + bias.to(mean.dtype)
    return out_mean, var @ squared.T


def affine_from_statistics(
    mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """scale = gamma / sqrt(var + eps) and shift = beta - mean * scale, so y = x * scale + shift."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """y = (x - mu) / sqrt(sigma^2 + eps) * gamma + beta with per-group statistics.

    ``mean``/``var`` are (G, C) for x of shape (N, C, *spatial) with N = G * s, or (C,) for one
    set of statistics (eval mode). Computed as one fused multiply-add x * scale + shift.
    """
    scale, shift = affine_from_statistics(mean, var, weight, bias, eps)
    spatial = (1,) * (x.dim() - 2)
    if mean.dim() == 1:
        return torch.addcmul(
            shift.to(x.dtype).view(-1, *spatial), x, scale.to(x.dtype).view(-1, *spatial)
        )
    groups = mean.shape[0]
    grouped = x.unflatten(0, (groups, x.shape[0] // groups))
    out = torch.addcmul(
        shift.to(x.dtype).view(groups, 1, -1, *spatial),
        grouped,
        scale.to(x.dtype).view(groups, 1, -1, *spatial),
    )
    return out.flatten(0, 1)


def exponential_average(running: Tensor, value: Tensor, momentum: float | Tensor) -> None:
    """Moving average in place: running <- (1 - alpha) running + alpha value (alpha a number or
    a 0-dim tensor).

    (Algorithm 1 prints mu := mu + alpha (mu - mu_hat), a sign slip that diverges.)
    """
    if isinstance(momentum, Tensor):
        momentum = momentum.to(running.dtype)
    running.lerp_(value.to(running.dtype), momentum)


def autocast_off(x: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on ``x``'s device (small statistics keep float32), or nothing when it is off
    already."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()
