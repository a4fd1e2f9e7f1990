"""Normalization layers, one file per norm."""

from kalmannorm.layers.base import KalmanNormBase, KalmanStatistics
from kalmannorm.layers.batch_kalman import (
    BatchKalmanNorm,
    BatchKalmanNorm1d,
    BatchKalmanNorm2d,
    BatchKalmanNorm3d,
)
from kalmannorm.layers.group_kalman import GroupKalmanNorm

__all__ = [
    "BatchKalmanNorm",
    "BatchKalmanNorm1d",
    "BatchKalmanNorm2d",
    "BatchKalmanNorm3d",
    "GroupKalmanNorm",
    "KalmanNormBase",
    "KalmanStatistics",
]
