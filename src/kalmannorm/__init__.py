"""kalmannorm: Batch Kalman Normalization and the tools to train with micro-batches.

Quick use::

    import kalmannorm
    model = kalmannorm.convert_norm(model, "bkn", stat_batch_size=2)
"""

from kalmannorm.chain import ChainOrderError, KalmanChain, Posterior, link_chain
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
    GroupKalmanNorm,
    KalmanNormBase,
    KalmanStatistics,
)

__version__ = "0.1.0"

__all__ = [
    "BatchKalmanNorm",
    "BatchKalmanNorm1d",
    "BatchKalmanNorm2d",
    "BatchKalmanNorm3d",
    "ChainOrderError",
    "GroupKalmanNorm",
    "KalmanChain",
    "KalmanNormBase",
    "KalmanStatistics",
    "Posterior",
    "available_norms",
    "build_norm",
    "convert_norm",
    "find_chain",
    "fold",
    "kalman_statistics",
    "link_chain",
    "register_norm",
    "set_eval_statistics",
]
