"""The baselines the paper compares against, re-exported from :mod:`kalmannorm.layers`.

Micro-batch alternatives to BatchNorm (docs/baselines.md): BatchNorm per statistics group
(ghost BN), Batch Renormalization, Cross-Iteration BatchNorm, Moving Average BatchNorm, Filter
Response Normalization, EvoNorm-S0 and a channel LayerNorm. ``convert_norm`` builds them by name
(``"bn"``, ``"brn"``, ``"cbn"``, ``"mabn"``, ``"frn"``, ``"evonorm_s0"``, ``"ln"``); construct
them here directly::

    from kalmannorm.baselines import BatchRenorm2d
"""

from kalmannorm.layers.batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from kalmannorm.layers.cross_iteration import (
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    CrossIterationBatchNorm3d,
    link_cross_iteration,
)
from kalmannorm.layers.evonorm import EvoNormS0
from kalmannorm.layers.filter_response import FilterResponseNorm
from kalmannorm.layers.ghost_batch import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from kalmannorm.layers.layer_norm import ChannelLayerNorm
from kalmannorm.layers.moving_average_batch import (
    CenteredConv1d,
    CenteredConv2d,
    CenteredConv3d,
    CenteredLinear,
    MovingAverageBatchNorm1d,
    MovingAverageBatchNorm2d,
    MovingAverageBatchNorm3d,
)

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "CenteredConv1d",
    "CenteredConv2d",
    "CenteredConv3d",
    "CenteredLinear",
    "ChannelLayerNorm",
    "CrossIterationBatchNorm1d",
    "CrossIterationBatchNorm2d",
    "CrossIterationBatchNorm3d",
    "EvoNormS0",
    "FilterResponseNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "MovingAverageBatchNorm1d",
    "MovingAverageBatchNorm2d",
    "MovingAverageBatchNorm3d",
    "link_cross_iteration",
]
