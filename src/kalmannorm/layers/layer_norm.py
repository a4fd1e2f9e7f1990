"""Layer Normalization over the channels of (N, C, *spatial) data.

torch's :func:`~torch.nn.functional.layer_norm` applied to the channel dimension at every position
(the "channels-first" LayerNorm of ConvNeXt): per sample n and position p,

    mu_{n,p} = (1/C) sum_c x_{n,c,p},   s^2_{n,p} = (1/C) sum_c (x_{n,c,p} - mu_{n,p})^2
    y = (x - mu_{n,p}) / sqrt(s^2_{n,p} + eps) * gamma_c + beta_c

Layer Normalization as in the Group Normalization paper (statistics over all channels *and*
positions of a sample) is GroupNorm with one group: ``convert_norm(model, "ln", spatial=True)``
builds that one (torch's :class:`~torch.nn.GroupNorm` with ``num_groups=1``).
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as torch_f

from kalmannorm.layers.affine import LoadsBatchNormCheckpoints, init_affine


class ChannelLayerNorm(LoadsBatchNormCheckpoints):
    """LayerNorm over the channel dimension of (N, C, *spatial) inputs, per position.

    Args:
        num_features: channels C.
        eps: added to the variance.
        affine: learn per-channel gamma (``weight``) and beta (``bias``).

    Shape:
        - Input: (N, C, *spatial), any N (statistics are per sample and position).
        - Output: the input's shape.

    Examples::

        >>> import torch
        >>> from kalmannorm.baselines import ChannelLayerNorm
        >>> ChannelLayerNorm(16)(torch.randn(1, 16, 5, 5)).shape
        torch.Size([1, 16, 5, 5])
    """

    _own_keys = ()

    def __init__(
        self, num_features: int, eps: float = 1e-5, affine: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        init_affine(self, num_features, affine, factory)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"ChannelLayerNorm expects input (N, {self.num_features}, ...), got shape "
                f"{tuple(x.shape)}; build it with the input's channel count as num_features."
            )
        last = x.movedim(1, -1)
        y = torch_f.layer_norm(last, (self.num_features,), self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)
