"""The depthwise convolutions' moment rule in closed form with its backward written out
(``moments._DepthwiseConvolutionMoments``) against the grouped rule autograd differentiates
(``moments._grouped``, which served depthwise convolutions before).

One training step (forward, cross-entropy, backward, SGD at lr 0) of a torchvision model with
depthwise convolutions at batch 4, 64 px, statistics groups of 2, one torch thread: BN, ``bkn-flow``
as it runs and a copy whose data-flow prior takes the grouped rule for the step only, timed in
the same rounds, the order rotating; each prints the median over rounds.

    python experiments/depthwise_moments_step.py --model mobilenet_v2
"""

from __future__ import annotations

import argparse
import statistics

import torch

from kalmannorm import moments
from kalmannorm.lab.bench_micro import _build, _data, _workload, timed_rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--norm", default="bkn-flow")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    x, y = _data("classify", 4, 64, cpu)
    bn, written, grouped = (
        _workload(_build(args.model, norm, x, 2, cpu), x, y, False)
        for norm in ("torch_bn", args.norm, args.norm)
    )
    depthwise = moments._depthwise

    def grouped_step() -> None:
        moments._depthwise = moments._grouped
        try:
            grouped.step()
        finally:
            moments._depthwise = depthwise

    calls = {"bn": bn.step, "written": written.step, "grouped": grouped_step}
    samples = timed_rounds(calls, warmup=3, repeats=args.rounds, iters=3, sync=lambda: None)
    ms = {name: statistics.median(values) for name, values in samples.items()}
    print(
        f"{args.model} {args.norm}: BN {ms['bn']:.1f} ms, depthwise rule written "
        f"{ms['written']:.1f} ms ({ms['written'] / ms['bn']:.2f}x), grouped rule "
        f"{ms['grouped']:.1f} ms ({ms['grouped'] / ms['bn']:.2f}x); written / grouped "
        f"{ms['written'] / ms['grouped']:.3f}"
    )


if __name__ == "__main__":
    main()
