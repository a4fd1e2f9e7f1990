"""Eager fast path: group statistics, Kalman estimate and normalisation in one autograd node.

Written with ordinary autograd, a BKN layer makes about eight passes over its activations in
training (statistics, normalisation, and the backward of each) and allocates three activation-size
gradients. :class:`FusedGroupNorm` needs one reading and one writing pass forward and the same
backward, like native BatchNorm. A :class:`SampleGroups` or
:class:`ChannelGroups` layout views x (N, C, *spatial) as a (A, B, D, L) tensor whose statistics
reduce over B and L (m = B * L values each):

forward
    Sigma x and Sigma x^2 per (A, D) in one reading pass (:func:`sums`), the small Kalman
    estimate (any function of the batch statistics), then y = x * scale + shift with
    scale = gamma / sqrt(var + eps), shift = beta - mu * scale.
backward
    dL/dscale = Sigma g x and dL/dshift = Sigma g over the dims scale and shift broadcast along,
    in one reading pass;
    the small estimate's autograd graph, built in the forward on detached leaves and kept on the
    context, carries them (and the gradients of the posterior handed to the next layer) back to
    the batch statistics xbar, S and to every small input (A, R, q, upstream statistics, gamma,
    beta); finally dL/dx = g * scale + (dL/dxbar + 2 dL/dS (x - xbar)) / m, written once.

Nothing activation-sized is saved beyond the input; nothing is recomputed.
Used for contiguous CPU/GPU tensors in eager mode; under ``torch.compile`` the layers use the
composite path, which the compiler fuses itself.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kalmannorm import _torch_private
from kalmannorm.functional import affine_from_statistics

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

    def broadcast(self, stat: Tensor) -> Tensor:
        """A (G, C) tensor as (G, 1, C, 1), broadcasting along the view."""
        return stat.unsqueeze(-1).unsqueeze(1)

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


def sums(a: Tensor, b: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """(sum a, sum a * b) over ``dims`` of contiguous (A, B, D, L) tensors, kept as size 1
    (float32 for float16/bfloat16 tensors).

    Along the last dim both come from one vectorised pass
    (:func:`kalmannorm._torch_private.sum_and_dot_rows`: ATen's BatchNorm backward used as a sum
    kernel; a sum and a batched dot product, two passes, cost 2.8x as much on a 2-core x86 CPU).
    """
    if 3 not in dims:
        if a.dtype in (torch.float16, torch.bfloat16):
            a = a.float()
        return _sum(a, dims), _sum(a * b, dims)
    # (A, B, 1, L) summed over B and L: each of the A runs of values is one row.
    kept = (a.shape[0], 1, 1, 1) if 1 in dims and a.shape[2] == 1 else (*a.shape[:3], 1)
    rows = math.prod(kept)
    sum_a, sum_ab = _torch_private.sum_and_dot_rows(a.reshape(1, rows, -1), b.reshape(1, rows, -1))
    rest = tuple(d for d in dims if d != 3 and kept[d] != 1)
    return _sum(sum_a.view(kept), rest), _sum(sum_ab.view(kept), rest)


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
        self._pinned = False

    def choose(self) -> bool | None:
        """The choice for this forward: the latest outcome the device has written (``None``
        before the first)."""
        if self._host is not None:
            self.two_pass = bool(self._host.tolist())  # host memory: no device read
        return self.two_pass

    def record(self, risky: Tensor) -> None:
        """Send this forward's test (a 0-dim bool tensor) to the host, without a sync."""
        pinned = risky.device.type == "cuda"
        if self._host is None or self._pinned != pinned:
            self._host = torch.ones((), dtype=torch.bool, pin_memory=pinned)
            self._pinned = pinned
        self._host.copy_(risky, non_blocking=pinned)

    def __getstate__(self) -> dict:
        # a copy (deepcopy, pickle) keeps the choice, not the host buffer
        return {"two_pass": self.two_pass, "_host": None, "_pinned": False}


def variance_guard(module: object) -> VarianceGuard:
    """The :class:`VarianceGuard` of a layer (created on first use)."""
    guard = module.__dict__.get("_variance_guard")
    if guard is None:
        guard = module.__dict__["_variance_guard"] = VarianceGuard()
    return guard


def fast_moments(grouped: Tensor, guard: VarianceGuard | None = None) -> tuple[Tensor, Tensor]:
    """Mean and biased variance over dims (1, 3) of a contiguous (A, B, D, L) tensor, (A, D).

    One reading pass for Sigma x and Sigma x^2 (var = E[x^2] - xbar^2), or, where ``guard``
    chose it, two: the mean, then Sigma d and Sigma d^2 of d = x - mean. Without a host sync
    except on a guard's first forward (:class:`VarianceGuard`; no guard: a fresh one).
    """
    guard = VarianceGuard() if guard is None else guard
    replay = _torch_private.in_backward()  # a checkpoint recomputation: the same choice again
    two_pass = guard.two_pass if replay else guard.choose()
    if not two_pass:
        mean, var = _one_pass_moments(grouped)
        risky = _cancels(mean, var)
        if two_pass is None:  # the first forward: decide on this one (one host read, once)
            two_pass = guard.two_pass = bool(risky)
    if two_pass:
        mean, var = _two_pass_moments(grouped)
        risky = _cancels(mean, var)
    if not replay:
        guard.record(risky)
    return mean, var.clamp_min(0.0)


def _cancels(mean: Tensor, var: Tensor) -> Tensor:
    """Whether E[x^2] - xbar^2 loses too many digits in some (A, D) entry (0-dim bool)."""
    return (mean.square() > _CANCELLATION_LIMIT * var).any()


def _one_pass_moments(grouped: Tensor) -> tuple[Tensor, Tensor]:
    count = grouped.shape[1] * grouped.shape[3]
    total, total_square = (t[:, 0, :, 0] for t in sums(grouped, grouped, STAT_DIMS))
    mean = total / count
    return mean, total_square / count - mean.square()


def _two_pass_moments(grouped: Tensor) -> tuple[Tensor, Tensor]:
    """The mean, then the moments of x - mean (its sum corrects the mean's rounding)."""
    count = grouped.shape[1] * grouped.shape[3]
    shift = grouped.sum(STAT_DIMS, keepdim=True, dtype=statistics_dtype(grouped)) / count
    centred = grouped - shift  # (float32 for half inputs)
    total, total_square = (t[:, 0, :, 0] for t in sums(centred, centred, STAT_DIMS))
    offset = total / count
    return shift[:, 0, :, 0] + offset, total_square / count - offset.square()


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


class FusedGroupNorm(torch.autograd.Function):
    """y, posterior = normalise(x) with statistics and affine from ``estimate``.

    Arguments of :meth:`apply`: x (N, C, *spatial) contiguous; the :class:`SampleGroups` or
    :class:`ChannelGroups` layout; the layer's :class:`VarianceGuard` (:func:`variance_guard`);
    ``estimate``, an :data:`AffineEstimate` mapping the batch statistics, gamma, beta and the
    small tensors to the statistics to normalise with and their scale and shift (a plain
    estimate of the statistics becomes one through :func:`with_affine`);
    ``inspect(batch_mean, batch_var)``, called once in the forward (checks, recording); gamma;
    beta; the small tensors.
    Returns y, the estimate's mean and var and the batch mean and var (all differentiable: the
    layers fed by this one predict their statistics from them).
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        layout: Layout,
        guard: VarianceGuard,
        estimate: AffineEstimate,
        inspect: Callable[[Tensor, Tensor], None],
        weight: Tensor | None,
        bias: Tensor | None,
        *small: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        grouped = layout.view(x)
        batch_mean, batch_var = (layout.statistics(t) for t in fast_moments(grouped, guard))
        inspect(batch_mean, batch_var)
        # The small estimate is built with autograd here and kept on ctx: the backward
        # differentiates this graph instead of recomputing it. In float32 under autocast too.
        with torch.enable_grad(), _no_autocast(x):
            stats = (batch_mean.detach().requires_grad_(), batch_var.detach().requires_grad_())
            leaves = [detached_leaf(t) for t in (weight, bias, *small)]
            mean, var, scale, shift = estimate(*stats, *leaves)
        y = torch.empty_like(x)  # written through a view, returned whole (in-place ops allowed)
        torch.addcmul(shift.detach(), grouped, scale.detach(), out=y.view_as(grouped))
        ctx.layout = layout
        ctx.graph = (stats, leaves, mean, var, scale, shift)
        ctx.save_for_backward(x)
        return y, mean.detach(), var.detach(), batch_mean, batch_var

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
        stats, leaves, mean, var, scale, shift = ctx.graph
        layout: Layout = ctx.layout
        grouped = layout.view(x)
        grad = grad_y.contiguous().view_as(grouped)
        count = grouped.shape[1] * grouped.shape[3]
        shift_dims, scale_dims = _broadcast_dims(shift, grouped), _broadcast_dims(scale, grouped)
        both = tuple(d for d in shift_dims if d in scale_dims)
        sum_grad, sum_grad_x = sums(grad, grouped, both)
        grad_shift = _sum(sum_grad, tuple(d for d in shift_dims if d not in both))
        grad_scale = _sum(sum_grad_x, tuple(d for d in scale_dims if d not in both))

        outputs, output_grads = [scale, shift], [grad_scale, grad_shift]
        for out, out_grad in ((mean, grad_mean), (var, grad_var)):
            if out_grad is not None:
                outputs.append(out)
                output_grads.append(out_grad)
        wanted = [*stats, *(t for t in leaves if t is not None and t.requires_grad)]
        # retain_graph: a backward may run more than once on the same graph (gradcheck)
        found = torch.autograd.grad(
            outputs, wanted, output_grads, allow_unused=True, retain_graph=True
        )
        direct = (grad_out_batch_mean, grad_out_batch_var)
        grad_batch_mean, grad_batch_var = (
            _add_grads(g, d, s) for g, d, s in zip(found[:2], direct, stats)
        )
        by_leaf = dict(zip(map(id, wanted[2:]), found[2:]))
        leaf_grads = [None if t is None else by_leaf.get(id(t)) for t in leaves]

        # dL/dx = g * scale + x * slope + offset, slope = 2 dS / m, offset = dxbar / m - slope xbar
        # (on the small tensors, then broadcast; half precision: in float32, rounded once)
        slope = grad_batch_var * (2.0 / count)
        offset = torch.addcmul(grad_batch_mean / count, slope, stats[0].detach(), value=-1.0)
        grad_x = torch.addcmul(layout.broadcast(offset), grouped, layout.broadcast(slope))
        if grad_x.dtype == x.dtype:
            grad_x.addcmul_(grad, scale.detach())
        else:
            grad_x = torch.addcmul(grad_x, grad, scale.detach(), out=torch.empty_like(grouped))
        return (grad_x.view_as(x), None, None, None, None, *leaf_grads)


def detached_leaf(t: Tensor | None) -> Tensor | None:
    """``t`` detached from its graph, requiring grad as ``t`` does (``None`` stays ``None``)."""
    if t is None:
        return None
    return t.detach().requires_grad_(t.requires_grad)


def _add_grads(first: Tensor | None, second: Tensor | None, like: Tensor) -> Tensor:
    """The sum of two gradients of ``like``, either of which may be ``None`` (zero)."""
    if first is None and second is None:
        return torch.zeros_like(like)
    if first is None or second is None:
        return first if second is None else second
    return first + second


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


def _no_autocast(x: Tensor):
    """Autocast off (the small estimate keeps float32), or nothing when it is off already."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()
