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
