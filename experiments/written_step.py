"""A Kalman norm's training step with its small step written out against the same model with the
traced small step (autograd through the kept graph, as before ``fused.KalmanStep``).

One training step (forward, cross-entropy, backward, SGD at lr 0) of a torchvision model at
batch 4, 64 px, statistics groups of 2 (none for per-sample norms), one torch thread: BN, the
norm as it runs (``KalmanStep``) and a second copy whose layers take the ``TracedStep`` branch
(their ``covariance`` set to a value the written step does not take, for the step only). The
three are timed in the same rounds, the order rotating; each prints the median over rounds.

    python experiments/written_step.py --model mobilenet_v2 --norm bkn-flow
"""

from __future__ import annotations

import argparse
import statistics

import torch

from kalmannorm.lab.bench_micro import _build, _data, _workload, timed_rounds
from kalmannorm.layers.base import KalmanNormBase


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--norm", default="bkn-flow")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    x, y = _data("classify", 4, 64, cpu)
    bn, written, traced = (
        _workload(_build(args.model, norm, x, 2, cpu), x, y, False)
        for norm in ("torch_bn", args.norm, args.norm)
    )
    layers = [m for m in traced.model.modules() if isinstance(m, KalmanNormBase)]

    def traced_step() -> None:
        for layer in layers:
            layer.covariance = "traced"  # neither "diag" nor "full": the TracedStep branch
        try:
            traced.step()
        finally:
            for layer in layers:
                layer.covariance = "diag"

    calls = {"bn": bn.step, "written": written.step, "traced": traced_step}
    samples = timed_rounds(calls, warmup=3, repeats=args.rounds, iters=3, sync=lambda: None)
    ms = {name: statistics.median(values) for name, values in samples.items()}
    print(
        f"{args.model} {args.norm}: BN {ms['bn']:.1f} ms, written {ms['written']:.1f} ms "
        f"({ms['written'] / ms['bn']:.2f}x), traced {ms['traced']:.1f} ms "
        f"({ms['traced'] / ms['bn']:.2f}x); written / traced {ms['written'] / ms['traced']:.3f}"
    )


if __name__ == "__main__":
    main()
