"""kalmannorm: Batch Kalman Normalization and the tools to train with micro-batches.

Quick use::

    import kalmannorm
    model = kalmannorm.convert_norm(model, "bkn-flow", stat_batch_size=2)
    kalmannorm.center_conv_weights(model, layers="all")  # the best configuration measured

This namespace holds what a user constructs and calls; the baselines are in
:mod:`kalmannorm.baselines`; internals stay in their modules (:mod:`kalmannorm.chain`,
:mod:`kalmannorm.layers`). The training harness, analysis and CLI are the lab,
:mod:`kalmannorm.lab`, which uses the library and is never imported by it.
"""

import sys as _sys

from kalmannorm.chain import ChainOrderError, link_chain
from kalmannorm.compiled_step import compile_kalman_steps
from kalmannorm.convert import (
    available_norms,
    build_norm,
    convert_norm,
    find_chain,
    kalman_statistics,
    last_conversion,
    norm_spec,
    register_norm,
    set_eval_statistics,
)
from kalmannorm.factories import (
    KalmanNormAct2d,
    NormLayer,
    norm_layer,
    register_mmcv,
    register_timm,
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
from kalmannorm.normact import NormAct
from kalmannorm.optim import kalman_parameters, parameter_groups
from kalmannorm.precise import update_bn

__version__ = "0.1.0"

if "timm" in _sys.modules:  # timm imported first: its norm factories learn the names now
    register_timm()

__all__ = [
    "BatchKalmanNorm1d",
    "BatchKalmanNorm2d",
    "BatchKalmanNorm3d",
    "ChainOrderError",
    "GroupKalmanNorm",
    "KalmanNormAct2d",
    "KalmanStatistics",
    "NormAct",
    "NormLayer",
    "available_norms",
    "build_norm",
    "center_conv_weights",
    "compile_kalman_steps",
    "convert_norm",
    "find_chain",
    "fold",
    "kalman_parameters",
    "kalman_statistics",
    "last_conversion",
    "link_chain",
    "norm_layer",
    "parameter_groups",
    "register_mmcv",
    "norm_spec",
    "register_norm",
    "register_timm",
    "set_eval_statistics",
    "update_bn",
]
