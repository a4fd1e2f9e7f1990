"""One training step of the residual recipe's preact ResNet-20, MABN against ghost BN.

Both at statistics groups of 2, gradient batch 128, 28x28 single-channel input, SGD with
momentum, one torch thread. Rounds alternate which model goes first; each round times
``STEPS`` steps of each; printed: the median seconds per step and the median per-round ratio.

    python experiments/mabn_step.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

import kalmannorm
from kalmannorm.lab.models import build_model

ROUNDS, STEPS, WARMUP = 5, 3, 2


def step_function(norm: str, **options) -> Callable[[], None]:
    torch.manual_seed(0)
    model = build_model("preact_resnet20", num_classes=10, in_channels=1)
    model = kalmannorm.convert_norm(model, norm, stat_batch_size=2, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(WARMUP):
        step()
    return step


def timed(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    return (time.perf_counter() - start) / STEPS


def main() -> None:
    torch.set_num_threads(1)
    ghost = step_function("bn")
    mabn = step_function("mabn", window_size=4, warmup_steps=0, renorm_start=0)
    times: dict[str, list[float]] = {"ghost BN": [], "MABN": []}
    for round_index in range(ROUNDS):
        order = [("ghost BN", ghost), ("MABN", mabn)]
        for label, step in order if round_index % 2 == 0 else order[::-1]:
            times[label].append(timed(step))
    ratios = [m / g for m, g in zip(times["MABN"], times["ghost BN"])]
    for label, values in times.items():
        print(f"{label}: {statistics.median(values):.3f} s per step")
    print(f"MABN / ghost BN: {statistics.median(ratios):.2f}x (median over {ROUNDS} rounds)")


if __name__ == "__main__":
    main()
