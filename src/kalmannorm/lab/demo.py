"""A short, real demonstration: BN vs BKN with statistics groups of 2 on handwritten digits.

Converts a small CNN, trains it a few hundred steps on scikit-learn's digits (real 8x8 images),
evaluates with moving and with batch statistics, and prints what the Kalman layers estimated in
their last training step: batch, prior and posterior variances and the learned gain.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import kalmannorm
from kalmannorm.lab.accuracy import count_correct
from kalmannorm.lab.data import load_digits_split
from kalmannorm.lab.models import SmallCNN


@dataclass
class DemoResult:
    name: str
    accuracy_moving: float
    accuracy_batch: float
    seconds: float


def _accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    usable = len(y) - len(y) % batch_size
    batches = ((x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, usable, batch_size))
    correct, count = count_correct(model, batches, x.device)
    return correct / count


def train(
    model: nn.Module,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    steps: int,
    batch_size: int,
    stat_batch_size: int,
    seed: int,
) -> tuple[float, float]:
    """SGD with momentum and a cosine schedule; returns test accuracy (moving, batch statistics)."""
    train_x, train_y, test_x, test_y = data
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(train_y), (batch_size,), generator=generator)
        loss = nn.functional.cross_entropy(model(train_x[batch]), train_y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    moving = _accuracy(model, test_x, test_y, batch_size)
    kalmannorm.set_eval_statistics(model, "batch")
    batch = _accuracy(_grouped_batchnorm_eval(model, stat_batch_size), test_x, test_y, batch_size)
    kalmannorm.set_eval_statistics(model, "moving")
    return moving, batch


def _grouped_batchnorm_eval(model: nn.Module, stat_batch_size: int) -> nn.Module:
    """For a plain BN model, batch-statistics evaluation means BN in training mode without
    updating its moving averages; groups of the training statistics-batch size need BKN with
    q = 1, which is exactly BN per group."""
    if kalmannorm.find_chain(model) is not None:
        return model
    grouped = kalmannorm.convert_norm(
        copy.deepcopy(model), "bkn", stat_batch_size=stat_batch_size, gain=1.0, learn_gain=False
    )
    return kalmannorm.set_eval_statistics(grouped, "batch") or grouped.eval()


def format_statistics(model: nn.Module) -> str:
    """A table of the last training step's statistics, averaged over groups and channels."""
    rows = [f"{'layer':<22}{'batch var':>11}{'prior var':>11}{'post var':>11}{'gain q':>9}"]
    for name, stats in kalmannorm.kalman_statistics(model).items():
        prior = "-" if stats.prior_var is None else f"{stats.prior_var.mean():.4f}"
        rows.append(
            f"{name:<22}{stats.batch_var.mean():>11.4f}{prior:>11}"
            f"{stats.posterior_var.mean():>11.4f}{stats.gain.mean():>9.3f}"
        )
    return "\n".join(rows)


def run_demo(
    steps: int = 300, batch_size: int = 32, stat_batch_size: int = 2, seed: int = 0
) -> list[DemoResult]:
    """Train BN (whole batch), BN in groups of ``stat_batch_size`` and BKN; print a comparison.

    Batch-statistics accuracy uses test groups of each run's own training statistics-batch size.
    """
    torch.manual_seed(seed)
    data = load_digits_split(seed=seed)
    print(
        f"digits: {len(data[1])} train / {len(data[3])} test images (8x8), {steps} steps of "
        f"batch {batch_size}, statistics groups of {stat_batch_size}"
    )
    base = SmallCNN(in_channels=1, num_classes=10, width=16)
    small = stat_batch_size
    runs = {
        f"BN  (stat batch {batch_size})": (copy.deepcopy(base), batch_size),
        f"BN  (stat batch {small})": (
            kalmannorm.convert_norm(
                copy.deepcopy(base), "bkn", stat_batch_size=small, gain=1.0, learn_gain=False
            ),
            small,
        ),
        f"BKN (stat batch {small})": (
            kalmannorm.convert_norm(copy.deepcopy(base), "bkn", stat_batch_size=small),
            small,
        ),
    }
    results = []
    for name, (model, groups) in runs.items():
        start = time.perf_counter()
        torch.manual_seed(seed)
        moving, batch = train(
            model, data, steps=steps, batch_size=batch_size, stat_batch_size=groups, seed=seed
        )
        results.append(DemoResult(name, moving, batch, time.perf_counter() - start))
    print(f"\n{'norm':<24}{'acc (moving)':>14}{'acc (batch)':>13}{'time':>8}")
    for r in results:
        print(f"{r.name:<24}{r.accuracy_moving:>14.3f}{r.accuracy_batch:>13.3f}{r.seconds:>7.1f}s")
    print(
        "\nWhat the BKN layers estimated in their last training step (means over groups, channels):"
    )
    print(format_statistics(runs[f"BKN (stat batch {small})"][0]))
    return results
