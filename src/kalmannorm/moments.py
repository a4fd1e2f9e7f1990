"""Moments of a tensor pushed through the operations between normalization layers.

Pure functions of small tensors: per statistics group g and channel c, the mean m (G, C) and the
variance v (G, C) of the values a batch-statistics norm would reduce over (samples of the group
and spatial positions). The data-flow prior (:mod:`kalmannorm.dataflow`) composes them to predict
a Kalman layer's input statistics from the layers that produce it. The assumptions, stated once:

* inputs of an operation are independent across channels and positions (no covariance is
  tracked), and Gaussian where a nonlinearity needs a distribution;
* the mean and variance are over positions too: where zero padding makes the expectation differ
  between border and interior positions, the spread of the per-position means is added
  (law of total variance), which is exact under the independence assumption.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as torch_f

from kalmannorm.functional import (
    autocast_off,
    clipped_moments,
    normal_cdf,
    normal_pdf,
    relu_moments,
    safe_std,
)

#: Gauss-Hermite nodes for the expectation of a smooth activation of a Gaussian.
QUADRATURE_NODES = 24


class Moments(NamedTuple):
    """Per-group, per-channel mean and variance, shapes (G, C) (G = 1 broadcasts)."""

    mean: Tensor
    var: Tensor


# -- normalization layers -------------------------------------------------------------------------


def normalized_output(
    batch_mean: Tensor,
    batch_var: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Moments:
    """Moments of y = gamma (x - mu) / sqrt(sigma^2 + eps) + beta for x with the batch's moments.

    mean_y = gamma (xbar - mu) r + beta,  var_y = gamma^2 S r^2,  r = 1 / sqrt(sigma^2 + eps),
    where (mu, sigma^2) are the statistics the layer normalised with (its posterior) and
    (xbar, S) the moments of its input.
    """
    rstd = torch.rsqrt(var + eps)
    scale = rstd if weight is None else rstd * weight
    out_mean = (batch_mean - mean) * scale
    if bias is not None:
        out_mean = out_mean + bias
    return Moments(out_mean, batch_var * scale.square())


def posterior_output(
    mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Moments:
    """:func:`normalized_output` for an input with the posterior's own moments (the prior's
    ``source="posterior"``): mean_y = beta, var_y = gamma^2 sigma^2 / (sigma^2 + eps), the same
    values and gradients with a third of the operations (xbar - mu = 0 drops out). In eager mode
    the variance goes through :class:`_PosteriorOutputVariance` (a backward of 9 operations where
    autograd's takes about 20)."""
    if torch.compiler.is_compiling():  # the compiler fuses autograd's backward itself
        out_var = _posterior_output_variance(var, weight, eps)
    else:
        out_var = _PosteriorOutputVariance.apply(var, weight, eps)
    out_mean = torch.zeros_like(mean) if bias is None else bias.expand_as(mean)
    return Moments(out_mean, out_var)


def _posterior_output_variance(var: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """gamma^2 sigma^2 / (sigma^2 + eps) (G, C) from sigma^2 (G, C) and gamma (C,) or ``None``."""
    ratio = var / (var + eps)
    return ratio if weight is None else ratio * weight.square()


class _PosteriorOutputVariance(torch.autograd.Function):
    """:func:`_posterior_output_variance` with a backward written out: for r = sigma^2 /
    (sigma^2 + eps), dL/dsigma^2 = g gamma^2 eps / (sigma^2 + eps)^2 and dL/dgamma =
    2 gamma sum_G g r. A double backward (``create_graph=True``) differentiates the formula."""

    @staticmethod
    def forward(ctx, var: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        denominator = var + eps
        ratio = var / denominator
        square = None if weight is None else weight.square()
        ctx.eps = eps
        ctx.save_for_backward(var, weight, denominator, ratio, square)
        return ratio if square is None else ratio * square

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        var, weight, denominator, ratio, square = ctx.saved_tensors
        need_var, need_weight, _ = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: the formula's own differentiable backward
            grads = _formula_gradients(
                lambda v, w: (_posterior_output_variance(v, w, ctx.eps),),
                (var, weight), (need_var, need_weight), (grad,),
            )  # fmt: skip
            return (*grads, None)
        grad_var = grad_weight = None
        if need_var:  # g gamma^2 eps / (sigma^2 + eps)^2
            scaled = grad if square is None else grad * square
            grad_var = scaled.mul(ctx.eps).div_(denominator.square())
        if need_weight:  # 2 gamma sum_G g r
            grad_weight = (grad * ratio).sum_to_size(weight.shape).mul_(weight).mul_(2.0)
        return grad_var, grad_weight, None


# -- elementwise activations ----------------------------------------------------------------------


def safe_relu_moments(mean: Tensor, var: Tensor) -> Moments:
    """ReLU moments in closed form (:func:`kalmannorm.functional.relu_moments`) for any input."""
    return Moments(*relu_moments(mean, var))


def _hermite(nodes: int) -> tuple[Tensor, Tensor]:
    """Probabilists' Gauss-Hermite nodes z_i and weights w_i (sum 1): E f(Z) ~ sum w_i f(z_i).

    Golub-Welsch: the nodes are the eigenvalues of the Jacobi matrix with off-diagonal sqrt(i).
    """
    off = torch.arange(1, nodes, dtype=torch.float64).sqrt()
    jacobi = torch.diag(off, 1) + torch.diag(off, -1)
    z, vectors = torch.linalg.eigh(jacobi)
    return z, vectors[0].square()


#: The nodes and weights :func:`gaussian_moments` uses, computed once at import (a compiled
#: program reads them as constants instead of tracing the eigendecomposition; a program keeps
#: its own copy on the model's device: :meth:`kalmannorm.dataflow.Operation.place`).
HERMITE = _hermite(QUADRATURE_NODES)


def gaussian_moments(
    fn: Callable[[Tensor], Tensor],
    mean: Tensor,
    var: Tensor,
    quadrature: tuple[Tensor, Tensor] = HERMITE,
) -> Moments:
    """E f(z) and Var f(z) for z ~ N(mean, var), by Gauss-Hermite quadrature (nodes z_i and
    weights w_i: E f ~ sum_i w_i f(mean + std z_i)).

    Exact for polynomials of degree < 2 * QUADRATURE_NODES; used for the smooth activations
    (SiLU, GELU, Hardswish, sigmoid, tanh, ...), whose Gaussian moments have no closed form.
    """
    z, w = quadrature[0].to(mean), quadrature[1].to(mean)  # no copy where they already match
    std = safe_std(mean, var)
    values = fn(mean.unsqueeze(-1) + std.unsqueeze(-1) * z)
    first = (values * w).sum(-1)
    second = (values.square() * w).sum(-1)
    return Moments(first, (second - first.square()).clamp_min(0.0))


#: Activations by name, by quadrature (ReLU and ReLU6 have closed forms: :func:`activation`).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": torch_f.silu,
    "gelu": torch_f.gelu,
    "gelu_tanh": functools.partial(torch_f.gelu, approximate="tanh"),
    "hardswish": torch_f.hardswish,
    "hardsigmoid": torch_f.hardsigmoid,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "elu": torch_f.elu,
    "mish": torch_f.mish,
}


#: Activations whose Gaussian moments :func:`activation` has in closed form (no quadrature).
CLOSED_FORM_ACTIVATIONS = frozenset({"relu", "relu6"})


def activation(
    kind: str,
    moments: Moments,
    negative_slope: float = 0.0,
    quadrature: tuple[Tensor, Tensor] = HERMITE,
) -> Moments:
    """Moments of an elementwise activation ``kind`` of Gaussian inputs with ``moments``
    (``quadrature``: :func:`gaussian_moments`' nodes and weights, for the smooth ones)."""
    if kind == "relu":
        return safe_relu_moments(*moments)
    if kind == "relu6":
        return Moments(*clipped_moments(*moments, 0.0, 6.0))
    if kind == "leaky_relu":
        leaky = functools.partial(torch_f.leaky_relu, negative_slope=negative_slope)
        return gaussian_moments(leaky, *moments, quadrature)
    return gaussian_moments(ACTIVATIONS[kind], *moments, quadrature)


# -- convolution, linear and pooling --------------------------------------------------------------


class TapGeometry(NamedTuple):
    """Where a kernel's taps fall on a zero-padded input, averaged over output positions.

    ``valid`` (K,): the fraction of output positions at which tap t reads a real (non-padding)
    input. ``spread`` (K, K): Cov_p of the validity indicators of taps t and t', so that the
    variance over positions of the per-position mean sum_t v_t(p) a_t is a^T spread a.
    ``inverse_count``: the mean over positions of 1 / (number of valid taps); ``bordered``:
    whether any tap ever reads padding.
    """

    valid: Tensor
    spread: Tensor
    inverse_count: float
    bordered: bool


def _validity_1d(size: int, kernel: int, stride: int, padding: int, dilation: int) -> Tensor:
    """(P, K) booleans: output position p reads a real input through tap t (one dimension)."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    if out < 1:
        raise ValueError(
            f"a kernel of {kernel} (dilation {dilation}, padding {padding}) does not fit an input "
            f"of size {size}"
        )
    pos = torch.arange(out).unsqueeze(1) * stride - padding
    where = pos + torch.arange(kernel).unsqueeze(0) * dilation
    return (where >= 0) & (where < size)


@functools.cache
def tap_geometry(
    sizes: tuple[int, ...],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
) -> TapGeometry:
    """The tap validity of a zero-padded convolution over inputs of spatial ``sizes``.

    Output positions are a product over dimensions, so the fractions are Kronecker products of
    one-dimensional ones (computed in float64 and cached per geometry).
    """
    valid = torch.ones(1, dtype=torch.float64)
    joint = torch.ones(1, 1, dtype=torch.float64)
    counts = torch.ones(1, dtype=torch.float64)
    for dim in range(len(sizes)):
        v = _validity_1d(sizes[dim], kernel[dim], stride[dim], padding[dim], dilation[dim])
        v = v.to(torch.float64)
        valid = torch.kron(valid, v.mean(0))
        joint = torch.kron(joint, v.T @ v / v.shape[0])
        counts = torch.kron(counts, v.sum(1))
    spread = joint - torch.outer(valid, valid)
    bordered = bool((valid < 1).any())
    return TapGeometry(valid, spread, float((1.0 / counts).mean()), bordered)


def full_geometry(taps: int) -> TapGeometry:
    """Every tap reads a real input at every position (no padding, or padding ignored)."""
    ones = torch.ones(taps, dtype=torch.float64)
    return TapGeometry(ones, torch.zeros(taps, taps, dtype=torch.float64), 1.0 / taps, False)


def convolution(
    moments: Moments,
    weight: Tensor,
    bias: Tensor | None,
    groups: int,
    geometry: TapGeometry,
) -> Moments:
    """Moments of a convolution (or linear layer, K = 1) of independent inputs.

    With a_t = W_t m and c_t = (W_t o W_t) v per output channel and tap t (summed over the
    input channels of the channel's convolution group), f_t = ``geometry.valid`` and
    D = ``geometry.spread``:

        mean = sum_t f_t a_t + b,   var = sum_t f_t c_t + a^T D a.

    The mean and the border term a^T D a (where some tap reads padding) come from the per-tap
    means a_t, one product reading W as it lies; the variance's sum over taps is taken on the
    weight first (sum_t f_t W_t o W_t). In eager mode dense convolutions (``groups`` = 1) go
    through :class:`_DenseConvolutionMoments`, whose backward forms the weight's gradient in
    W's own layout, and depthwise ones (one input channel per output channel) through
    :class:`_DepthwiseConvolutionMoments`. Compiled, with few statistics groups on a GPU, dense
    ones contract by elementwise products and sums (:func:`_contracted_moments`).
    """
    mean, var = moments
    taps = weight.reshape(*weight.shape[:2], -1)  # (C_out, C_in / groups, K); K = 1: linear
    if groups == 1:
        valid = spread = None  # every tap reads a real input: f = 1, D = 0
        if geometry.bordered:
            valid, spread = geometry.valid.to(mean), geometry.spread.to(mean)
        if torch.compiler.is_compiling() and contracts_channels(mean):
            out_mean, out_var = _contracted_moments(mean, var, taps, valid, spread)
        elif torch.compiler.is_compiling() and valid is None and taps.shape[-1] == 1:
            out_mean, out_var = _stacked_linear_moments(mean, var, taps[..., 0])
        elif torch.compiler.is_compiling():  # the compiler fuses autograd's backward itself
            # (and a custom Function inside a compiled checkpoint breaks dynamo)
            out_mean, out_var = _dense_moments(mean, var, taps, valid, spread, tap_sums=True)[:2]
        else:
            out_mean, out_var = _DenseConvolutionMoments.apply(mean, var, weight, valid, spread)
    elif taps.shape[1] == 1 and not torch.compiler.is_compiling():  # depthwise
        out_mean, out_var = _depthwise(mean, var, taps, groups, geometry)
    else:
        tap_sums = torch.compiler.is_compiling()
        contract = tap_sums and contracts_channels(mean)
        out_mean, out_var = _grouped(mean, var, taps, groups, geometry, tap_sums, contract)
    if bias is not None:
        out_mean = out_mean + bias
    return Moments(out_mean, out_var.clamp_min(0.0))


#: Statistics groups up to which the compiled dense rule contracts the input channels by
#: elementwise products and sums (:func:`_contracted_moments`) instead of matrix products.
FEW_GROUPS = 8
#: Devices on which it does: where inductor writes Triton reductions, which read W at memory
#: speed, so that the rule's matrix products (a kernel launch each) go. Inductor's C++
#: reductions on a CPU are much slower than the matrix products there (docs/performance.md).
CONTRACTING_DEVICES = frozenset({"cuda", "xpu"})


def contracts_channels(mean: Tensor) -> bool:
    """Whether the compiled dense rule takes :func:`_contracted_moments` for moments ``mean``
    (G, C_in): few statistics groups on a device in :data:`CONTRACTING_DEVICES`."""
    return mean.shape[0] <= FEW_GROUPS and mean.device.type in CONTRACTING_DEVICES


def _contracted_moments(
    mean: Tensor, var: Tensor, taps: Tensor, valid: Tensor | None, spread: Tensor | None
) -> tuple[Tensor, Tensor]:
    """A dense convolution's (or linear layer's) mean sum_t f_t a_t and variance
    sum_{i,t} v_i f_t W_it^2 (+ a^T D a) (G, C_out), for few statistics groups G, with every
    contraction as an elementwise product and a sum (the form ``torch.compile`` fuses: each
    output a reduction that reads W once per group, inside the kernels around it, and the
    weight's gradient a reduction over the G groups; a matrix product is a kernel of its own, a
    launch on a GPU). ``valid`` and ``spread`` both ``None``: every tap reads a real input."""
    lifted_mean, lifted_var = mean[:, None, :, None], var[:, None, :, None]  # (G, 1, C_in, 1)
    if spread is None:  # f = 1, D = 0
        return (lifted_mean * taps).sum((-2, -1)), (lifted_var * taps.square()).sum((-2, -1))
    out_var = (lifted_var * taps.square() * valid).sum((-2, -1))
    tap_means = (lifted_mean * taps).sum(-2)  # a_t = W_t m (G, C_out, K)
    spread_means = (tap_means.unsqueeze(-1) * spread).sum(-2)  # D a
    return (tap_means * valid).sum(-1), out_var + (spread_means * tap_means).sum(-1)


def _stacked_linear_moments(mean: Tensor, var: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """A linear layer's (or 1x1 convolution's) mean m W^T and variance v (W o W)^T as one batched
    product of [m; v] and [W; W o W] (the form ``torch.compile`` differentiates): its backward
    is two batched products, where the two plain products' is four (kernel launches on a GPU;
    the stacks fuse into the kernels that write them)."""
    both = torch.bmm(torch.stack([mean, var]), torch.stack([weight, weight.square()]).mT)
    return both[0], both[1]


def _depthwise(
    mean: Tensor, var: Tensor, taps: Tensor, groups: int, geometry: TapGeometry
) -> tuple[Tensor, Tensor]:
    """A depthwise convolution's moments (taps (C_out, 1, K), C_out a multiple of ``groups``)
    through :class:`_DepthwiseConvolutionMoments`."""
    multiplier = taps.shape[0] // groups  # output channels per input channel
    if multiplier > 1:
        mean, var = mean.repeat_interleave(multiplier, -1), var.repeat_interleave(multiplier, -1)
    spread = geometry.spread.to(mean) if geometry.bordered else None
    return _DepthwiseConvolutionMoments.apply(
        mean, var, taps[:, 0], geometry.valid.to(mean), spread
    )


def _grouped(
    mean: Tensor,
    var: Tensor,
    taps: Tensor,
    groups: int,
    geometry: TapGeometry,
    tap_sums: bool = False,
    contract: bool = False,
) -> tuple[Tensor, Tensor]:
    """A grouped convolution's moments (taps (C_out, C_in / groups, K)) by autograd's operations:
    each output channel's sums over its group's input channels, and the border term from the
    per-tap means. ``tap_sums`` (compiled): the products over the K taps and a depthwise
    convolution's per-tap means as elementwise products and sums, which inductor fuses into its
    kernels (each matrix product is a kernel of its own: a launch on a GPU); with ``contract``
    (few statistics groups on a GPU: :func:`contracts_channels`) every convolution's per-tap
    means so."""
    valid = geometry.valid.to(mean)
    if tap_sums:
        out_mean = _channel_map(mean, (taps * valid).sum(-1), groups)
        out_var = _channel_map(var, (taps.square() * valid).sum(-1), groups)
    else:
        out_mean = _channel_map(mean, taps @ valid, groups)
        out_var = _channel_map(var, taps.square() @ valid, groups)
    if geometry.bordered:
        stat_groups = mean.shape[0]
        out_channels, per_group = taps.shape[:2]
        grouped_taps = taps.reshape(groups, out_channels // groups, per_group, -1)
        grouped_mean = mean.reshape(stat_groups, groups, per_group)
        spread = geometry.spread.to(mean)
        if tap_sums and (per_group == 1 or contract):  # a_t = W_t m as a fused sum
            lifted = grouped_mean[:, :, None, :, None] * grouped_taps  # (S, g, C_out / g, i, K)
            tap_means = lifted.sum(-2).flatten(1, 2)
            spread_means = (tap_means.unsqueeze(-1) * spread).sum(-2)
        else:
            tap_means = torch.einsum("sgi,goik->sgok", grouped_mean, grouped_taps).flatten(1, 2)
            spread_means = tap_means @ spread
        out_var = out_var + (spread_means * tap_means).sum(-1)
    return out_mean, out_var


def _formula_gradients(
    formula: Callable[..., tuple[Tensor, ...]],
    inputs: tuple[Tensor, ...],
    needs: Sequence[bool],
    grads: tuple[Tensor, ...],
) -> tuple[Tensor | None, ...]:
    """A written backward under ``create_graph``: the vector-Jacobian product of the formula's
    first ``len(grads)`` outputs, differentiable itself, for the inputs that ``needs`` a gradient
    (``None`` for the others)."""
    wanted = [t for t, need in zip(inputs, needs, strict=True) if need]
    outputs = formula(*inputs)[: len(grads)]
    found = iter(torch.autograd.grad(outputs, wanted, grads, create_graph=True))
    return tuple(next(found) if need else None for need in needs)


class _DenseConvolutionMoments(torch.autograd.Function):
    """:func:`convolution`'s mean and variance for ``groups`` = 1 (:func:`_dense_moments`) from
    the input moments m, v (G, C_in) and the weight W (C_out, C_in, K), with a backward written
    out. With a_t = W_t m, f = ``valid``, D = ``spread`` and M2 = sum_t f_t W_t o W_t, per output
    channel o and tap t:

        E_ot = f_t g_mean_o + 2 g_var_o (D a_o)_t                      (C_out, G, K)
        dm = sum_{o,t} E_ot W_ot,   dv = g_var M2,   dW_t = 2 f_t W_t o (g_var^T v) + m^T E_t.

    W is read as it lies (no transposed copy) and its gradient is formed in its own layout in
    three passes (a product, f, and the batched m^T E), as a tensor of its own that autograd adds
    the convolution's own weight gradient to in place. A 1x1 convolution or linear layer without
    border (K = 1) takes one allocation: dW = 2 W o (g_var^T v) + g_mean^T m. (At micro-batch
    sizes these weight-sized passes are much of a Kalman step's cost, and on a CPU each fresh
    weight-sized allocation can cost page faults too: docs/performance.md.) A double backward
    (``create_graph=True``) differentiates the formula itself.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        mean: Tensor,
        var: Tensor,
        weight: Tensor,
        valid: Tensor | None,
        spread: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        taps = weight.reshape(*weight.shape[:2], -1)
        with autocast_off(mean):  # the moments in their own dtype, as the backward's
            out_mean, out_var, squares, spread_means = _dense_moments(
                mean, var, taps, valid, spread
            )
        ctx.save_for_backward(mean, var, weight, valid, spread, squares, spread_means)
        return out_mean, out_var

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_mean: Tensor, grad_var: Tensor
    ) -> tuple[Tensor | None, ...]:
        mean, var, weight, valid, spread, squares, spread_means = ctx.saved_tensors
        need_mean, need_var, need_weight = ctx.needs_input_grad[:3]
        taps = weight.reshape(*weight.shape[:2], -1)
        with autocast_off(mean):
            if torch.is_grad_enabled():  # create_graph: the formula's own differentiable backward
                grads = _formula_gradients(
                    lambda m, v, w: _dense_moments(m, v, w.reshape(taps.shape), valid, spread),
                    (mean, var, weight), (need_mean, need_var, need_weight), (grad_mean, grad_var),
                )  # fmt: skip
                return (*grads, None, None)
            d_var = grad_var @ squares if need_var else None
            # the weight's gradient as a tensor of its own in W's shape (not a view), which
            # autograd adds W's other gradient to in place
            d_weight = None
            if need_weight:
                d_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
            if valid is None and taps.shape[-1] == 1:
                d_mean = _single_tap_gradients(
                    mean, var, taps[..., 0], grad_mean, grad_var, need_mean, d_weight
                )
            else:
                d_mean = _tap_gradients(
                    mean, var, taps, valid, spread_means, grad_mean, grad_var, need_mean, d_weight
                )
        return d_mean, d_var, d_weight, None, None


def _single_tap_gradients(
    mean: Tensor,
    var: Tensor,
    weight: Tensor,
    grad_mean: Tensor,
    grad_var: Tensor,
    need_mean: bool,
    d_weight: Tensor | None,
) -> Tensor | None:
    """dm = g_mean W for W (C_out, C_in) (one tap, no border), and, into ``d_weight`` where it
    is given, dW = 2 W o (g_var^T v) + g_mean^T m: the product (the factor 2 taken on g_var, not
    on W's size), times W in place, then the rank-G update: three weight-sized passes."""
    if d_weight is not None:
        into = d_weight.view(weight.shape)
        torch.mm(grad_var.T * 2.0, var, out=into).mul_(weight)
        into.addmm_(grad_mean.T, mean)
    return grad_mean @ weight if need_mean else None


def _tap_gradients(
    mean: Tensor,
    var: Tensor,
    taps: Tensor,
    valid: Tensor | None,
    spread_means: Tensor | None,
    grad_mean: Tensor,
    grad_var: Tensor,
    need_mean: bool,
    d_weight: Tensor | None,
) -> Tensor | None:
    """dm = sum_{o,t} E_ot W_ot for taps (C_out, C_in, K), and, into ``d_weight`` where it is
    given, dW_t = 2 f_t W_t o (g_var^T v) + m^T E_t, with E_ot = f_t g_mean_o + 2 g_var_o
    (D a_o)_t (:class:`_DenseConvolutionMoments`)."""
    out_channels, _, k = taps.shape
    by_tap = grad_mean.T.unsqueeze(-1)  # (C_out, G, 1)
    by_tap = by_tap * valid if valid is not None else by_tap.expand(-1, -1, k)
    if spread_means is not None:  # d(a^T D a)/da = 2 D a
        by_tap = torch.addcmul(by_tap, grad_var.T.unsqueeze(-1), spread_means, value=2.0)
    if d_weight is not None:
        d_taps = d_weight.view(taps.shape)
        scale = torch.mm(grad_var.T * 2.0, var).unsqueeze(-1)  # 2 g_var^T v (C_out, C_in, 1)
        torch.mul(taps, scale, out=d_taps)
        if valid is not None:
            d_taps.mul_(valid)
        d_taps.baddbmm_(mean.T.expand(out_channels, -1, -1), by_tap)  # + m^T E_t
    if not need_mean:
        return None
    groups = by_tap.shape[1]
    if groups < k:  # sum_o W_o E_o^T (C_in, G): W read as it lies, products G / K of W's size
        return torch.bmm(taps, by_tap.transpose(1, 2)).sum(0).T.contiguous()
    # E (G, C_out K) times W copied tap-major (C_out K, C_in): one weight-sized copy where the
    # per-channel products would be G / K times larger than W (batch 128: 7x)
    rows = taps.transpose(1, 2).reshape(out_channels * k, -1)
    return by_tap.transpose(0, 1).reshape(groups, out_channels * k) @ rows


def _dense_moments(
    mean: Tensor,
    var: Tensor,
    taps: Tensor,
    valid: Tensor | None,
    spread: Tensor | None,
    tap_sums: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Mean sum_t f_t a_t and variance v M2^T (+ a^T D a) (G, C_out) of a dense convolution,
    and what its backward reuses: M2 = sum_t f_t W_t o W_t (C_out, C_in) and D a (C_out, G, K)
    (``None`` without border term). The per-tap means a_t = W_t m (C_out, G, K) are, for
    G < K, one product batched over the output channels, m (G, C_in) times each channel's
    (C_in, K) block of W as it lies; for G >= K, one product with W copied tap-major, whose
    derivatives are plain matrix products too (differentiated by ``torch.compile``, the batched
    form's cost 3.6x as much at G = 64 for a 512x512x3x3 weight: docs/performance.md).
    ``valid`` and ``spread`` ``None``: every tap reads a real input (f = 1, D = 0). Also the
    formula ``torch.compile`` differentiates itself, with ``tap_sums``: the products over the
    K taps (by f and D) as elementwise products and sums, which inductor fuses into the kernels
    around them, where a matrix product is a kernel of its own (a launch on a GPU)."""
    out_channels, in_channels, k = taps.shape
    if valid is None and k == 1:  # a linear layer or 1x1 convolution
        weight = taps[..., 0]
        squares = weight.square()
        return mean @ weight.T, var @ squares.T, squares, None
    # a_t = W_t m (C_out, G, K)
    if mean.shape[0] < k:  # bmm, not matmul, which copies W transposed when both need grad
        tap_means = torch.bmm(mean.expand(out_channels, -1, -1), taps)
    else:  # (G, C_in) @ (C_in, C_out K), viewed as (C_out, G, K)
        tap_major = taps.permute(1, 0, 2).reshape(in_channels, out_channels * k)
        tap_means = (mean @ tap_major).view(-1, out_channels, k).transpose(0, 1)
    if valid is None:
        out_mean, squares = tap_means.sum(-1), taps.square().sum(-1)
    elif tap_sums:
        out_mean, squares = (tap_means * valid).sum(-1), (taps.square() * valid).sum(-1)
    else:
        out_mean, squares = tap_means @ valid, taps.square() @ valid
    out_mean = out_mean.T.contiguous()  # (G, C_out), as every moment
    out_var = var @ squares.T
    spread_means = None
    if spread is not None:  # D a (D symmetric)
        if tap_sums:
            spread_means = (tap_means.unsqueeze(-1) * spread).sum(-2)
        else:
            spread_means = tap_means @ spread
        out_var = out_var + (spread_means * tap_means).sum(-1).T  # + a^T D a
    return out_mean, out_var, squares, spread_means


class _DepthwiseConvolutionMoments(torch.autograd.Function):
    """:func:`convolution`'s moments for a depthwise convolution (one input channel per output
    channel), in closed form: with w_c (K,) channel c's taps, f = ``valid`` and D = ``spread``,

        mean = m s1,   var = v s2 + m^2 q,   s1 = f . w,  s2 = f . (w o w),  q = w^T D w,

    (the border term a^T D a with a_t = w_t m is m^2 q), per statistics group and channel, and a
    backward written out: dm = g_mean s1 + 2 g_var m q, dv = g_var s2 and
    dw = sum_G (g_mean m) f + 2 sum_G (g_var v) (f o w) + 2 sum_G (g_var m^2) D w. Autograd
    through the grouped formula took about 120 ATen calls per convolution and step. ``spread``
    ``None``: no tap reads padding (q = 0). A double backward differentiates the formula.
    """

    @staticmethod
    def forward(
        ctx, mean: Tensor, var: Tensor, taps: Tensor, valid: Tensor, spread: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        with autocast_off(mean):
            out_mean, out_var, s1, s2, spread_taps, border = _depthwise_moments(
                mean, var, taps, valid, spread
            )
        ctx.save_for_backward(mean, var, taps, valid, spread, s1, s2, spread_taps, border)
        return out_mean, out_var

    @staticmethod
    def backward(ctx, grad_mean: Tensor, grad_var: Tensor) -> tuple[Tensor | None, ...]:
        mean, var, taps, valid, spread, s1, s2, spread_taps, border = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        with autocast_off(mean):
            if torch.is_grad_enabled():  # create_graph: the formula's own differentiable backward
                grads = _formula_gradients(
                    lambda m, v, w: _depthwise_moments(m, v, w, valid, spread),
                    (mean, var, taps), needs, (grad_mean, grad_var),
                )  # fmt: skip
                return (*grads, None, None)
            need_mean, need_var, need_taps = needs
            d_mean = d_var = d_taps = None
            if need_mean:  # g_mean s1 (+ 2 g_var m q)
                d_mean = grad_mean * s1
                if border is not None:
                    d_mean = d_mean.addcmul_(grad_var * mean, border, value=2.0)
            if need_var:
                d_var = grad_var * s2
            if need_taps:  # (sum_G g_mean m) f + 2 (sum_G g_var v) (f o w) + 2 (sum_G g_var m^2) Dw
                by_mean = (grad_mean * mean).sum(0).unsqueeze(-1)
                by_var = (grad_var * var).sum(0).unsqueeze(-1)
                d_taps = torch.addcmul(by_mean * valid, by_var * valid, taps, value=2.0)
                if border is not None:
                    by_border = (grad_var * mean.square()).sum(0).unsqueeze(-1)
                    d_taps.addcmul_(by_border, spread_taps, value=2.0)
        return d_mean, d_var, d_taps, None, None


def _depthwise_moments(
    mean: Tensor, var: Tensor, taps: Tensor, valid: Tensor, spread: Tensor | None
) -> tuple[Tensor, ...]:
    """:class:`_DepthwiseConvolutionMoments`' mean and variance (G, C) from m, v (G, C) and the
    taps w (C, K), and what the backward reuses: s1, s2 (C,), D w (C, K) and q (C,) (both
    ``None`` without border term)."""
    s1, s2 = taps @ valid, taps.square() @ valid
    out_mean, out_var = mean * s1, var * s2
    spread_taps = border = None
    if spread is not None:
        spread_taps = taps @ spread  # D w (D symmetric)
        border = (spread_taps * taps).sum(-1)  # q = w^T D w
        out_var = out_var.addcmul_(mean.square(), border)
    return out_mean, out_var, s1, s2, spread_taps, border


def _channel_map(x: Tensor, weight: Tensor, groups: int) -> Tensor:
    """y_o = sum_i W_oi x_i over the input channels of output channel o's convolution group:
    ``x`` (G, C_in), ``weight`` (C_out, C_in / groups), ``groups`` > 1."""
    stat_groups, out_channels = x.shape[0], weight.shape[0]
    grouped = x.reshape(stat_groups, groups, 1, -1)
    blocks = weight.reshape(groups, out_channels // groups, -1)
    return (grouped * blocks).sum(-1).flatten(1)


def average_pool(moments: Moments, geometry: TapGeometry, include_padding: bool) -> Moments:
    """Moments of an average over a window of independent values.

    Counting padding (PyTorch's default ``count_include_pad=True``) it is a convolution with
    weights 1/K; otherwise each output averages its n_p valid inputs: mean m, var v E_p[1/n_p].
    """
    taps = geometry.valid.numel()
    if not include_padding:
        return Moments(moments.mean, moments.var * geometry.inverse_count)
    channels = moments.mean.shape[-1]
    weight = torch.full(
        (channels, 1, taps), 1.0 / taps, dtype=moments.mean.dtype, device=moments.mean.device
    )
    return convolution(moments, weight, None, channels, geometry)


@functools.cache
def max_constants(taps: int) -> tuple[float, float]:
    """Mean and variance of the maximum of ``taps`` independent standard normals."""
    z = torch.linspace(-12.0, 12.0, 48001, dtype=torch.float64)
    density = taps * normal_pdf(z) * normal_cdf(z).pow(taps - 1)
    step = float(z[1] - z[0])
    first = float((z * density).sum() * step)
    second = float((z.square() * density).sum() * step)
    return first, second - first * first


def max_pool(moments: Moments, taps: int, constants: tuple[float, float] | None = None) -> Moments:
    """Approximate moments of a maximum over ``taps`` i.i.d. Gaussian values (padding ignored):
    mean m + sqrt(v) e_K, var v s_K, with e_K, s_K the moments of the max of K standard normals
    (``constants``, as :func:`max_constants` gives them; a program computes them when it is built,
    so that its evaluation compiles without a graph break).
    """
    if taps == 1:
        return moments
    shift, scale = max_constants(taps) if constants is None else constants
    std = safe_std(*moments)
    return Moments(moments.mean + shift * std, moments.var * scale)


def dropout(moments: Moments, p: float) -> Moments:
    """Inverted dropout in training: E y = m, E y^2 = (v + m^2) / (1 - p)."""
    if p <= 0.0:
        return moments
    if p >= 1.0:
        return Moments(torch.zeros_like(moments.mean), torch.zeros_like(moments.var))
    second = (moments.var + moments.mean.square()) / (1.0 - p)
    return Moments(moments.mean, second - moments.mean.square())


# -- combining tensors ----------------------------------------------------------------------------


def add(terms: Sequence[Moments], scales: Sequence[float]) -> Moments:
    """Moments of sum_i a_i x_i for independent x_i: mean sum a_i m_i, var sum a_i^2 v_i.

    Residual additions are the main use; branch and shortcut are correlated in a real network,
    which this ignores (measured in ``kalmannorm analyze prior-error``).
    """
    mean = sum(a * t.mean for a, t in zip(scales, terms))
    var = sum(a * a * t.var for a, t in zip(scales, terms))
    return Moments(mean, var)


def concatenate(terms: Sequence[Moments]) -> Moments:
    """Channel concatenation: the channels' moments side by side (groups broadcast)."""
    groups = max(t.mean.shape[0] for t in terms)
    means = [t.mean.expand(groups, -1) for t in terms]
    variances = [t.var.expand(groups, -1) for t in terms]
    return Moments(torch.cat(means, -1), torch.cat(variances, -1))


def repeat_features(moments: Moments, repeats: int) -> Moments:
    """Flattening (N, C, *spatial) to (N, C * prod(spatial)): each feature keeps its channel's
    moments (the border's effect on per-position moments is ignored)."""
    if repeats == 1:
        return moments
    return Moments(
        moments.mean.repeat_interleave(repeats, -1), moments.var.repeat_interleave(repeats, -1)
    )
