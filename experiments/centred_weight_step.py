"""The recommended BKN (``bkn-flow`` on centred convolutions) with the prior reading the
forward's centred weight against the same model centring every weight a second time for the
prior (as before the centred layers shared it).

One training step (forward, cross-entropy, backward, SGD at lr 0) of a torchvision model at
batch 4, 64 px, statistics groups of 2, one torch thread: BN on plain convolutions, centred
``bkn-flow`` as it runs, and a copy whose centred layers recompute the centring for the prior.
The three are timed in the same rounds, the order rotating; each prints the median over rounds.

    python experiments/centred_weight_step.py --model resnet50
"""

from __future__ import annotations

import argparse
import statistics

import torch

from kalmannorm import center_conv_weights
from kalmannorm.lab.bench_micro import _build, _data, _workload, timed_rounds
from kalmannorm.layers.moving_average_batch import _CenteredWeight, centered_weight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    x, y = _data("classify", args.batch, 64, cpu)
    bn = _workload(_build(args.model, "torch_bn", x, 2, cpu), x, y, False)
    centred = []
    for _ in range(2):
        model = _build(args.model, "bkn-flow", x, 2, cpu)
        center_conv_weights(model, "all")
        centred.append(_workload(model, x, y, False))
    shared, again = centred
    shared_method = _CenteredWeight.convolved_weight

    def centring_again() -> None:
        _CenteredWeight.convolved_weight = lambda self: centered_weight(self.weight)
        try:
            again.step()
        finally:
            _CenteredWeight.convolved_weight = shared_method

    calls = {"bn": bn.step, "shared": shared.step, "again": centring_again}
    samples = timed_rounds(calls, warmup=3, repeats=args.rounds, iters=3, sync=lambda: None)
    ms = {name: statistics.median(values) for name, values in samples.items()}
    print(
        f"{args.model} batch {args.batch}, centred bkn-flow: BN {ms['bn']:.1f} ms, shared "
        f"centring {ms['shared']:.1f} ms ({ms['shared'] / ms['bn']:.2f}x), centring again "
        f"{ms['again']:.1f} ms ({ms['again'] / ms['bn']:.2f}x); shared / again "
        f"{ms['shared'] / ms['again']:.3f}"
    )


if __name__ == "__main__":
    main()
