"""Filter Response Normalization with a Thresholded Linear Unit (Singh & Krishnan, CVPR 2020).

Per sample n and channel c, over the spatial positions (N = prod(spatial) values; no batch
statistics, no mean subtraction):

    nu^2 = (1/N) sum_i x_i^2                      the mean squared norm of the filter response
    xhat = x / sqrt(nu^2 + eps)
    y    = gamma xhat + beta
    z    = max(y, tau)                            TLU, with a learned per-channel threshold tau

``learn_eps=True`` makes eps learned as in the paper's treatment of 1x1 activations:
eps = eps_min + |eps_l|, with eps_l (``eps_raw``) initialised to 1e-4 and eps_min = ``eps``. For
(N, C) inputs there is no spatial extent (nu^2 = x^2) and the paper recommends the learned eps.
The layer already contains its activation: a converted model that follows the norm by a ReLU
applies ReLU(TLU(y)), which is the paper's layer whenever tau >= 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kalmannorm.layers.affine import LoadsBatchNormCheckpoints, init_affine

#: The paper's epsilon and the initial value of the learned part.
DEFAULT_EPS = 1e-6
LEARNED_EPS_INIT = 1e-4


def filter_response_normalize(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    tau: Tensor | None,
    eps: Tensor | float,
) -> Tensor:
    """z = max(gamma x / sqrt(mean_spatial(x^2) + eps) + beta, tau); per-channel parameters (C,).

    Computed as one multiply-add with the small per-(sample, channel) scale
    s = gamma / sqrt(nu^2 + eps) and the TLU as max(y, tau) = relu(x s + beta - tau) + tau, whose
    backward is one masking pass (``tau=None`` skips the TLU). Low-precision inputs accumulate
    nu^2 in float32.
    """
    spatial = tuple(range(2, x.dim()))
    shape = (1, -1, *((1,) * len(spatial)))
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    nu2 = work.square().mean(dim=spatial, keepdim=True) if spatial else work.square()
    if isinstance(eps, Tensor):
        eps = eps.view(shape)
    scale = torch.rsqrt(nu2 + eps)
    if weight is not None:
        scale = scale * weight.view(shape)
    scale = scale.to(x.dtype)
    shift = None if bias is None else bias.view(shape).to(x.dtype)
    if tau is None:
        return x * scale if shift is None else torch.addcmul(shift, x, scale)
    threshold = tau.view(shape).to(x.dtype)
    shift = -threshold if shift is None else shift - threshold
    return torch.relu(torch.addcmul(shift, x, scale)) + threshold


class FilterResponseNorm(LoadsBatchNormCheckpoints):
    """FRN + TLU over (N, C, *spatial) inputs.

    Args:
        num_features: channels C.
        eps: epsilon (the lower bound of a learned epsilon); the paper's 1e-6.
        affine: learn gamma (``weight``) and beta (``bias``); BatchNorm's names, so a converted
            model keeps a BatchNorm checkpoint's gamma and beta.
        tlu: apply the thresholded linear unit max(y, tau) with learned ``tau``.
        learn_eps: learn eps = eps + |eps_raw| per channel (the paper's choice for 1x1 inputs).

    Shape:
        - Input: (N, C, *spatial), any N (statistics are per sample and channel).
        - Output: the input's shape.

    Examples::

        >>> import torch
        >>> from kalmannorm.baselines import FilterResponseNorm
        >>> FilterResponseNorm(16)(torch.randn(1, 16, 5, 5)).shape
        torch.Size([1, 16, 5, 5])
    """

    _own_keys = ("tau", "eps_raw")

    def __init__(
        self,
        num_features: int,
        eps: float = DEFAULT_EPS,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        tlu: bool = True,
        learn_eps: bool = False,
    ) -> None:
        super().__init__()
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        init_affine(self, num_features, affine, factory)
        if tlu:
            self.tau = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("tau", None)
        if learn_eps:
            self.eps_raw = nn.Parameter(torch.full((num_features,), LEARNED_EPS_INIT, **factory))
        else:
            self.register_parameter("eps_raw", None)

    @property
    def effective_eps(self) -> Tensor | float:
        """eps, or eps + |eps_raw| per channel when learned."""
        return self.eps if self.eps_raw is None else self.eps + self.eps_raw.abs()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, affine={self.affine}, "
            f"tlu={self.tau is not None}, learn_eps={self.eps_raw is not None}"
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"FilterResponseNorm expects input (N, {self.num_features}, ...), got shape "
                f"{tuple(x.shape)}; build it with the input's channel count as num_features."
            )
        return filter_response_normalize(x, self.weight, self.bias, self.tau, self.effective_eps)
