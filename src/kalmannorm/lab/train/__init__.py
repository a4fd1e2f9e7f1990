"""The training harness: ``kalmannorm train`` (one run) and ``kalmannorm compare`` (a grid).

- :mod:`~kalmannorm.lab.train.config`: the run configuration, TOML in and out.
- :mod:`~kalmannorm.lab.train.plan`: how a gradient batch splits into processes, passes, groups.
- :mod:`~kalmannorm.lab.train.model`: the model with its norms converted.
- :mod:`~kalmannorm.lab.train.loop`: the training loop.
- :mod:`~kalmannorm.lab.train.evaluate`: accuracy with moving and with batch statistics.
- :mod:`~kalmannorm.lab.train.batch_mode`: a model run with statistics-group batch statistics.
- :mod:`~kalmannorm.lab.train.checkpoint`: atomic, exactly resumable checkpoints, and their
  loader (the one :mod:`kalmannorm.lab.analysis` reads run folders with).
- :mod:`~kalmannorm.lab.train.distributed`: torchrun data parallelism.
- :mod:`~kalmannorm.lab.train.metrics`: metrics file, TensorBoard, progress.
- :mod:`~kalmannorm.lab.train.compare`: grids of runs and their summary table and curves.
"""

from kalmannorm.lab.train.checkpoint import CheckpointMismatchError
from kalmannorm.lab.train.config import TrainConfig, config_from_dict, load_config, save_config
from kalmannorm.lab.train.evaluate import evaluate
from kalmannorm.lab.train.loop import check_config, train
from kalmannorm.lab.train.plan import BatchPlan, ConfigError, plan_batches

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
