"""Test accuracy with moving versus batch statistics (the paper's Table 3, left).

*Moving*: the model in eval mode as deployed; every norm normalises with its moving averages
(running_mean, running_var), every BKN with ``eval_statistics="moving"``.

*Batch* (the paper's inference option 'A'): each test batch is split into statistics groups of s
consecutive samples, the training statistics-batch size, and each group is normalised with its own
statistics, as in training: BKN with the posterior of the group, BatchNorm with the group's batch
mean and variance (BatchNorm per group, i.e. BKN with q = 1; see
:mod:`kalmannorm.lab.train.batch_mode`). Samples that do not fill a whole group are not scored.

    accuracy = (1/N) sum_i [argmax_j f(x_i)_j = y_i]

Neither evaluation changes the model: buffers, modes and settings are restored.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from kalmannorm.lab.accuracy import count_correct
from kalmannorm.lab.analysis.batches import DataSource, iterate_batches, model_device
from kalmannorm.lab.train.batch_mode import (
    batch_statistics_mode,
    find_norm_layers,
    moving_statistics_mode,
    whole_groups,
)


@dataclass
class EvalModeAccuracy:
    """Accuracies with moving and batch statistics, and how many samples each scored."""

    moving: float
    batch: float
    moving_samples: int
    batch_samples: int
    stat_batch_size: int | None

    def as_row(self) -> dict[str, float | int | None]:
        return {
            "stat_batch_size": self.stat_batch_size,
            "acc_moving": self.moving,
            "acc_batch": self.batch,
            "samples_moving": self.moving_samples,
            "samples_batch": self.batch_samples,
        }


@torch.no_grad()
def accuracy(
    model: nn.Module,
    data: DataSource,
    *,
    batch_size: int = 256,
    multiple_of: int = 1,
    max_samples: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[float, int]:
    """Top-1 accuracy of ``model`` as it is set up, and the number of samples scored."""
    device = model_device(model) if device is None else torch.device(device)
    batches = iterate_batches(data, batch_size, multiple_of=multiple_of, max_samples=max_samples)
    correct, count = count_correct(model, _labelled(batches), device)
    if count == 0:
        raise ValueError("no sample was scored: the data set is empty or smaller than one group")
    return correct / count, count


def _labelled(batches: Iterator) -> Iterator:
    for inputs, labels in batches:
        if labels is None:
            raise ValueError("accuracy needs labels: pass (inputs, labels) batches")
        yield inputs, labels


def eval_mode_accuracy(
    model: nn.Module,
    data: DataSource,
    *,
    stat_batch_size: int | None = None,
    batch_size: int = 256,
    max_samples: int | None = None,
    device: torch.device | str | None = None,
) -> EvalModeAccuracy:
    """Accuracy of ``model`` on ``data`` with moving and with batch statistics.

    Args:
        model: a model with BatchNorm-like or BKN layers (GKN and batch-free norms compute the same
            thing in both modes); not modified.
        data: (inputs, labels) batches (see :mod:`kalmannorm.lab.analysis.batches`).
        stat_batch_size: the training statistics-batch size s; ``None``: each layer's own
            (a BKN's ``stat_batch_size``; a plain BatchNorm takes the whole forward batch).
        batch_size: test samples per forward pass (a multiple of s; with whole-batch groups
            only full batches are scored in batch mode).
        max_samples: score at most this many samples.
        device: where to run (default: the model's device).
    """
    with moving_statistics_mode(model):
        moving, moving_count = accuracy(
            model, data, batch_size=batch_size, max_samples=max_samples, device=device
        )
    multiple = whole_groups(find_norm_layers(model, stat_batch_size), batch_size)
    with batch_statistics_mode(model, stat_batch_size):
        batch, batch_count = accuracy(
            model,
            data,
            batch_size=batch_size,
            multiple_of=multiple,
            max_samples=max_samples,
            device=device,
        )
    return EvalModeAccuracy(moving, batch, moving_count, batch_count, stat_batch_size)
