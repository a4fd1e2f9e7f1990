"""kalmannorm: Batch Kalman Normalization and the tools to train with micro-batches.

Quick use::

    import kalmannorm
    model = kalmannorm.convert_norm(model, "bkn", stat_batch_size=2)

This namespace holds what a user constructs and calls; the baselines are in
:mod:`kalmannorm.baselines`; internals stay in their modules (:mod:`kalmannorm.chain`,
:mod:`kalmannorm.layers`). The training harness, analysis and CLI are the lab,
:mod:`kalmannorm.lab`, which uses the library and is never imported by it.
"""

from kalmannorm.chain import ChainOrderError, link_chain
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
from kalmannorm.layers.base import KalmanStatistics
from kalmannorm.layers.batch_kalman import (
    BatchKalmanNorm1d,
    BatchKalmanNorm2d,
    BatchKalmanNorm3d,
)
from kalmannorm.layers.group_kalman import GroupKalmanNorm
from kalmannorm.layers.moving_average_batch import center_conv_weights
from kalmannorm.optim import kalman_parameters, parameter_groups
from kalmannorm.precise import update_bn

__version__ = "0.1.0"

__all__ = [
    "BatchKalmanNorm1d",
    "BatchKalmanNorm2d",
    "BatchKalmanNorm3d",
    "ChainOrderError",
    "GroupKalmanNorm",
    "KalmanStatistics",
    "available_norms",
    "build_norm",
    "center_conv_weights",
    "convert_norm",
    "find_chain",
    "fold",
    "kalman_parameters",
    "kalman_statistics",
    "link_chain",
    "parameter_groups",
    "register_norm",
    "set_eval_statistics",
    "update_bn",
]
