"""A norm followed by dropout and an activation, with the state-dict keys of a fused layer.

timm's ``BatchNormAct2d`` (and ``FrozenBatchNormAct2d``, ``SyncBatchNormAct``) is a BatchNorm
whose forward also applies ``self.drop`` and ``self.act``; its checkpoint holds the norm's keys at
the layer's own prefix (``bn1.weight``, ``bn1.running_mean``) and the activation's below it
(``bn1.act.weight`` for a PReLU). :class:`NormAct` composes any norm with the same drop and
activation and keeps exactly those keys: its ``state_dict`` writes the norm's entries at its own
prefix, and loading reads them from there (a BatchNormAct2d checkpoint loads strictly; its own
checkpoint loads back into a timm BN model with ``strict=False`` for the Kalman keys).

The norm stays a module of its own (``bn1.norm``), so the data-flow chain sees the activation
between the norm and the next convolution, ``fold`` folds the norm and keeps the activation, and
parameter names (``named_parameters``: ``bn1.norm.weight``) differ from the state-dict keys
(``bn1.weight``): tools that match the two by name (``torch.distributed.checkpoint``) see the
difference.
"""

from __future__ import annotations

from torch import Tensor, nn

_NORM = "norm"
_BATCHNORM_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class NormAct(nn.Module):
    """``act(drop(norm(x)))``, saved and loaded with the keys of a fused norm+activation layer.

    Args:
        norm: the normalization layer.
        drop: applied after the norm (timm's ``drop_layer``); ``None``: identity.
        act: the activation; ``None``: identity.

    The norm's usual attributes (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_features``, ``eps``) read through, as on the fused layer.
    """

    def __init__(
        self, norm: nn.Module, drop: nn.Module | None = None, act: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.norm = norm
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()
        self.register_state_dict_post_hook(_flatten_norm_keys)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(self.norm(x)))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # The norm's entries sit at this module's prefix: move them below ``norm.`` for it (a
        # BatchNorm's entry that a norm from outside this library does not hold stays, and is
        # reported under its own name; this library's norms take BatchNorm checkpoints).
        ours = _ours(self.norm)
        for key in [k for k in state_dict if k.startswith(prefix)]:
            head = key[len(prefix) :].split(".", 1)[0]
            foreign = head in _BATCHNORM_KEYS and not _holds(self.norm, head) and not ours
            if head in self._modules or foreign:
                continue
            state_dict[prefix + _NORM + "." + key[len(prefix) :]] = state_dict.pop(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return "state-dict keys of the norm at this module's prefix"

    # the fused layer's attributes, read through to the norm
    weight = property(lambda self: getattr(self.norm, "weight", None))
    bias = property(lambda self: getattr(self.norm, "bias", None))
    running_mean = property(lambda self: getattr(self.norm, "running_mean", None))
    running_var = property(lambda self: getattr(self.norm, "running_var", None))
    num_features = property(lambda self: self.norm.num_features)
    eps = property(lambda self: self.norm.eps)


def _flatten_norm_keys(module: NormAct, state_dict, prefix: str, local_metadata) -> None:
    inner = prefix + _NORM + "."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _holds(module: nn.Module, name: str) -> bool:
    return module._parameters.get(name) is not None or module._buffers.get(name) is not None


def _ours(module: nn.Module) -> bool:
    return type(module).__module__.startswith("kalmannorm.")
