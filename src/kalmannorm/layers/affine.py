"""The per-channel affine parameters gamma (``weight``) and beta (``bias``) every norm shares."""

from __future__ import annotations

import torch
from torch import nn


def init_affine(module: nn.Module, num_features: int, affine: bool, factory_kwargs: dict) -> None:
    """Register ``weight`` = 1 and ``bias`` = 0 of shape (C,), or both as ``None``."""
    if affine:
        module.weight = nn.Parameter(torch.ones(num_features, **factory_kwargs))
        module.bias = nn.Parameter(torch.zeros(num_features, **factory_kwargs))
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)


def empty_output(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None):
    """What :class:`torch.nn.BatchNorm2d` returns for an empty batch (N = 0): an empty tensor
    of the input's shape, in the graph of the input and of the affine parameters (whose
    gradients are then zero). No statistic is computed and no moving average changes."""
    if weight is None:
        return x.clone()
    shape = (1, -1, *((1,) * (x.dim() - 2)))
    y = x * weight.to(x.dtype).view(shape)
    return y if bias is None else y + bias.to(x.dtype).view(shape)
