"""The configuration of one training run: one dataclass, read from and written to TOML.

Every field is also a command-line option (``batch_size`` <-> ``--batch-size``; the two
``*_options`` tables are ``--norm-option KEY=VALUE`` / ``--model-option KEY=VALUE``, repeated).
Values are layered: the defaults below, then a TOML file (``--config``), then the options given
on the command line. The resolved configuration is saved as ``config.toml`` beside the results,
and its *fingerprint* (every key that changes what is computed) is stored in each checkpoint so
a run is never resumed under another configuration.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kalmannorm.lab.train.plan import ConfigError


def _option(default: Any, help: str) -> Any:
    """A field with a default and its command-line help."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """One training run. See ``kalmannorm train --help`` for the meaning of each key."""

    # data
    dataset: str = _option("fashion_mnist", "data set name (see `kalmannorm train --list`)")
    data_dir: str | None = _option(None, "folder with the data set files (default: see docs)")
    download: bool = _option(False, "fetch the data set with torchvision if it is not found")
    train_subset: int | None = _option(None, "train on this many images (a fixed subset)")
    test_subset: int | None = _option(None, "evaluate on this many test images (a fixed subset)")
    holdout: float = _option(
        0.0,
        "evaluate on this fraction of the training set, held out of training (the same images "
        "for every run), instead of the test set, which is then not read (0: off)",
    )
    augment: bool = _option(True, "the data set's standard augmentation (pad-crop, flip)")
    # model and normalization
    model: str = _option("small_cnn", "model name, or tv:<name> for a torchvision model")
    model_options: dict = field(
        default_factory=dict, metadata={"help": "model constructor options (KEY=VALUE)"}
    )
    norm: str = _option("none", "norm to convert BatchNorm to; 'none' keeps plain BatchNorm")
    norm_options: dict = field(
        default_factory=dict, metadata={"help": "norm options (KEY=VALUE, e.g. gain=0.9)"}
    )
    center_weights: bool = _option(
        False,
        "MABN's weight centring: every convolution uses its weight minus the mean over its "
        "fan-in (kalmannorm.center_conv_weights, layers='all', as the MABN paper's ResNet)",
    )
    compile_steps: bool = _option(
        False,
        "compile each Kalman layer's small step in the eager model "
        "(kalmannorm.compile_kalman_steps): the same training within rounding, fewer calls per "
        "step; compiles on the first step",
    )
    batch_size: int = _option(128, "gradient batch: samples per optimizer step, all processes")
    stat_batch_size: int | None = _option(
        None, "statistics batch: samples per normalization group (default: the forward batch)"
    )
    accumulation_steps: int = _option(1, "split each process's batch into this many passes")
    # schedule
    epochs: int = _option(1, "epochs to train (ignored when --steps is given)")
    steps: int | None = _option(None, "optimizer steps to train")
    lr: float = _option(0.1, "peak learning rate")
    momentum: float = _option(0.9, "SGD momentum")
    nesterov: bool = _option(False, "Nesterov momentum")
    weight_decay: float = _option(5e-4, "SGD weight decay (all parameters)")
    kalman_lr_scale: float = _option(
        1.0, "learning-rate multiplier for the Kalman parameters q, R, A (kalmannorm.optim)"
    )
    kalman_weight_decay: float | None = _option(
        None, "weight decay of the Kalman parameters q, R, A (default: weight_decay)"
    )
    schedule: str = _option("cosine", "learning-rate schedule: cosine, step or constant")
    milestones: list = field(
        default_factory=lambda: [0.5, 0.75],
        metadata={"help": "step schedule: fractions of training to decay at"},
    )
    gamma: float = _option(0.1, "step schedule: decay factor at each milestone")
    warmup_steps: int = _option(0, "linear learning-rate warm-up steps")
    seed: int = _option(0, "seed of initialisation, data order and augmentation")
    # evaluation and output
    eval_every: int = _option(0, "evaluate every N steps (0: once per epoch) and at the end")
    eval_batch_size: int = _option(1000, "test batch for moving-statistics evaluation")
    precise_bn_batches: int = _option(
        0,
        "also evaluate after PreciseBN (kalmannorm.update_bn) over this many training forward "
        "batches (test_acc_precise; 0: off)",
    )
    checkpoint_every: int = _option(0, "also checkpoint every N steps (0: at evaluations)")
    out: str = _option("runs/train", "output folder of the run")
    # execution
    device: str = _option("cpu", "cpu, cuda, cuda:1, ... (torchrun: cuda picks the local GPU)")
    threads: int | None = _option(None, "CPU threads for torch (default: torch's choice)")
    num_workers: int = _option(4, "data-loading processes (image folders only)")
    progress: str = _option("auto", "auto (bar on a terminal), bar, log or none")


#: Keys that do not change what a run computes: free to differ when a run is resumed.
RUNTIME_KEYS = frozenset(
    {
        "data_dir",
        "download",
        "eval_batch_size",
        "precise_bn_batches",
        "checkpoint_every",
        "out",
        "device",
        "threads",
        "num_workers",
        "progress",
        "compile_steps",
    }
)

SCHEDULES = ("cosine", "step", "constant")
PROGRESS = ("auto", "bar", "log", "none")


def config_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def field_types() -> dict[str, Any]:
    """Each key's type annotation, resolved."""
    return typing.get_type_hints(TrainConfig)


def config_from_dict(values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """``base`` (default: the defaults) with ``values`` on top; unknown keys are refused."""
    unknown = sorted(set(values) - set(config_keys()))
    if unknown:
        raise ConfigError(
            f"unknown configuration key(s) {', '.join(unknown)}; valid keys: "
            f"{', '.join(config_keys())}"
        )
    merged = dataclasses.asdict(base or TrainConfig())
    for key, value in values.items():
        if key.endswith("_options"):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{key} is a table of constructor options (e.g. {key} = {{gain = 0.9}}, or "
                    f"--{key.removesuffix('_options')}-option KEY=VALUE), got {value!r}"
                )
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return check_types(TrainConfig(**merged))


def check_types(config: TrainConfig) -> TrainConfig:
    """Refuse values of the wrong type (a float where an int belongs, ...), naming the key."""
    for key, hint in field_types().items():
        value = getattr(config, key)
        allowed = typing.get_args(hint) or (hint,)
        allowed = tuple(typing.get_origin(a) or a for a in allowed)
        if type(None) in allowed and value is None:
            continue
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            setattr(config, key, float(value))
            continue
        if isinstance(value, bool) and bool not in allowed:
            raise ConfigError(f"{key} must be {_describe(hint)}, got {value!r}")
        if not isinstance(value, tuple(a for a in allowed if a is not type(None))):
            raise ConfigError(f"{key} must be {_describe(hint)}, got {value!r}")
    return config


def check_values(config: TrainConfig) -> None:
    """Refuse values no run can use (a negative count, a NaN rate, an unknown choice), naming
    the key and what it takes; the types are :func:`check_types`'s."""
    check_types(config)

    def refuse(key: str, takes: str) -> None:
        raise ConfigError(f"{key} must be {takes}, got {getattr(config, key)!r}")

    for key in ("batch_size", "accumulation_steps", "epochs", "eval_batch_size"):
        if getattr(config, key) < 1:
            refuse(key, "a positive integer")
    for key in ("steps", "stat_batch_size", "train_subset", "test_subset", "threads"):
        if getattr(config, key) is not None and getattr(config, key) < 1:
            refuse(key, "a positive integer (or unset)")
    if config.threads is not None and config.threads > MAX_THREADS:
        refuse("threads", f"at most {MAX_THREADS} (this machine has {os.cpu_count()} CPU cores)")
    for key in ("warmup_steps", "eval_every", "checkpoint_every", "precise_bn_batches"):
        if getattr(config, key) < 0:
            refuse(key, "a non-negative integer (0: " + _ZERO_MEANS[key] + ")")
    if config.num_workers < 0:
        refuse("num_workers", "a non-negative integer")
    if not 0 <= config.seed < 2**32:
        refuse("seed", "an integer in [0, 2**32)")
    if not (math.isfinite(config.holdout) and 0 <= config.holdout < 1):
        refuse("holdout", "a fraction of the training set in [0, 1) (0: evaluate on the test set)")
    if config.holdout and config.test_subset is not None:
        raise ConfigError(
            "test_subset has no effect with holdout (the test set is not read); leave it out"
        )
    if not (math.isfinite(config.lr) and config.lr > 0):
        refuse("lr", "a positive finite number")
    if not 0 <= config.momentum < 1:
        refuse("momentum", "in [0, 1)")
    if config.nesterov and config.momentum == 0:
        raise ConfigError("nesterov needs a momentum: give --momentum > 0, or --no-nesterov")
    for key in ("weight_decay", "kalman_weight_decay"):
        value = getattr(config, key)
        if value is not None and not (math.isfinite(value) and value >= 0):
            refuse(key, "a non-negative finite number")
    if not (math.isfinite(config.kalman_lr_scale) and config.kalman_lr_scale > 0):
        refuse("kalman_lr_scale", "a positive finite number (kalmannorm.parameter_groups)")
    if config.schedule not in SCHEDULES:
        raise ConfigError(
            f"unknown schedule {config.schedule!r}; use one of {', '.join(SCHEDULES)}"
        )
    if not 0 < config.gamma <= 1:
        refuse("gamma", "a decay factor in (0, 1]")
    if not all(isinstance(m, (int, float)) and not isinstance(m, bool) for m in config.milestones):
        refuse("milestones", "a list of fractions of training")
    if any(not 0 < m <= 1 for m in config.milestones):
        raise ConfigError(
            f"milestones are fractions of training in (0, 1], got {config.milestones}"
        )
    if config.progress not in PROGRESS:
        raise ConfigError(f"progress must be one of {', '.join(PROGRESS)}, got {config.progress!r}")
    for key in ("out", "data_dir", "device", "dataset", "model"):
        if getattr(config, key) is not None and not getattr(config, key).strip():
            refuse(key, "a non-empty string")


#: More threads than this fail to start (libgomp aborts the process when thread creation fails).
MAX_THREADS = 1024

_ZERO_MEANS = {
    "warmup_steps": "no warm-up",
    "eval_every": "once per epoch",
    "checkpoint_every": "at evaluations",
    "precise_bn_batches": "off",
}


def _describe(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def fingerprint(config: TrainConfig) -> dict[str, Any]:
    """The keys that define what a run computes (everything but :data:`RUNTIME_KEYS`)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in RUNTIME_KEYS}


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: saved -> current"`` for every key whose value differs."""
    keys = sorted(set(saved) | set(current))
    missing = object()
    return [
        f"{k}: {saved.get(k, missing)!r} -> {current.get(k, missing)!r}".replace(
            repr(missing), "(absent)"
        )
        for k in keys
        if saved.get(k, missing) != current.get(k, missing)
    ]


# -- TOML -------------------------------------------------------------------------------------


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, naming the file in any syntax error."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder; give a TOML file") from None
    except OSError as error:
        raise ConfigError(f"config file {path} cannot be read: {error.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None


def load_config(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    """A TrainConfig from a TOML file of its keys (a ``[compare]`` table, if any, is ignored)."""
    values = load_toml(path)
    values.pop("compare", None)
    values = values.get("train", values)
    return config_from_dict(values, base)


def save_config(config: TrainConfig, path: str | Path, header: str = "") -> None:
    """Write ``config`` as TOML (keys whose value is None are left out: they mean "default")."""
    text = f"# {header}\n" if header else ""
    Path(path).write_text(text + to_toml(dataclasses.asdict(config)))


def to_toml(values: dict[str, Any]) -> str:
    """A small TOML writer for flat keys plus one level of tables (enough for our configs)."""
    scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in values.items() if isinstance(v, dict)}
    lines = [f"{_key(k)} = {toml_value(v)}" for k, v in scalars.items() if v is not None]
    for name, table in tables.items():
        lines += ["", f"[{_key(name)}]"]
        lines += [f"{_key(k)} = {toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    """One value in TOML syntax: strings, booleans, numbers, arrays and inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_key(k)} = {toml_value(v)}" for k, v in value.items() if v is not None)
        return "{" + items + "}"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as TOML")


def _key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)


def parse_value(text: str) -> Any:
    """A command-line value as TOML (``0.9``, ``true``, ``[1, 2]``), else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
