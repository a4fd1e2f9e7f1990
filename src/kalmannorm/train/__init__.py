"""The training harness: ``kalmannorm train`` (one run) and ``kalmannorm compare`` (a grid).

- :mod:`~kalmannorm.train.config`: the run configuration, TOML in and out.
- :mod:`~kalmannorm.train.plan`: how a gradient batch splits into processes, passes, groups.
- :mod:`~kalmannorm.train.model`: the model with its norms converted.
- :mod:`~kalmannorm.train.loop`: the training loop.
- :mod:`~kalmannorm.train.evaluate`: accuracy with moving and with batch statistics.
- :mod:`~kalmannorm.train.checkpoint`: atomic, exactly resumable checkpoints.
- :mod:`~kalmannorm.train.distributed`: torchrun data parallelism.
- :mod:`~kalmannorm.train.metrics`: metrics file, TensorBoard, progress.
- :mod:`~kalmannorm.train.compare`: grids of runs and their summary table and curves.
"""

from kalmannorm.train.checkpoint import CheckpointMismatchError
from kalmannorm.train.config import TrainConfig, config_from_dict, load_config, save_config
from kalmannorm.train.evaluate import evaluate
from kalmannorm.train.loop import check_config, train
from kalmannorm.train.plan import BatchPlan, ConfigError, plan_batches

__all__ = [
    "BatchPlan",
    "CheckpointMismatchError",
    "ConfigError",
    "TrainConfig",
    "check_config",
    "config_from_dict",
    "evaluate",
    "load_config",
    "plan_batches",
    "save_config",
    "train",
]
