import dataclasses
import itertools
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kalmannorm.lab.train import TrainConfig
from kalmannorm.layers.base import KalmanNormBase


def tiny(out: Path, **changes) -> TrainConfig:
    """A run of a few seconds on scikit-learn's digits."""
    values = dict(
        dataset="digits",
        model="small_cnn",
        model_options={"width": 8},
        norm="bkn",
        stat_batch_size=2,
        batch_size=16,
        steps=12,
        eval_every=6,
        lr=0.05,
        threads=1,
        progress="none",
        out=str(out),
    )
    return dataclasses.replace(TrainConfig(), **{**values, **changes})


def conv_bn_stack(widths=(3, 4, 5, 2), dtype=torch.float64) -> nn.Sequential:
    """conv-BN pairs with the given channel widths (first entry: input channels)."""
    layers: list[nn.Module] = []
    for c_in, c_out in itertools.pairwise(widths):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def randomize_kalman(model: nn.Module, seed: int = 0, affine: bool = True) -> None:
    """Give every Kalman parameter a non-trivial value (A != 0, R != 1, q != default)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, KalmanNormBase) and layer.gain is not None:
                if layer.gain_logit is not None:
                    layer.gain_logit.copy_(torch.randn(layer.gain_logit.shape, generator=g))
                if layer.noise_raw is not None:
                    layer.noise_raw.copy_(torch.randn(layer.noise_raw.shape, generator=g))
                if layer.transition is not None:
                    layer.transition.copy_(torch.randn(layer.transition.shape, generator=g))
                if affine and getattr(layer, "weight", None) is not None:
                    layer.weight.copy_(torch.rand(layer.weight.shape, generator=g) + 0.5)
                    layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One CPU thread for the whole suite: the tests check behaviour, and on a loaded machine
    more threads than free cores make small CPU kernels many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _write_cifar(folder: Path, files: list[str], label_key: str, per_file: int) -> None:
    """CIFAR python-format batch files: random images, the file's index in the red channel's
    top-left pixel and 200 in the green one's, labels (file index + i) % 7."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index, name in enumerate(files):
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        data[:, 0] = index  # red channel, top-left pixel: which file the image came from
        data[:, 1024] = 200  # green channel, top-left pixel
        entry = {"data": data, label_key: [(index + i) % 7 for i in range(per_file)]}
        with open(folder / name, "wb") as handle:
            pickle.dump(entry, handle)


@pytest.fixture
def write_cifar():
    """Writes CIFAR files in the official python format (see :func:`_write_cifar`)."""
    return _write_cifar
