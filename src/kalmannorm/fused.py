"""Eager fast path: group statistics, Kalman estimate and normalisation in one autograd node.

Written with ordinary autograd, a BKN layer makes about eight passes over its activations in
training (statistics, normalisation, and the backward of each) and allocates three activation-size
gradients. :class:`FusedGroupNorm` needs two reading passes and one writing pass forward, and two
reading passes and one writing pass backward, like native BatchNorm:

forward
    Sigma x and Sigma x^2 per (group, channel) (a sum and a batched dot product), the small Kalman
    estimate on (G, C) tensors (any function of the batch statistics), then
    y = x * scale + shift with scale = gamma / sqrt(var + eps), shift = beta - mu * scale.
backward
    dL/dscale = Sigma g x and dL/dshift = Sigma g per (group, channel); the small estimate's
    autograd graph, built in the forward on detached leaves and kept on the context, carries them
    (and the gradients of the posterior handed to the next layer) back to the batch statistics
    xbar, S and to every small input (A, R, q, upstream statistics, gamma, beta); finally, with m
    values per group, dL/dx = g * scale + (dL/dxbar + 2 dL/dS (x - xbar)) / m, written once.

Nothing activation-sized is saved beyond the input; nothing is recomputed.
Used for contiguous CPU/GPU tensors in eager mode; under ``torch.compile`` the layers use the
composite path, which the compiler fuses itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kalmannorm.functional import affine_from_statistics

#: Below this size a product-then-sum beats batched dot products; above it the product's fresh
#: allocation (glibc serves it by mmap, so page faults on CPU) costs more than it saves. Measured
#: on a 2-core x86 CPU: a 32 MiB product costs 2.7x the batched dots, a 6 MiB one 0.6x.
_PRODUCT_LIMIT_BYTES = 16 * 2**20

#: Above this mean^2 / var ratio, E[x^2] - xbar^2 loses too many digits: use a two-pass variance.
_CANCELLATION_LIMIT = 1e4

Estimate = Callable[..., tuple[Tensor, Tensor]]


def group_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum over dims (1, 3) of a * b for (G, s, C, L) tensors, shape (G, C), without keeping a*b."""
    if a.numel() * a.element_size() < _PRODUCT_LIMIT_BYTES:
        return (a * b).sum((1, 3))
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).sum(1).flatten(1)


def fast_moments(grouped: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance over dims (1, 3) of a contiguous (G, s, C, L) tensor.

    One summing pass and one batched dot product (x . x), i.e. var = E[x^2] - xbar^2, falling back
    to :func:`torch.var_mean` where cancellation would cost precision.
    """
    count = grouped.shape[1] * grouped.shape[3]
    mean = grouped.sum((1, 3)) / count
    square = group_dot(grouped, grouped) / count
    var = square - mean.square()
    if bool((mean.square() > _CANCELLATION_LIMIT * var).any()):
        var, mean = torch.var_mean(grouped, dim=(1, 3), correction=0)
    return mean, var.clamp_min(0.0)


class FusedGroupNorm(torch.autograd.Function):
    """y, posterior = normalise(x) with statistics from ``estimate(xbar, S, *small)``.

    Arguments of :meth:`apply`: x (N, C, *spatial) contiguous; the number of statistics groups;
    eps; ``estimate(batch_mean, batch_var, *small) -> (mean, var)`` mapping (G, C) batch
    statistics to the statistics to normalise with; ``inspect(batch_mean, batch_var)``, called
    once in the forward (checks, recording); gamma; beta; the small tensors. Returns y and the
    estimate's mean and var (differentiable, for the next layer).
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        groups: int,
        eps: float,
        estimate: Estimate,
        inspect: Callable[[Tensor, Tensor], None],
        weight: Tensor | None,
        bias: Tensor | None,
        *small: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        grouped = x.view(groups, x.shape[0] // groups, x.shape[1], -1)
        batch_mean, batch_var = fast_moments(grouped)
        inspect(batch_mean, batch_var)
        # The small (G, C) estimate is built with autograd here and kept on ctx: the backward
        # differentiates this graph instead of recomputing it.
        with torch.enable_grad():
            stats = (batch_mean.requires_grad_(), batch_var.requires_grad_())
            leaves = [_leaf(t) for t in (weight, bias, *small)]
            mean, var = estimate(*stats, *leaves[2:])
            scale, shift = affine_from_statistics(mean, var, leaves[0], leaves[1], eps)
        y = torch.empty_like(x)  # written through a view, returned whole (in-place ops allowed)
        torch.addcmul(
            shift.detach().unsqueeze(-1).unsqueeze(1),
            grouped,
            scale.detach().unsqueeze(-1).unsqueeze(1),
            out=y.view_as(grouped),
        )
        ctx.groups = groups
        ctx.graph = (stats, leaves, mean, var, scale, shift)
        ctx.save_for_backward(x)
        return y, mean.detach(), var.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor, grad_mean: Tensor | None, grad_var: Tensor | None):
        (x,) = ctx.saved_tensors
        stats, leaves, mean, var, scale, shift = ctx.graph
        groups = ctx.groups
        grouped = x.view(groups, x.shape[0] // groups, x.shape[1], -1)
        grad = grad_y.contiguous().view_as(grouped)
        count = grouped.shape[1] * grouped.shape[3]
        grad_shift = grad.sum((1, 3))
        grad_scale = group_dot(grad, grouped)

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
        batch_mean = stats[0].detach()
        grad_batch_mean, grad_batch_var = (_zero_if_none(g, s) for g, s in zip(found[:2], stats))
        by_leaf = dict(zip(map(id, wanted[2:]), found[2:]))
        leaf_grads = [None if t is None else by_leaf.get(id(t)) for t in leaves]

        # dL/dx = g * scale + x * (2 dS / m) + (dxbar - 2 dS xbar) / m
        slope = (2.0 * grad_batch_var / count).unsqueeze(-1).unsqueeze(1)
        offset = ((grad_batch_mean - 2.0 * grad_batch_var * batch_mean) / count).unsqueeze(-1)
        grad_x = torch.addcmul(offset.unsqueeze(1), grouped, slope)
        grad_x.addcmul_(grad, scale.detach().unsqueeze(-1).unsqueeze(1))
        return (grad_x.view_as(x), None, None, None, None, *leaf_grads)


def _leaf(t: Tensor | None) -> Tensor | None:
    if t is None:
        return None
    return t.detach().requires_grad_(t.requires_grad)


def _zero_if_none(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


def fused_applicable(x: Tensor, tensors: Sequence[Tensor | None]) -> bool:
    """Whether the fused path applies: eager, contiguous NC* layout, float32/float64."""
    return (
        not torch.compiler.is_compiling()
        and x.is_contiguous()
        and x.dtype in (torch.float32, torch.float64)
        and all(t is None or t.dtype == x.dtype for t in tensors)
    )
