"""A finished (or checkpointed) ``kalmannorm train`` run folder, loaded for analysis."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from kalmannorm.lab.errors import UserError
from kalmannorm.lab.train.checkpoint import load_checkpoint
from kalmannorm.lab.train.config import TrainConfig, load_config
from kalmannorm.lab.train.loop import CHECKPOINT, CONFIG
from kalmannorm.lab.train.model import build_model_for, load_run_data


class RunNotFoundError(UserError, FileNotFoundError):
    """The folder is not (yet) a ``kalmannorm train`` run folder."""


@dataclass
class LoadedRun:
    """The run's configuration, its trained model (eval mode) and its data set."""

    config: TrainConfig
    model: nn.Module
    data: object
    step: int


def load_run(folder: str | Path) -> LoadedRun:
    """Rebuild the run's model as ``kalmannorm train`` built it and load its last checkpoint.

    Raises:
        RunNotFoundError: the folder holds no ``config.toml`` or ``checkpoint.pt`` (with the
            paths it looked for).
        CheckpointCorruptError: ``checkpoint.pt`` does not read or fails its checksum (read
            with :func:`kalmannorm.lab.train.checkpoint.load_checkpoint`, as ``train`` resumes).
    """
    folder = Path(folder)
    config_path, checkpoint_path = folder / CONFIG, folder / CHECKPOINT
    for path in (config_path, checkpoint_path):
        if not path.is_file():
            raise RunNotFoundError(
                f"{path} not found: pass the --out folder of a `kalmannorm train` run"
            )
    config = load_config(config_path)
    data = load_run_data(config)
    model = build_model_for(config, data)
    checkpoint = load_checkpoint(checkpoint_path)
    model.load_state_dict(checkpoint["model"])
    return LoadedRun(config, model.eval(), data, int(checkpoint["step"]))
