"""EvoNorm-S0 (Liu et al., "Evolving Normalization-Activation Layers", NeurIPS 2020).

The sample-based (batch-independent) layer of the paper, per sample n, channel c and channel group
g(c) (``num_groups`` groups of C / G channels):

    s^2_{n,g} = Var over the group's channels and positions of x_n     (biased, as GroupNorm)
    y = x * sigmoid(v x) / sqrt(s^2_{n,g(c)} + eps) * gamma + beta

with learned per-channel v (initialised to 1), gamma (1) and beta (0). ``nonlinearity=False``
drops the numerator's gate, leaving y = x / sqrt(s^2 + eps) * gamma + beta (the paper's variant for
layers without an activation). The layer contains its activation: a converted model keeps the
ReLU that followed the BatchNorm.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kalmannorm.layers.affine import LoadsBatchNormCheckpoints, init_affine

DEFAULT_EPS = 1e-5


def group_inverse_std(x: Tensor, num_groups: int, eps: float) -> Tensor:
    """1 / sqrt(s^2_{n,g} + eps), shape (N, G): s^2 over a group's channels and positions."""
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if x.shape[0] == 0:  # an empty batch (as GroupNorm: an empty output)
        return work.new_empty(0, num_groups)
    var = work.reshape(x.shape[0], num_groups, -1).var(dim=-1, correction=0)
    return torch.rsqrt(var + eps)


def evonorm_s0(
    x: Tensor,
    v: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    num_groups: int,
    eps: float,
) -> Tensor:
    """y = x sigmoid(v x) / sqrt(s^2_{n,g} + eps) * gamma + beta (v=None: no gate).

    Computed as one multiply-add of the numerator with the small per-(sample, channel) scale
    gamma_c / sqrt(s^2_{n,g(c)} + eps); parameters are (C,).
    """
    n, c = x.shape[:2]
    shape = (1, -1, *((1,) * (x.dim() - 2)))
    numerator = x if v is None else x * torch.sigmoid(v.view(shape) * x)
    scale = group_inverse_std(x, num_groups, eps).repeat_interleave(c // num_groups, dim=1)
    if weight is not None:
        scale = scale * weight
    scale = scale.to(x.dtype).view(n, c, *((1,) * (x.dim() - 2)))
    if bias is None:
        return numerator * scale
    return torch.addcmul(bias.view(shape).to(x.dtype), numerator, scale)


class EvoNormS0(LoadsBatchNormCheckpoints):
    """EvoNorm-S0 over (N, C, *spatial) inputs.

    Args:
        num_groups: channel groups G (must divide ``num_features``); the paper uses 32.
        num_features: channels C.
        eps: added to the group variance.
        affine: learn gamma (``weight``) and beta (``bias``), BatchNorm's names.
        nonlinearity: multiply by sigmoid(v x) (learned ``v``); False gives the activation-free
            variant.

    Shape:
        - Input: (N, C, *spatial), any N (statistics are per sample and channel group).
        - Output: the input's shape.

    Examples::

        >>> import torch
        >>> from kalmannorm.baselines import EvoNormS0
        >>> EvoNormS0(4, 16)(torch.randn(1, 16, 5, 5)).shape
        torch.Size([1, 16, 5, 5])
    """

    _own_keys = ("v",)

    def __init__(
        self,
        num_groups: int,
        num_features: int,
        eps: float = DEFAULT_EPS,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        nonlinearity: bool = True,
    ) -> None:
        super().__init__()
        if num_groups < 1 or num_features % num_groups != 0:
            raise ValueError(
                f"EvoNormS0: num_groups ({num_groups}) must divide num_features "
                f"({num_features}); pick a divisor of {num_features}"
            )
        factory = {"device": device, "dtype": dtype}
        self.num_groups = num_groups
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        init_affine(self, num_features, affine, factory)
        if nonlinearity:
            self.v = nn.Parameter(torch.ones(num_features, **factory))
        else:
            self.register_parameter("v", None)

    def extra_repr(self) -> str:
        return (
            f"{self.num_groups}, {self.num_features}, eps={self.eps}, affine={self.affine}, "
            f"nonlinearity={self.v is not None}"
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"EvoNormS0 expects input (N, {self.num_features}, ...), got shape "
                f"{tuple(x.shape)}; build it with the input's channel count as num_features."
            )
        return evonorm_s0(x, self.v, self.weight, self.bias, self.num_groups, self.eps)
