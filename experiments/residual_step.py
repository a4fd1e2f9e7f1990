"""One training step of the residual recipe's preact ResNet-20 for each norm a user picks between.

The recommendation table of docs/results/REPORT.md gives each pick's cost as its step time over
ghost BN's (BatchNorm's kernels with statistics groups: what micro-batch BatchNorm costs).
Every model: gradient batch 128, 28x28 single-channel input, statistics groups of 2, SGD with
momentum, one torch thread, built as the residual budget builds it (MABN and the centred BKN
with every convolution centred). Rounds rotate the order of the models; each round times
``STEPS`` steps of each; a ratio is the median over rounds of the per-round ratio to ghost BN.
Writes the JSON the report reads (``--out``, default docs/results/residual/runs/step_time.json).

    python experiments/residual_step.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

import kalmannorm
from kalmannorm.lab.models import build_model

ROUNDS, STEPS, WARMUP = 6, 3, 2
MABN = {"window_size": 4, "warmup_steps": 0, "renorm_start": 0}
#: report label -> (norm, options, centred convolutions)
NORMS: dict[str, tuple[str | None, dict, bool]] = {
    "none": (None, {}, False),  # plain BatchNorm over the whole batch
    "bn": ("bn", {}, False),
    "gn": ("gn", {}, False),
    "gn-groups": ("gn", {"min_channels_per_group": 2}, False),
    "mabn": ("mabn", MABN, True),
    "bkn-propagate-posterior": ("bkn-flow", {}, False),
    "bkn-flow-centred": ("bkn-flow", {}, True),
}


def step_function(norm: str | None, options: dict, centred: bool) -> Callable[[], None]:
    torch.manual_seed(0)
    model = build_model("preact_resnet20", num_classes=10, in_channels=1)
    if norm is not None:
        grouped = kalmannorm.norm_spec(norm).batch_statistics  # GN: no statistics groups
        options = {**options, "stat_batch_size": 2} if grouped else options
        model = kalmannorm.convert_norm(model, norm, **options)
    if centred:
        kalmannorm.center_conv_weights(model, layers="all")
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/residual/runs/step_time.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = {label: step_function(*spec) for label, spec in NORMS.items()}
    times: dict[str, list[float]] = {label: [] for label in steps}
    order = list(steps)
    for round_index in range(ROUNDS):
        shift = round_index % len(order)
        for label in order[shift:] + order[:shift]:
            times[label].append(timed(steps[label]))
    rows = []
    for label, values in times.items():
        ratios = [t / g for t, g in zip(values, times["bn"])]
        rows.append(
            {
                "label": label,
                "seconds_per_step": statistics.median(values),
                "ratio": statistics.median(ratios),
            }
        )
        print(f"{label:26s} {statistics.median(values):.3f} s/step  {rows[-1]['ratio']:.2f}x")
    result = {
        "what": "preact ResNet-20 training step, batch 128, s = 2, one thread, ratio to ghost BN",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} thread, torch "
        f"{torch.__version__}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "rounds": ROUNDS,
        "steps_per_round": STEPS,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
