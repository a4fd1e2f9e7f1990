"""How much of a converted model's training step is the data-flow prior's weight-sized work
(issue 17): one training step profiled with ``torch.profiler``, the CPU time of the dense
convolutions' moment rule forward (``_DenseConvolutionMoments``) and backward
(``_DenseConvolutionMomentsBackward``), and of autograd's weight-gradient accumulation
(``AccumulateGrad``: where a weight takes the prior's gradient beside its convolution's, the two
are summed), against the same step of the BatchNorm model.

Usage: python experiments/prior_weight_time.py [--model resnet50] [--batch 4] [--steps 3]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import profile

from kalmannorm.lab.bench_micro import _build, _data, _workload

#: profiler event -> what it is
PARTS = {
    "_DenseConvolutionMoments": "moment rule, forward",
    "_DenseConvolutionMomentsBackward": "moment rule, backward",
    "autograd::engine::evaluate_function: torch::autograd::AccumulateGrad": "gradient accumulation",
}


def profiled(model_name: str, norm: str, batch: int, steps: int) -> tuple[float, dict[str, float]]:
    """(ms per step, ms per step of each part) of ``steps`` profiled training steps."""
    device = torch.device("cpu")
    x, y = _data("classify", batch, 64, device)
    workload = _workload(_build(model_name, norm, x, 2, device), x, y, compiled=False)
    for _ in range(2):
        workload.step()
    with profile() as trace:
        for _ in range(steps):
            workload.step()
    totals = {name: 0.0 for name in PARTS.values()}
    for event in trace.key_averages():
        if event.key in PARTS:
            totals[PARTS[event.key]] += event.cpu_time_total / 1e3 / steps
    step = sum(e.self_cpu_time_total for e in trace.key_averages()) / 1e3 / steps
    return step, totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for norm in ("torch_bn", "bkn-flow"):
        step, parts = profiled(args.model, norm, args.batch, args.steps)
        shown = ", ".join(f"{name} {ms:.1f} ms" for name, ms in parts.items())
        print(f"{args.model} batch {args.batch} {norm}: {step:.1f} ms of operators; {shown}")


if __name__ == "__main__":
    main()
