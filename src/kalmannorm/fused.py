"""Eager fast path: group statistics, Kalman estimate and normalisation in one autograd node.

Written with ordinary autograd, a BKN layer makes about eight passes over its activations in
training (statistics, normalisation, and the backward of each) and allocates three activation-size
gradients. :class:`FusedGroupNorm` needs one reading and one writing pass forward and the same
backward, like native BatchNorm. A :class:`SampleGroups` or
:class:`ChannelGroups` layout views x (N, C, *spatial) as a (A, B, D, L) tensor whose statistics
reduce over B and L (m = B * L values each):

forward
    Sigma x and Sigma x^2 in one reading pass (:func:`row_sums`), then the *small step*
    (:func:`small_step`: everything not activation-sized, as one function of those sums): the
    batch statistics xbar = Sigma x / m, S = Sigma x^2 / m - xbar^2, the estimate (any function of
    them, e.g. Eq. 5), scale = gamma / sqrt(var + eps), shift = beta - mu * scale and, in
    training, the moving averages; then y = x * scale + shift, written once.
backward
    dL/dscale = Sigma g x and dL/dshift = Sigma g in one reading pass; the small step's
    vector-Jacobian product carries them (and the gradients of the statistics handed to the
    layers fed by this one) back to Sigma x, Sigma x^2 and every small input (A, R, q, upstream
    statistics, gamma, beta); then dL/dx = g * scale + dL/dSigma x + 2 x dL/dSigma x^2, written
    once.

The small step runs with its backward written out (:class:`KalmanStep` for the Kalman norms,
:class:`BatchStatisticsStep` for plain batch statistics: ghost BN), as written for any other
estimate (:class:`TracedStep`: its autograd graph, kept from the forward), or compiled
(:class:`CompiledStep`, :func:`kalmannorm.compile_kalman_steps`: one compiled call forward, one
backward that recomputes the small step inside its vector-Jacobian product).
Nothing activation-sized is saved beyond the input, and nothing activation-sized is recomputed.
Used for contiguous CPU/GPU tensors in eager mode; under ``torch.compile`` the layers use the
composite path, which the compiler fuses itself.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kalmannorm import _torch_private
from kalmannorm.compiled_step import compiled_call
from kalmannorm.functional import (
    affine_from_statistics,
    autocast_off,
    guard_gain,
    kalman_update,
)

#: Above this mean^2 / var ratio, E[x^2] - xbar^2 loses too many digits: a layer's next forward
#: takes the two-pass variance (:class:`VarianceGuard`).
_CANCELLATION_LIMIT = 1e4

#: The dims of an (A, B, D, L) view that statistics reduce over.
STAT_DIMS = (1, 3)

Estimate = Callable[..., tuple[Tensor, Tensor]]
#: ``(batch_mean, batch_var, weight, bias, *small) -> (mean, var, scale, shift)``: the statistics
#: to normalise with and the (broadcastable) scale and shift y = x * scale + shift they give.
AffineEstimate = Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]


class SampleGroups(NamedTuple):
    """Statistics per channel over groups of samples (BatchNorm, BKN): x as (G, N/G, C, L).

    Batch statistics, estimate and gamma/beta are (G, C) tensors.
    """

    groups: int

    def view(self, x: Tensor) -> Tensor:
        return x.view(self.groups, x.shape[0] // self.groups, x.shape[1], -1)

    def statistics(self, moment: Tensor) -> Tensor:
        """(A, D) moments in the shape the estimate takes: (G, C)."""
        return moment

    def rows(self, x: Tensor) -> int:
        """The rows of the estimate's statistics for input ``x``: G."""
        return self.groups

    def broadcast(self, stat: Tensor) -> Tensor:
        """A (G, C) tensor as (G, 1, C, 1), broadcasting along the view (one view, one call
        forward and backward)."""
        return stat.view(stat.shape[0], 1, stat.shape[1], 1)

    def affine(
        self, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor]:
        """scale = gamma / sqrt(var + eps), shift = beta - mean * scale, per (group, channel)."""
        scale, shift = affine_from_statistics(mean, var, weight, bias, eps)
        return self.broadcast(scale), self.broadcast(shift)


class ChannelGroups(NamedTuple):
    """Statistics per sample over groups of channels (GroupNorm, GKN): x as (N G, C/G, 1, L).

    Batch statistics and estimate are (N, G); gamma/beta (C,) meet them as (G, C/G).
    """

    groups: int

    def view(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0] * self.groups, x.shape[1] // self.groups, 1, -1)

    def statistics(self, moment: Tensor) -> Tensor:
        """(N G, 1) moments in the shape the estimate takes: (N, G)."""
        return moment.view(-1, self.groups)

    def rows(self, x: Tensor) -> int:
        """The rows of the estimate's statistics for input ``x``: N."""
        return x.shape[0]

    def broadcast(self, stat: Tensor) -> Tensor:
        """A (N, G) tensor as (N G, 1, 1, 1)."""
        return stat.reshape(-1, 1, 1, 1)

    def affine(
        self, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor]:
        """scale_{n,c} = gamma_c / sqrt(var_{n,g(c)} + eps), shift = beta_c - mean * scale."""
        scale = torch.rsqrt(var + eps).unsqueeze(-1)  # (N, G, 1)
        if weight is not None:
            scale = scale * weight.view(self.groups, -1)
        shift = -mean.unsqueeze(-1) * scale
        if bias is not None:
            shift = shift + bias.view(self.groups, -1)
        # (N, G, C/G or 1) -> (N G, C/G or 1, 1, 1)
        return scale.flatten(0, 1)[..., None, None], shift.flatten(0, 1)[..., None, None]


Layout = SampleGroups | ChannelGroups


class RowSums(NamedTuple):
    """Sigma a and Sigma a b over some dims of (A, B, D, L) tensors, as one vectorised pass leaves
    them: summed along every dim but ``rest``, which the small step sums over itself."""

    total: Tensor
    product: Tensor
    rest: tuple[int, ...]


def row_sums(a: Tensor, b: Tensor, dims: tuple[int, ...]) -> RowSums:
    """Sigma a and Sigma a b over ``dims`` of contiguous (A, B, D, L) tensors (float32 for
    float16/bfloat16 tensors), kept as size 1, except along ``rest``, the dims still to sum.

    Along the last dim both come from one vectorised pass over contiguous rows
    (:func:`kalmannorm._torch_private.sum_and_dot_rows`: ATen's BatchNorm backward used as a sum
    kernel; a sum and a batched dot product, two passes, cost 2.8x as much on a 2-core x86 CPU);
    a dim before the rows (B of a (G, B, C, L) view) is left in ``rest``.
    """
    if 3 not in dims:
        if a.dtype in HALF_DTYPES:
            a = a.float()
        return RowSums(_sum(a, dims), _sum(a * b, dims), ())
    # (A, B, 1, L) summed over B and L: each of the A runs of values is one row.
    kept = (a.shape[0], 1, 1, 1) if 1 in dims and a.shape[2] == 1 else (*a.shape[:3], 1)
    rows = math.prod(kept)
    sum_a, sum_ab = _torch_private.sum_and_dot_rows(a.reshape(1, rows, -1), b.reshape(1, rows, -1))
    rest = tuple(d for d in dims if d != 3 and kept[d] != 1)
    return RowSums(sum_a.view(kept), sum_ab.view(kept), rest)


class BatchSums(NamedTuple):
    """What a reading pass over a batch leaves for its statistics: the row sums of x and x^2
    (or, for two passes, of d = x - ``offset``), and the offset (``None``: one pass)."""

    sums: RowSums
    offset: Tensor | None


class VarianceGuard:
    """Whether a layer's batch statistics take the two-pass variance, decided on the host
    without waiting for the device.

    One pass gives Sigma x and Sigma x^2, i.e. var = E[x^2] - xbar^2, which loses digits where
    xbar^2 > ``_CANCELLATION_LIMIT`` var (a large offset: raw inputs, a dominant bias). Each
    forward tests that on its statistics and copies the outcome into a host buffer
    asynchronously (on CUDA a non-blocking copy into pinned memory); the next forward reads the
    buffer as it is. So the choice follows an earlier forward's statistics (on a CPU the previous
    forward's; on CUDA the latest one the device has finished) and a training step waits for
    nothing. Only a layer's first forward (after construction, a copy or a resumed run's
    restart: ``two_pass`` is ``None``) reads its own test to the host, once, and takes two
    passes at once if needed: inputs with a large offset are exact from the first step, and a
    resumed run makes the choices the uninterrupted run made. An offset that appears suddenly
    later is one forward late. Activation checkpointing's recomputation repeats the choice of
    the forward it replays.
    """

    def __init__(self) -> None:
        self.two_pass: bool | None = None
        self._host: Tensor | None = None
        self._host_view = None  # the buffer as a NumPy array: read without a dispatcher call
        self._pinned = False

    def choose(self) -> bool | None:
        """The choice for this forward: the latest outcome the device has written (``None``
        before the first)."""
        if self._host_view is not None:
            self.two_pass = bool(self._host_view)  # host memory: no device read
        return self.two_pass

    def record(self, risky: Tensor) -> None:
        """Send this forward's test (a 0-dim bool tensor) to the host, without a sync."""
        pinned = risky.device.type == "cuda"
        if self._host is None or self._pinned != pinned:
            self._host = torch.ones((), dtype=torch.bool, pin_memory=pinned)
            self._host_view = self._host.numpy()
            self._pinned = pinned
        self._host.copy_(risky, non_blocking=pinned)

    def __getstate__(self) -> dict:
        # a copy (deepcopy, pickle) keeps the choice, not the host buffer
        return {"two_pass": self.two_pass, "_host": None, "_host_view": None, "_pinned": False}


def variance_guard(module: object) -> VarianceGuard:
    """The :class:`VarianceGuard` of a layer (created on first use)."""
    guard = module.__dict__.get("_variance_guard")
    if guard is None:
        guard = module.__dict__["_variance_guard"] = VarianceGuard()
    return guard


def batch_sums(grouped: Tensor, guard: VarianceGuard) -> BatchSums:
    """The sums a contiguous (A, B, D, L) batch's statistics over dims (1, 3) come from: Sigma x
    and Sigma x^2 in one reading pass, or, where ``guard`` chose it, two: the mean, then
    Sigma d and Sigma d^2 of d = x - mean. No host sync except on a guard's first forward
    (:class:`VarianceGuard`), which tests its own statistics."""
    replay = _torch_private.in_backward()  # a checkpoint recomputation: the same choice again
    two_pass = guard.two_pass if replay else guard.choose()
    if not two_pass:
        found = BatchSums(row_sums(grouped, grouped, STAT_DIMS), None)
        if two_pass is None:  # the first forward: decide on this one (one host read, once)
            count = grouped.shape[1] * grouped.shape[3]
            two_pass = guard.two_pass = bool(batch_moments(found, count)[2])
    if two_pass:
        count = grouped.shape[1] * grouped.shape[3]
        offset = grouped.sum(STAT_DIMS, keepdim=True, dtype=statistics_dtype(grouped)) / count
        centred = grouped - offset  # (float32 for half inputs)
        found = BatchSums(row_sums(centred, centred, STAT_DIMS), offset)
    return found


def batch_moments(found: BatchSums, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """Mean xbar = offset + Sigma d / m and biased variance S = Sigma d^2 / m - (Sigma d / m)^2
    (A, D) of ``count`` = m values each (d = x - offset; x without offset), and whether
    E[d^2] - (E d)^2 lost too many digits somewhere (0-dim bool: :class:`VarianceGuard`)."""
    _, spread, mean = _centred_moments(found, count)
    return mean, spread.clamp_min(0.0), _cancels(mean, spread)


def _centred_moments(found: BatchSums, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """c = Sigma d / m, S = Sigma d^2 / m - c^2 (not clamped) and the mean offset + c (A, D)."""
    sums = found.sums
    total, total_square = (_rows(_sum(t, sums.rest)) for t in (sums.total, sums.product))
    centre = total / count
    spread = total_square / count - centre.square()
    mean = centre if found.offset is None else _rows(found.offset) + centre
    return centre, spread, mean


def _rows(stat: Tensor) -> Tensor:
    """An (A, 1, D, 1) statistic as (A, D): a view (its backward one view too, where indexing
    ``[:, 0, :, 0]`` takes two selects and two zero-filled ``select_backward``)."""
    return stat.view(stat.shape[0], stat.shape[2])


def _cancels(mean: Tensor, var: Tensor) -> Tensor:
    """Whether E[x^2] - xbar^2 loses too many digits in some (A, D) entry (0-dim bool)."""
    return (mean.square() > _CANCELLATION_LIMIT * var).any()


def _sum(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Sum over ``dims`` kept as size 1; no dims: ``t`` itself (``Tensor.sum(())`` sums all)."""
    return t.sum(dims, keepdim=True) if dims else t


def _broadcast_dims(small: Tensor, grouped: Tensor) -> tuple[int, ...]:
    """The dims along which a 4-d ``small`` broadcasts over ``grouped``."""
    return tuple(d for d in range(4) if small.shape[d] == 1 and grouped.shape[d] != 1)


def with_affine(estimate: Estimate, layout: Layout, eps: float) -> AffineEstimate:
    """An :data:`AffineEstimate` from ``estimate(batch_mean, batch_var, *small) -> (mean, var)``:
    scale = gamma / sqrt(var + eps), shift = beta - mean * scale in the layout's broadcast."""

    def affine_estimate(batch_mean, batch_var, weight, bias, *small):
        mean, var = estimate(batch_mean, batch_var, *small)
        return mean, var, *layout.affine(mean, var, weight, bias, eps)

    return affine_estimate


#: ``after(count, outputs, extra)``: what a training forward does with a small step's results
#: (a layer's moving averages, under ``torch.no_grad``), inside the step (compiled with it).
AfterStep = Callable[[int, tuple, tuple], None]


def small_step(
    estimate: AffineEstimate,
    layout: Layout,
    after: AfterStep | None,
    count: int,
    rest: tuple[int, ...],
    total: Tensor,
    total_square: Tensor,
    offset: Tensor | None,
    *small: Tensor | None,
) -> tuple[tuple[Tensor, ...], Tensor, tuple]:
    """Everything of a fused normalisation that is not activation-sized, as one function of the
    batch's row sums: the batch statistics (:func:`batch_moments`), then ``estimate`` on them and
    ``small`` (gamma, beta, the estimate's tensors), then ``after`` (``None``: nothing).

    Returns the differentiable (scale, shift, mean, var, batch mean, batch var), the cancellation
    test and the estimate's extra outputs (diagnostics; not differentiated).
    """
    found = BatchSums(RowSums(total, total_square, rest), offset)
    batch_mean, batch_var, risky = batch_moments(found, count)
    batch_mean, batch_var = layout.statistics(batch_mean), layout.statistics(batch_var)
    mean, var, scale, shift, *extra = estimate(batch_mean, batch_var, *small)
    outputs, extra = (scale, shift, mean, var, batch_mean, batch_var), tuple(extra)
    if after is not None:
        after(count, outputs, extra)
    return outputs, risky, extra


def small_step_gradients(
    step: Callable,
    constants: tuple,
    inputs: tuple[Tensor | None, ...],
    grad_affine: tuple[RowSums, tuple[int, ...], tuple[int, ...]],
    grad_outputs: tuple[Tensor | None, ...],
) -> tuple[Tensor | None, ...]:
    """dL/d ``inputs`` of ``step(*constants, *inputs)``'s differentiable outputs (a vector-Jacobian
    product, :func:`torch.func.vjp`, recomputing the small step): dL/dscale = Sigma g x and
    dL/dshift = Sigma g from the row sums ``grad_affine`` (summed over the dims shift and scale
    still broadcast along), and the gradients of the statistics in ``grad_outputs`` (``None``:
    zero). Floating-point inputs only; ``None`` for the others."""
    rows, shift_rest, scale_rest = grad_affine
    grad_scale, grad_shift = _sum(rows.product, scale_rest), _sum(rows.total, shift_rest)
    present = [i for i, t in enumerate(inputs) if t is not None and t.is_floating_point()]

    def differentiable(*primals: Tensor) -> tuple[Tensor, ...]:
        full = list(inputs)
        for i, primal in zip(present, primals):
            full[i] = primal
        return step(*constants, *full)[0]

    outputs, pullback = torch.func.vjp(differentiable, *(inputs[i] for i in present))
    zero_filled = (
        torch.zeros_like(out) if grad is None else grad
        for out, grad in zip(outputs[2:], grad_outputs)
    )
    cotangents = (grad_scale, grad_shift, *zero_filled)
    grads: list[Tensor | None] = [None] * len(inputs)
    for i, grad in zip(present, pullback(cotangents)):
        grads[i] = grad
    return tuple(grads)


class TracedStep:
    """The small step (:func:`small_step`) run as written: its autograd graph, built in the
    forward on detached leaves and kept, is differentiated in the backward (no recomputation)."""

    def __init__(
        self, estimate: AffineEstimate, layout: Layout, after: AfterStep | None = None
    ) -> None:
        self.estimate, self.layout, self.after = estimate, layout, after
        self.extra: tuple = ()

    def forward(
        self, constants: tuple, inputs: tuple[Tensor | None, ...]
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        """The differentiable outputs (detached) and the cancellation test; keeps the graph."""
        with torch.enable_grad(), autocast_off(inputs[0]):
            sums = tuple(t.detach().requires_grad_() for t in inputs[:2])
            leaves = (*sums, *(detached_leaf(t) for t in inputs[2:]))
            outputs, risky, self.extra = small_step(
                self.estimate, self.layout, self.after, *constants, *leaves
            )
        self._graph = (leaves, outputs)
        return tuple(out.detach() for out in outputs), risky

    def backward(
        self,
        grad_affine: tuple[RowSums, tuple[int, ...], tuple[int, ...]],
        grad_outputs: tuple[Tensor | None, ...],
    ) -> tuple[Tensor | None, ...]:
        """dL/d inputs (``None`` for those that take none), as :func:`small_step_gradients`."""
        leaves, outputs = self._graph
        rows, shift_rest, scale_rest = grad_affine
        differentiated = [outputs[0], outputs[1]]
        grads = [_sum(rows.product, scale_rest), _sum(rows.total, shift_rest)]
        for out, grad in zip(outputs[2:], grad_outputs):
            if grad is not None:
                differentiated.append(out)
                grads.append(grad)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        # retain_graph: a backward may run more than once on the same graph (gradcheck)
        found = torch.autograd.grad(
            differentiated, wanted, grads, allow_unused=True, retain_graph=True
        )
        by_leaf = dict(zip(map(id, wanted), found))
        return tuple(None if t is None else by_leaf.get(id(t)) for t in leaves)


class BatchStatisticsStep:
    """The small step of a norm that normalises with its batch statistics (ghost BN), with its
    backward written out instead of differentiated through a kept graph (:class:`TracedStep`).
    With c = Sigma d / m, S = Sigma d^2 / m - c^2, var = max(S, 0), r = 1 / sqrt(var + eps),
    scale = gamma r and shift = beta - mean scale (:func:`small_step`, the identity estimate):

        dmean = g_mean - g_shift scale,  dscale = g_scale - g_shift mean,
        dvar = g_var - dscale gamma r^3 / 2 (0 where S < 0),
        dSigma d^2 = dvar / m,  dSigma d = (dmean - 2 c dvar) / m,
        dgamma = sum_G dscale r,  dbeta = sum_G g_shift,

    g_mean and g_var summing the gradients of the statistics handed on (the estimate's and the
    batch's, the same tensors here). Inputs: the row sums, the offset, gamma and beta."""

    def __init__(self, layout: SampleGroups, eps: float) -> None:
        self.layout, self.eps = layout, eps
        self.extra: tuple = ()

    def forward(
        self, constants: tuple, inputs: tuple[Tensor | None, ...]
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        total, total_square, offset, weight, bias = inputs
        with autocast_off(total):
            moments = _WrittenMoments.of(constants, total, total_square, offset)
            affine = _ChannelAffine.of(moments.mean, moments.var, weight, bias, self.eps)
        self._saved = (moments, affine)
        mean, var = moments.mean, moments.var
        return (*affine.outputs(self.layout), mean, var, mean, var), moments.cancels()

    def backward(
        self,
        grad_affine: tuple[RowSums, tuple[int, ...], tuple[int, ...]],
        grad_outputs: tuple[Tensor | None, ...],
    ) -> tuple[Tensor | None, ...]:
        moments, affine = self._saved
        grad_mean, grad_var = (_summed(grad_outputs[i::2], moments.mean) for i in (0, 1))
        grad_mean, grad_var, grad_weight, grad_bias = affine.backward(
            grad_affine, grad_mean, grad_var
        )
        return (*moments.backward(grad_mean, grad_var), None, grad_weight, grad_bias)


class KalmanStep:
    """The small step of a Kalman norm with diagonal covariances (BKN's statistics per group of
    samples and channel, GKN's per sample and group of channels) with its backward written out
    (:class:`TracedStep` differentiates the same formula through a kept graph). The prior is
    computed before the fused node, by ordinary autograd; this step takes it as the inputs
    (mu^{k|k-1}, sigma^2_{k|k-1}, q) after the row sums, the offset, gamma and beta (none: the
    batch statistics, q = 1). Forward: the batch moments xbar, S (:class:`BatchStatisticsStep`),
    the guard (q = 1 for a row whose mean prior/batch variance ratio reaches ``guard``:
    :func:`kalmannorm.functional.guard_gain`), Eq. (5) (:func:`kalmannorm.functional.
    kalman_update`), the affine, then ``after``. Backward, with d = xbar - mu^{k|k-1} and
    p = 1 - q:

        dmu = g_mu - g_shift scale,  dsigma^2 = g_sigma^2 - dscale gamma r^3 / 2 (as ghost BN's),
        dd = q dmu + 2 q p d dsigma^2,  dxbar = dd + g_xbar,  dS = q dsigma^2 + g_S,
        dmu^{k|k-1} = dmu - dd,  dsigma^2_{k|k-1} = p dsigma^2,
        dq = d dmu + (S - sigma^2_{k|k-1} + (p - q) d^2) dsigma^2 (0 where the guard took q = 1),

    summed over the rows a prior or q broadcasts along; then dxbar, dS to the row sums as
    ghost BN's. ``predicted_var`` is the prior variance before any calibration (diagnostics)."""

    def __init__(
        self,
        layout: Layout,
        eps: float,
        guard: float | None,
        after: AfterStep | None,
        predicted_var: Tensor | None,
    ) -> None:
        self.layout, self.eps, self.guard, self.after = layout, eps, guard, after
        self.predicted_var = predicted_var
        self.affine = _ChannelAffine if isinstance(layout, SampleGroups) else _GroupAffine
        self.extra: tuple = ()

    def forward(
        self, constants: tuple, inputs: tuple[Tensor | None, ...]
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        total, total_square, offset, weight, bias, *prior = inputs
        with autocast_off(total):
            moments = _WrittenMoments.of(constants, total, total_square, offset)
            batch_mean, batch_var = (self.layout.statistics(t) for t in (moments.mean, moments.var))
            if prior:
                prior_mean, prior_var, gain = prior
                gain = gain.to(batch_mean.dtype).expand_as(batch_mean)
                accepted = None
                if self.guard is not None:
                    gain, accepted = guard_gain(gain, prior_var, batch_var, self.guard)
                mean, var = kalman_update(batch_mean, batch_var, prior_mean, prior_var, gain)
                wants = tuple(t.requires_grad for t in prior)
                self._prior = (prior_mean, prior_var, gain, accepted, wants)
                extra = (gain, prior_mean.expand_as(batch_mean), prior_var, self.predicted_var)
            else:
                mean, var, self._prior = batch_mean, batch_var, None
                extra = (torch.ones_like(batch_mean), None, None, None)
            affine = self.affine.of(mean, var, weight, bias, self.eps)
        self._saved = (moments, affine)
        outputs = (*affine.outputs(self.layout), mean, var, batch_mean, batch_var)
        if self.after is not None:
            self.after(moments.count, outputs, extra)
        self.extra = extra
        return outputs, moments.cancels()

    def backward(
        self,
        grad_affine: tuple[RowSums, tuple[int, ...], tuple[int, ...]],
        grad_outputs: tuple[Tensor | None, ...],
    ) -> tuple[Tensor | None, ...]:
        moments, affine = self._saved
        like = affine.mean
        grad_mean, grad_var, grad_batch_mean, grad_batch_var = grad_outputs
        grad_mean, grad_var, grad_weight, grad_bias = affine.backward(
            grad_affine, _summed((grad_mean,), like), _summed((grad_var,), like)
        )
        if self._prior is None:
            grad_batch_mean = _summed((grad_mean, grad_batch_mean), like)
            grad_batch_var = _summed((grad_var, grad_batch_var), like)
            return (*moments.backward(grad_batch_mean, grad_batch_var), None, grad_weight,
                    grad_bias)  # fmt: skip
        prior_mean, prior_var, gain, accepted, wants = self._prior
        batch_mean, batch_var = (self.layout.statistics(t) for t in (moments.mean, moments.var))
        innovation = batch_mean - prior_mean
        keep = 1.0 - gain
        gained_var = gain * grad_var
        grad_innovation = torch.addcmul(gain * grad_mean, keep * gained_var, innovation, value=2.0)
        grad_batch_mean = _summed((grad_innovation, grad_batch_mean), like)
        grad_batch_var = _summed((gained_var, grad_batch_var), like)
        grads: list[Tensor | None] = [None, None, None]
        if wants[0]:
            grads[0] = _sum_to(grad_mean - grad_innovation, prior_mean)
        if wants[1]:
            grads[1] = _sum_to(grad_var - gained_var, prior_var)
        if wants[2]:
            # S - sigma^2_{k|k-1} + (p - q) d^2, the derivative of sigma^2_{k|k} in q
            spread = torch.addcmul(batch_var - prior_var, keep - gain, innovation.square())
            grad_gain = torch.addcmul(innovation * grad_mean, spread, grad_var)
            if accepted is not None:
                grad_gain = grad_gain.masked_fill_(~accepted, 0.0)
            grads[2] = grad_gain.sum(0)
        return (*moments.backward(grad_batch_mean, grad_batch_var), None, grad_weight, grad_bias,
                *grads)  # fmt: skip


class _WrittenMoments(NamedTuple):
    """Batch mean xbar = offset + c and variance S = max(Sigma d^2 / m - c^2, 0) (A, D) of
    m = ``count`` values each, c = Sigma d / m (d = x - offset), kept for their written
    backward."""

    count: int
    shape: torch.Size
    centre: Tensor
    spread: Tensor  # Sigma d^2 / m - c^2, not clamped
    mean: Tensor
    var: Tensor

    @classmethod
    def of(
        cls, constants: tuple, total: Tensor, total_square: Tensor, offset: Tensor | None
    ) -> _WrittenMoments:
        count, rest = constants
        found = BatchSums(RowSums(total, total_square, rest), offset)
        centre, spread, mean = _centred_moments(found, count)
        return cls(count, total.shape, centre, spread, mean, spread.clamp_min(0.0))

    def cancels(self) -> Tensor:
        return _cancels(self.mean, self.spread)

    def backward(self, grad_mean: Tensor, grad_var: Tensor) -> tuple[Tensor, Tensor]:
        """dSigma d = (dxbar - 2 c dS) / m and dSigma d^2 = dS / m (dS = 0 where S < 0: clamp_min
        passes none), broadcast to the row sums' shape; the gradients in the moments' shape or
        the estimate's (:meth:`SampleGroups.statistics`, :meth:`ChannelGroups.statistics`)."""
        shape = self.mean.shape
        grad_mean, grad_var = grad_mean.view(shape), grad_var.view(shape)
        grad_var = grad_var.masked_fill(self.spread < 0, 0.0)
        grad_total = torch.addcmul(grad_mean, self.centre, grad_var, value=-2.0).div_(self.count)
        grad_square = grad_var.div_(self.count)
        shape = self.shape
        full = (shape[0], 1, shape[2], 1)
        return tuple(g.view(full).expand(shape) for g in (grad_total, grad_square))


class _ChannelAffine(NamedTuple):
    """BatchNorm's affine (:class:`SampleGroups`): r = 1 / sqrt(var + eps), scale = gamma r and
    shift = beta - mean scale (G, C), kept for their written backward."""

    mean: Tensor
    rstd: Tensor
    scale: Tensor
    shift: Tensor
    weight: Tensor | None
    has_bias: bool

    @classmethod
    def of(
        cls, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> _ChannelAffine:
        rstd = torch.rsqrt(var + eps)
        scale = rstd if weight is None else rstd * weight
        shift = -mean * scale if bias is None else torch.addcmul(bias, mean, scale, value=-1)
        return cls(mean, rstd, scale, shift, weight, bias is not None)

    def outputs(self, layout: Layout) -> tuple[Tensor, Tensor]:
        return layout.broadcast(self.scale), layout.broadcast(self.shift)

    def backward(
        self,
        grad_affine: tuple[RowSums, tuple[int, ...], tuple[int, ...]],
        grad_mean: Tensor,
        grad_var: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """dmean = g_mean - g_shift scale, dvar = g_var - dscale gamma r^3 / 2 with
        dscale = g_scale - g_shift mean, dgamma = sum_G dscale r, dbeta = sum_G g_shift, from
        dL/dscale = Sigma g x and dL/dshift = Sigma g (``grad_affine``)."""
        rows, shift_rest, scale_rest = grad_affine
        grad_scale = _rows(_sum(rows.product, scale_rest))
        grad_shift = _rows(_sum(rows.total, shift_rest))
        grad_mean = torch.addcmul(grad_mean, grad_shift, self.scale, value=-1)
        grad_scale = torch.addcmul(grad_scale, grad_shift, self.mean, value=-1)
        weight = self.weight
        grad_rstd = grad_scale if weight is None else grad_scale * weight
        grad_var = torch.addcmul(grad_var, grad_rstd, self.rstd.pow(3), value=-0.5)
        grad_weight = None if weight is None else (grad_scale * self.rstd).sum(0)
        grad_bias = grad_shift.sum(0) if self.has_bias else None
        return grad_mean, grad_var, grad_weight, grad_bias


class _GroupAffine(NamedTuple):
    """GroupNorm's affine (:class:`ChannelGroups`): r = 1 / sqrt(var + eps) (N, G) and, for the
    channels c = (g, j) of group g, scale_{n,c} = gamma_c r_{n,g}, shift_{n,c} = beta_c -
    mean_{n,g} scale_{n,c} (N, G, C/G; 1 along the channels without gamma or beta), kept for
    their written backward."""

    mean: Tensor
    rstd: Tensor
    scale: Tensor
    shift: Tensor
    weight: Tensor | None
    has_bias: bool

    @classmethod
    def of(
        cls, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> _GroupAffine:
        groups = mean.shape[1]
        rstd = torch.rsqrt(var + eps)
        scale = rstd.unsqueeze(-1)
        if weight is not None:
            weight = weight.view(groups, -1)
            scale = scale * weight
        centre = mean.unsqueeze(-1)
        if bias is None:
            shift = -centre * scale
        else:
            shift = torch.addcmul(bias.view(groups, -1), centre, scale, value=-1)
        return cls(mean, rstd, scale, shift, weight, bias is not None)

    def outputs(self, layout: Layout) -> tuple[Tensor, Tensor]:
        return tuple(t.flatten(0, 1)[..., None, None] for t in (self.scale, self.shift))

    def backward(
        self,
        grad_affine: tuple[RowSums, tuple[int, ...], tuple[int, ...]],
        grad_mean: Tensor,
        grad_var: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """dmean = g_mean - sum_j g_shift scale, dscale = g_scale - g_shift mean,
        dvar = g_var - (sum_j dscale gamma) r^3 / 2, dgamma = sum_N dscale r,
        dbeta = sum_N g_shift."""
        rows, shift_rest, scale_rest = grad_affine
        shape = self.mean.shape
        grad_scale = _sum(rows.product, scale_rest).view(*shape, -1)
        grad_shift = _sum(rows.total, shift_rest).view(*shape, -1)
        grad_mean = grad_mean - (grad_shift * self.scale).sum(-1)
        moved = (grad_shift * self.mean.unsqueeze(-1)).sum_to_size(self.scale.shape)
        grad_scale = grad_scale - moved
        weight = self.weight
        grad_rstd = (grad_scale if weight is None else grad_scale * weight).sum(-1)
        grad_var = torch.addcmul(grad_var, grad_rstd, self.rstd.pow(3), value=-0.5)
        grad_weight = None
        if weight is not None:
            grad_weight = (grad_scale * self.rstd.unsqueeze(-1)).sum(0).flatten()
        grad_bias = grad_shift.sum(0).flatten() if self.has_bias else None
        return grad_mean, grad_var, grad_weight, grad_bias


def _sum_to(grad: Tensor, like: Tensor) -> Tensor:
    """``grad`` (G, C) summed over the groups ``like`` (1, C) broadcasts along."""
    return grad.sum(0, keepdim=True) if like.shape[0] != grad.shape[0] else grad


def _summed(grads: Sequence[Tensor | None], like: Tensor) -> Tensor:
    """The sum of the gradients that are not ``None`` (zeros like ``like`` without any)."""
    present = [g for g in grads if g is not None]
    if not present:
        return torch.zeros_like(like)
    return present[0] if len(present) == 1 else present[0] + present[1]


class CompiledStep:
    """The small step compiled (:func:`kalmannorm.compile_kalman_steps`): a compiled forward
    without graph (``after`` included) and a compiled backward that recomputes the step without
    ``after`` inside its vector-Jacobian product (:func:`small_step_gradients`), both cached on
    ``owner`` per layout. ``estimate`` and ``after`` must compute from their arguments alone
    (and ``estimate`` read no state ``after`` changes): the backward recomputes."""

    def __init__(
        self,
        owner: object,
        estimate: AffineEstimate,
        layout: Layout,
        what: str,
        after: AfterStep | None = None,
    ) -> None:
        self.owner, self.layout, self.what = owner, layout, what
        self.forward_step = functools.partial(small_step, estimate, layout, after)
        self.step = functools.partial(small_step, estimate, layout, None)
        self.forward_key = ("forward", layout, after is not None)
        self.extra: tuple = ()

    def forward(
        self, constants: tuple, inputs: tuple[Tensor | None, ...]
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        with autocast_off(inputs[0]):
            outputs, risky, self.extra = compiled_call(
                self.owner, self.forward_key, self.forward_step, *constants, *inputs,
                what=self.what,
            )  # fmt: skip
        self._saved = (constants, inputs)
        return outputs, risky

    def backward(
        self,
        grad_affine: tuple[RowSums, tuple[int, ...], tuple[int, ...]],
        grad_outputs: tuple[Tensor | None, ...],
    ) -> tuple[Tensor | None, ...]:
        constants, inputs = self._saved
        gradients = functools.partial(small_step_gradients, self.step)
        return compiled_call(
            self.owner, ("backward", self.layout), gradients, constants, inputs, grad_affine,
            grad_outputs, what=self.what,
        )  # fmt: skip


SmallStep = TracedStep | CompiledStep | BatchStatisticsStep | KalmanStep


class FusedGroupNorm(torch.autograd.Function):
    """y, posterior = normalise(x) with statistics and affine from a :data:`SmallStep`.

    Arguments of :meth:`apply`: x (N, C, *spatial) contiguous; the :class:`SampleGroups` or
    :class:`ChannelGroups` layout; the layer's :class:`VarianceGuard` (:func:`variance_guard`);
    the small step (written out: :class:`KalmanStep`, :class:`BatchStatisticsStep`; or
    :class:`TracedStep` or :class:`CompiledStep` of an :data:`AffineEstimate`, which maps the
    batch statistics, gamma, beta and the small tensors to the statistics to normalise with and
    their scale and shift; a plain estimate of the statistics becomes one through
    :func:`with_affine`); ``inspect(sum_x, sum_x2)``, called once in the forward on the
    batch's row sums before the small step (checks); gamma; beta; the small tensors. The
    estimate's extra outputs are left on the step (``step.extra``).
    Returns y, the estimate's mean and var and the batch mean and var (all differentiable: the
    layers fed by this one predict their statistics from them).
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        layout: Layout,
        guard: VarianceGuard,
        step: SmallStep,
        inspect: Callable[[Tensor, Tensor], None],
        *small: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        grouped = layout.view(x)
        found = batch_sums(grouped, guard)
        count = grouped.shape[1] * grouped.shape[3]
        constants = (count, found.sums.rest)
        inspect(found.sums.total, found.sums.product)  # before the step moves any average
        inputs = (found.sums.total, found.sums.product, found.offset, *small)
        (scale, shift, mean, var, batch_mean, batch_var), risky = step.forward(constants, inputs)
        if not _torch_private.in_backward():
            guard.record(risky)
        y = torch.empty_like(x)  # written through a view, returned whole (in-place ops allowed)
        torch.addcmul(shift, grouped, scale, out=y.view_as(grouped))
        shift_dims, scale_dims = _broadcast_dims(shift, grouped), _broadcast_dims(scale, grouped)
        ctx.layout, ctx.step, ctx.offset, ctx.scale = layout, step, found.offset, scale
        ctx.dims = (shift_dims, scale_dims)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros
        ctx.save_for_backward(x)
        return y, mean, var, batch_mean, batch_var

    @staticmethod
    @once_differentiable
    def backward(
        ctx,
        grad_y: Tensor,
        grad_mean: Tensor | None,
        grad_var: Tensor | None,
        grad_out_batch_mean: Tensor | None,
        grad_out_batch_var: Tensor | None,
    ):
        (x,) = ctx.saved_tensors
        grouped = ctx.layout.view(x)
        if grad_y is None:  # (only the statistics were used)
            grad_y = torch.zeros_like(x)
        grad = grad_y.contiguous().view_as(grouped)
        shift_dims, scale_dims = ctx.dims
        both = tuple(d for d in shift_dims if d in scale_dims)
        rows = row_sums(grad, grouped, both)  # Sigma g, Sigma g x in one reading pass
        shift_rest = rows.rest + tuple(d for d in shift_dims if d not in both)
        scale_rest = rows.rest + tuple(d for d in scale_dims if d not in both)
        grads = ctx.step.backward(
            (rows, shift_rest, scale_rest),
            (grad_mean, grad_var, grad_out_batch_mean, grad_out_batch_var),
        )
        grad_total, grad_total_square, _, *small_grads = grads
        if grad_total is None:  # (nothing depended on the batch statistics)
            grad_total = torch.zeros((), dtype=ctx.scale.dtype, device=x.device)
            grad_total_square = grad_total
        # dL/dx = dL/dSigma d + 2 d dL/dSigma d^2 with d = x - offset, then + g * scale
        if ctx.offset is not None:
            grad_total = torch.addcmul(grad_total, ctx.offset, grad_total_square, value=-2.0)
        grad_x = torch.addcmul(grad_total, grouped, grad_total_square, value=2.0)
        if grad_x.dtype == x.dtype:
            grad_x.addcmul_(grad, ctx.scale)
        else:  # half precision: in float32, rounded once
            grad_x = torch.addcmul(grad_x, grad, ctx.scale, out=torch.empty_like(grouped))
        return (grad_x.view_as(x), None, None, None, None, *small_grads)


def detached_leaf(t: Tensor | None) -> Tensor | None:
    """``t`` detached from its graph, requiring grad as ``t`` does (``None`` stays ``None``)."""
    if t is None:
        return None
    return t.detach().requires_grad_(t.requires_grad)


#: Activation dtypes whose statistics accumulate in float32.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def statistics_dtype(x: Tensor) -> torch.dtype:
    """The dtype statistics of ``x`` are computed in: float32 for half-precision activations."""
    return torch.float32 if x.dtype in HALF_DTYPES else x.dtype


def fused_applicable(x: Tensor, tensors: Sequence[Tensor | None]) -> bool:
    """Whether the fused path applies: eager, contiguous NC* layout, float32/float64 with
    parameters of the same dtype, or float16/bfloat16 (a half model, or autocast's activations
    with float32 parameters), whose statistics and estimate are float32."""
    if torch.compiler.is_compiling() or not x.is_contiguous():
        return False
    if x.dtype in (torch.float32, torch.float64):
        return all(t is None or t.dtype == x.dtype for t in tensors)
    return x.dtype in HALF_DTYPES and all(
        t is None or t.dtype in (x.dtype, torch.float32) for t in tensors
    )
