"""Parameter counts (the paper's Table 3, right) and the widened-BatchNorm control.

BKN adds, per layer k with an upstream layer of C_{k-1} channels, the transition A^k
(C_k x C_{k-1}), the noise R^k (C_k) and the gain q^k (C_k, when learned):

    extra_k = C_k C_{k-1} + 2 C_k

To show that BKN's gain is not from these extra parameters, a BatchNorm network is widened until it
has at least as many parameters: :func:`width_for_parameter_count` finds the smallest integer width
w with P(build(w)) >= target, assuming the count P grows with the width, by doubling an upper
bound and then bisecting (O(log w) models built).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from kalmannorm._torch_private import NormBase
from kalmannorm.lab.train.batch_mode import is_batchnorm_like
from kalmannorm.layers.base import KalmanNormBase

#: Parameter names of the Kalman prior and gain (see layers/base.py).
KALMAN_PARAMETERS = ("transition", "noise_raw", "gain_logit")


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter values of ``model`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@dataclass
class ParameterCount:
    """A model's parameter values: all, those in its norm layers, the Kalman ones (A, R, q)."""

    total: int
    norm: int
    kalman: int

    @property
    def other(self) -> int:
        return self.total - self.norm


def is_norm_layer(module: nn.Module) -> bool:
    """BatchNorm-like, Kalman, GroupNorm, LayerNorm, InstanceNorm or any kalmannorm layer."""
    return (
        isinstance(module, (NormBase, nn.GroupNorm, nn.LayerNorm, KalmanNormBase))
        or is_batchnorm_like(module)
        or type(module).__module__.startswith("kalmannorm.layers")
    )


def parameter_count(model: nn.Module) -> ParameterCount:
    """:class:`ParameterCount` of ``model`` (norm layers: see :func:`is_norm_layer`)."""
    seen: set[int] = set()
    norm = kalman = 0
    for module in model.modules():
        if not is_norm_layer(module):
            continue
        for name, p in module.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            norm += p.numel()
            if isinstance(module, KalmanNormBase) and name in KALMAN_PARAMETERS:
                kalman += p.numel()
    return ParameterCount(count_parameters(model), norm, kalman)


def compare_parameters(models: dict[str, nn.Module], reference: str) -> list[dict[str, Any]]:
    """One row per model: total, norm and Kalman parameters and the ratio to ``reference``."""
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not one of {list(models)}")
    base = parameter_count(models[reference]).total
    rows = []
    for name, model in models.items():
        count = parameter_count(model)
        rows.append(
            {
                "model": name,
                "parameters": count.total,
                "norm_parameters": count.norm,
                "kalman_parameters": count.kalman,
                "extra": count.total - base,
                "ratio": count.total / base if base else float("nan"),
            }
        )
    return rows


@dataclass
class WidthMatch:
    """Result of :func:`width_for_parameter_count`: the smallest width reaching ``target``, its
    count, and the count of ``width - 1`` (``None`` when ``width`` is the lower bound)."""

    width: int
    parameters: int
    target: int
    parameters_below: int | None

    @property
    def closest_width(self) -> int:
        """Of ``width - 1`` and ``width``, the one whose count is closer to ``target``."""
        if self.parameters_below is None:
            return self.width
        below = self.target - self.parameters_below
        return self.width - 1 if below < self.parameters - self.target else self.width


def width_for_parameter_count(
    build: Callable[[int], nn.Module],
    target: int,
    *,
    low: int = 1,
    max_width: int = 1 << 20,
) -> WidthMatch:
    """The smallest integer width w >= ``low`` with ``count_parameters(build(w)) >= target``.

    Args:
        build: builds the (BatchNorm) network of a given width.
        target: the parameter count to reach (e.g. the BKN network's).
        low: the smallest width to consider.
        max_width: give up above this width (ValueError).
    """
    if low < 1:
        raise ValueError(f"low must be a positive width, got {low}")
    cache: dict[int, int] = {}

    def count(width: int) -> int:
        if width not in cache:
            cache[width] = count_parameters(build(width))
        return cache[width]

    if count(low) >= target:
        return WidthMatch(low, count(low), target, None)
    below, above = low, low * 2
    while count(above) < target:
        if above >= max_width:
            raise ValueError(
                f"no width up to {max_width} reaches {target} parameters "
                f"(width {above}: {count(above)})"
            )
        below, above = above, min(above * 2, max_width)
    # Invariant: count(below) < target <= count(above).
    while above - below > 1:
        middle = (below + above) // 2
        if count(middle) >= target:
            above = middle
        else:
            below = middle
    return WidthMatch(above, count(above), target, count(above - 1))
