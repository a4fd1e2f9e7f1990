"""``bkn-flow`` with ``detach_prior_weights=True`` (the prior reads the convolutions' weights as
constants) against ``bkn-flow`` as it is by default, and BN.

One training step (forward, cross-entropy, backward, SGD at lr 0) of a torchvision model at
batch 4 (``--batch``), 64 px, statistics groups of 2, one torch thread; the three are timed in
the same rounds, the order rotating; each prints the median over rounds.

    python experiments/detached_prior_weights_step.py --model resnet50
"""

from __future__ import annotations

import argparse
import statistics

import torch

from kalmannorm.lab.bench_micro import _build, _data, _workload, timed_rounds
from kalmannorm.layers.base import KalmanNormBase


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    x, y = _data("classify", args.batch, 64, cpu)
    bn, full, detached = (
        _workload(_build(args.model, norm, x, 2, cpu), x, y, False)
        for norm in ("torch_bn", "bkn-flow", "bkn-flow")
    )
    for layer in detached.model.modules():
        if isinstance(layer, KalmanNormBase):
            layer.detach_prior_weights = True
    calls = {"bn": bn.step, "full": full.step, "detached": detached.step}
    samples = timed_rounds(calls, warmup=3, repeats=args.rounds, iters=3, sync=lambda: None)
    ms = {name: statistics.median(values) for name, values in samples.items()}
    print(
        f"{args.model} batch {args.batch}, bkn-flow: BN {ms['bn']:.1f} ms, prior gradient into "
        f"the weights {ms['full']:.1f} ms ({ms['full'] / ms['bn']:.2f}x), weights detached "
        f"{ms['detached']:.1f} ms ({ms['detached'] / ms['bn']:.2f}x); detached / full "
        f"{ms['detached'] / ms['full']:.3f}"
    )


if __name__ == "__main__":
    main()
