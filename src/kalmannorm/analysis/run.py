"""A finished (or checkpointed) ``kalmannorm train`` run folder, loaded for analysis."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kalmannorm.data.datasets import load_dataset
from kalmannorm.train.config import TrainConfig, load_config
from kalmannorm.train.loop import CHECKPOINT, CONFIG
from kalmannorm.train.model import build_run_model


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
        FileNotFoundError: the folder holds no ``config.toml`` or ``checkpoint.pt`` (with the
            paths it looked for).
    """
    folder = Path(folder)
    config_path, checkpoint_path = folder / CONFIG, folder / CHECKPOINT
    for path in (config_path, checkpoint_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: pass the --out folder of a `kalmannorm train` run"
            )
    config = load_config(config_path)
    data = load_dataset(config.dataset, config.data_dir, config.download, config.num_workers)
    if config.train_subset or config.test_subset:
        data = data.subset(config.train_subset, config.test_subset)
    model = build_run_model(
        config.model,
        data.num_classes,
        data.in_channels,
        data.image_size,
        norm=config.norm,
        stat_batch_size=config.stat_batch_size,
        model_options=config.model_options,
        norm_options=config.norm_options,
    )
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["model"])
    return LoadedRun(config, model.eval(), data, int(checkpoint["step"]))
