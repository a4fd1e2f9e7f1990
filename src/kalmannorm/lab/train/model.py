"""The run's model: a registered (or torchvision) model with its BatchNorms converted."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

import kalmannorm
from kalmannorm.lab.data import load_dataset
from kalmannorm.lab.data.holdout import HoldoutData
from kalmannorm.lab.models import TORCHVISION_PREFIX, available_models, build_model
from kalmannorm.lab.train.plan import ConfigError

if TYPE_CHECKING:
    from kalmannorm.lab.train.config import TrainConfig

#: ``--norm none``: keep the model's plain BatchNorm layers.
NO_CONVERSION = "none"


def valid_norms() -> list[str]:
    return [NO_CONVERSION, *kalmannorm.available_norms()]


def check_names(dataset: str, model: str, norm: str) -> None:
    """Refuse unknown data set, model and norm names, listing the valid ones."""
    from kalmannorm.lab.data import DATASETS

    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; available datasets: {', '.join(DATASETS)}")
    if not model.startswith(TORCHVISION_PREFIX) and model not in available_models():
        raise ConfigError(
            f"unknown model {model!r}; available models: {', '.join(available_models())}, or "
            f"{TORCHVISION_PREFIX}<name> for a torchvision classification model"
        )
    if norm not in valid_norms():
        raise ConfigError(f"unknown norm {norm!r}; available norms: {', '.join(valid_norms())}")


def takes_stat_batch_size(norm: str) -> bool:
    """Whether the registered norm has batch statistics (takes ``stat_batch_size``)."""
    return kalmannorm.norm_spec(norm).batch_statistics


def build_run_model(
    name: str,
    num_classes: int,
    in_channels: int,
    image_size: tuple[int, int],
    *,
    norm: str,
    stat_batch_size: int | None,
    model_options: dict,
    norm_options: dict,
) -> nn.Module:
    """Build ``name`` and convert its BatchNorms to ``norm`` (statistics groups of
    ``stat_batch_size`` where the norm takes them), chain linked in traced execution order."""
    try:
        model = build_model(name, num_classes, in_channels, **model_options)
    except (TypeError, ValueError, RuntimeError, ImportError) as error:
        if isinstance(error, (ValueError, ImportError)) and name.startswith(TORCHVISION_PREFIX):
            raise ConfigError(_first_line(error)) from error  # no such model, no torchvision
        if not model_options:  # nothing of the user's in the call: a bug, with its traceback
            raise
        raise ConfigError(
            f"model {name!r} does not accept the options {model_options} "
            f"(--model-option): {_first_line(error)}"
        ) from error
    if norm == NO_CONVERSION:
        if norm_options:
            raise ConfigError("--norm none keeps plain BatchNorm: norm options are not used")
        return model
    options = dict(norm_options)
    if stat_batch_size is not None and takes_stat_batch_size(norm):
        options["stat_batch_size"] = stat_batch_size
    group = options.get("stat_batch_size") or 2
    example = torch.zeros(group, in_channels, *image_size)
    copied = sorted(set(norm_options) & _COPIED_FROM_BATCHNORM)
    if copied and not takes_own(norm, copied):
        raise ConfigError(
            f"norm option(s) {copied}: the converted layers take these from the model's "
            f"BatchNorm layers; leave them out of --norm-option"
        )
    try:
        return kalmannorm.convert_norm(model, norm, example_input=example, **options)
    except (TypeError, ValueError) as error:  # the library's refusal of an option or value
        if not norm_options:  # nothing of the user's in the call: a bug, with its traceback
            raise
        raise ConfigError(
            f"norm {norm!r} with the options {norm_options} (--norm-option): {_first_line(error)}"
        ) from error


#: What ``convert_norm`` copies from each BatchNorm it replaces.
_COPIED_FROM_BATCHNORM = frozenset({"eps", "momentum", "affine", "track_running_stats"})


def takes_own(norm: str, keys: list[str]) -> bool:
    """Whether the registered norm takes ``keys`` itself rather than from the BatchNorm it
    replaces (only ``eps``, for a norm that declares its own: FRN)."""
    return all(key == "eps" and kalmannorm.norm_spec(norm).own_eps for key in keys)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load_run_data(config: TrainConfig):
    """The run's data set, cut to its configured subsets; with ``holdout``, the training set
    split into a training part and a held-out evaluation part (the test set is not read)."""
    data = load_dataset(config.dataset, config.data_dir, config.download, config.num_workers)
    if config.train_subset or config.test_subset:
        data = data.subset(config.train_subset, config.test_subset)
    if config.holdout:
        if data.train_size < 2:
            raise ConfigError(f"holdout needs at least 2 training images, got {data.train_size}")
        data = HoldoutData(data, config.holdout)
    return data


def build_model_for(config: TrainConfig, data) -> nn.Module:
    """The run's model for ``data`` (classes, channels, image size), converted to its norm,
    its convolutions' weights centred where the run asks (``center_weights``), its Kalman layers'
    small steps compiled where it asks (``compile_steps``)."""
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
    if config.center_weights:
        try:
            kalmannorm.center_conv_weights(model, layers="all")
        except TypeError as error:  # a convolution of another class than torch's
            raise ConfigError(f"center_weights: {_first_line(error)}") from error
    if config.compile_steps:
        try:
            kalmannorm.compile_kalman_steps(model)
        except ValueError as error:  # no Kalman layer
            raise ConfigError(f"compile_steps: {_first_line(error)}") from error
    return model
