"""kalmannorm: Batch Kalman Normalization and the tools to train with micro-batches.

Quick use::

    import kalmannorm
    model = kalmannorm.convert_norm(model, "bkn", stat_batch_size=2)
"""

from kalmannorm.chain import (
    ChainOrderError,
    KalmanChain,
    Posterior,
    find_feeding_layers,
    link_chain,
)
from kalmannorm.convert import (
    available_norms,
    build_norm,
    convert_norm,
    find_chain,
    kalman_statistics,
    register_norm,
    set_eval_statistics,
)
from kalmannorm.fold import fold
from kalmannorm.layers import (
    BatchKalmanNorm,
    BatchKalmanNorm1d,
    BatchKalmanNorm2d,
    BatchKalmanNorm3d,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    ChannelLayerNorm,
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    CrossIterationBatchNorm3d,
    EvoNormS0,
    FilterResponseNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    GroupKalmanNorm,
    KalmanNormBase,
    KalmanStatistics,
    link_cross_iteration,
)
from kalmannorm.optim import kalman_parameters, parameter_groups

__version__ = "0.1.0"

__all__ = [
    "BatchKalmanNorm",
    "BatchKalmanNorm1d",
    "BatchKalmanNorm2d",
    "BatchKalmanNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "ChainOrderError",
    "ChannelLayerNorm",
    "CrossIterationBatchNorm1d",
    "CrossIterationBatchNorm2d",
    "CrossIterationBatchNorm3d",
    "EvoNormS0",
    "FilterResponseNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GroupKalmanNorm",
    "KalmanChain",
    "KalmanNormBase",
    "KalmanStatistics",
    "Posterior",
    "available_norms",
    "build_norm",
    "convert_norm",
    "find_chain",
    "find_feeding_layers",
    "fold",
    "kalman_parameters",
    "kalman_statistics",
    "link_chain",
    "link_cross_iteration",
    "parameter_groups",
    "register_norm",
    "set_eval_statistics",
]
