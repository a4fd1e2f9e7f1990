"""What compiled small steps (``kalmannorm.compile_kalman_steps``) save at micro-batch sizes.

One training step (forward, cross-entropy, backward, SGD with momentum at learning rate 0, as
``kalmannorm bench``'s micro rows) of torchvision models with BatchNorm over the whole batch, the
same model converted to ``bkn-flow`` (statistics groups of 2), and that model with its small steps
compiled. Printed per model and batch:

- step time over BatchNorm's (all three models timed in the same rounds, the order rotating; the
  median of the per-round ratios);
- kernel calls of one forward + backward (``kalmannorm.lab.bench_micro.kernel_calls``, counted by
  ``torch.profiler``): ATen operations called from Python or from compiled code (not the ones
  they call in turn) plus the kernels inductor generated
  (``torch._inductor.config.cpp.enable_kernel_profile`` names each in the trace). On a GPU each
  is a launch. (A ``TorchDispatchMode`` count, ``kalmannorm bench``'s ``aten_calls``,
  cannot see compiled code: compiled code does not run under such a mode.)
- the first two steps' time (compilation included) of the compiled-steps model.

Usage: python experiments/compiled_steps.py [--models resnet50,mobilenet_v2] [--batches 4]
[--size 64] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch._inductor.config

import kalmannorm
from kalmannorm.lab.bench_micro import (
    MODELS,
    _build,
    _data,
    _workload,
    kernel_calls,
    synchronizer,
    timed_rounds,
)


def measure(model_name: str, size: int, batch: int, device: torch.device) -> dict:
    x, y = _data(MODELS[model_name][1], batch, size, device)
    workloads, first_steps = {}, {}
    for label, norm, compiled_steps in (
        ("bn", "torch_bn", False),
        ("bkn-flow", "bkn-flow", False),
        ("bkn-flow, compiled steps", "bkn-flow", True),
    ):
        model = _build(model_name, norm, x, 2, device)
        if compiled_steps:
            kalmannorm.compile_kalman_steps(model)
        workload = _workload(model, x, y, compiled=False)
        start = time.perf_counter()
        workload.step()
        workload.step()
        synchronizer(device)()
        first_steps[label] = time.perf_counter() - start
        workloads[label] = workload
    calls = {label: kernel_calls(w) for label, w in workloads.items()}
    samples = timed_rounds(
        {label: w.step for label, w in workloads.items()}, 1, 6, 2, synchronizer(device)
    )
    ms = {label: statistics.median(v) for label, v in samples.items()}
    ratio = {
        label: statistics.median(a / b for a, b in zip(v, samples["bn"]))
        for label, v in samples.items()
    }
    return {
        "model": model_name,
        "size": size,
        "batch": batch,
        "step_ms": ms,
        "step_ratio": ratio,
        "kernel_calls": calls,
        "kernel_calls_ratio": {label: c / calls["bn"] for label, c in calls.items()},
        "first_two_steps_s": first_steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,mobilenet_v2")
    parser.add_argument("--batches", default="4")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch._inductor.config.cpp.enable_kernel_profile = True
    device = torch.device(args.device)
    rows = []
    print("| model | batch | BN ms | bkn-flow | compiled steps | kernel calls: BN, bkn-flow, "
          "compiled steps | first two steps, compiled steps (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for model_name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            row = measure(model_name, args.size, batch, device)
            rows.append(row)
            r, c = row["step_ratio"], row["kernel_calls"]
            print(
                f"| {model_name} ({args.size}) | {batch} | {row['step_ms']['bn']:.1f} | "
                f"{r['bkn-flow']:.2f}x | {r['bkn-flow, compiled steps']:.2f}x | "
                f"{c['bn']:,}, {c['bkn-flow']:,}, {c['bkn-flow, compiled steps']:,} | "
                f"{row['first_two_steps_s']['bkn-flow, compiled steps']:.0f} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(),
                       "rows": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
