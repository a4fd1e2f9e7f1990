"""Normalization layers, one file per norm."""

from kalmannorm.layers.base import KalmanNormBase, KalmanStatistics
from kalmannorm.layers.batch_kalman import (
    BatchKalmanNorm,
    BatchKalmanNorm1d,
    BatchKalmanNorm2d,
    BatchKalmanNorm3d,
)
from kalmannorm.layers.batch_renorm import (
    BatchRenorm,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
)
from kalmannorm.layers.cross_iteration import (
    CrossIterationBatchNorm,
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    CrossIterationBatchNorm3d,
    CrossIterationStatistics,
    link_cross_iteration,
)
from kalmannorm.layers.evonorm import EvoNormS0
from kalmannorm.layers.filter_response import FilterResponseNorm
from kalmannorm.layers.ghost_batch import (
    GhostBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
)
from kalmannorm.layers.group_kalman import GroupKalmanNorm
from kalmannorm.layers.layer_norm import ChannelLayerNorm
from kalmannorm.layers.moving_average_batch import (
    MovingAverageBatchNorm,
    MovingAverageBatchNorm1d,
    MovingAverageBatchNorm2d,
    MovingAverageBatchNorm3d,
)

__all__ = [
    "BatchKalmanNorm",
    "BatchKalmanNorm1d",
    "BatchKalmanNorm2d",
    "BatchKalmanNorm3d",
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "ChannelLayerNorm",
    "CrossIterationBatchNorm",
    "CrossIterationBatchNorm1d",
    "CrossIterationBatchNorm2d",
    "CrossIterationBatchNorm3d",
    "CrossIterationStatistics",
    "EvoNormS0",
    "FilterResponseNorm",
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GroupKalmanNorm",
    "KalmanNormBase",
    "KalmanStatistics",
    "MovingAverageBatchNorm",
    "MovingAverageBatchNorm1d",
    "MovingAverageBatchNorm2d",
    "MovingAverageBatchNorm3d",
    "link_cross_iteration",
]
