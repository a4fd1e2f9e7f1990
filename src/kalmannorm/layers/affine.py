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


#: The state-dict version the batch-free norms of this library write (FRN, EvoNorm-S0,
#: ChannelLayerNorm), above every version a BatchNorm writes (torch 2, detectron2's frozen 3).
STATE_VERSION = 10
#: BatchNorm's statistics, which a batch-free norm does not hold.
BATCHNORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


class LoadsBatchNormCheckpoints(nn.Module):
    """Mixin of a batch-free norm: a BatchNorm checkpoint (metadata version below
    :data:`STATE_VERSION`, or none) loads strictly: its statistics are dropped and the norm's own
    parameters it lacks (``_own_keys``) keep their values. A checkpoint of the norm itself
    reports them missing as usual."""

    _version = STATE_VERSION
    _own_keys: tuple[str, ...] = ()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        version = local_metadata.get("version")
        if version is None or version < STATE_VERSION:
            for key in BATCHNORM_STATISTICS:
                state_dict.pop(prefix + key, None)
            for key in self._own_keys:
                value = getattr(self, key, None)
                if isinstance(value, torch.Tensor) and prefix + key not in state_dict:
                    state_dict[prefix + key] = value.detach()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
