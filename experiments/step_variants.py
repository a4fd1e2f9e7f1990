"""A training step of a converted torchvision model in two variants of the library's code, timed
in the same process and rounds: what a change of the hot path buys (issue 17).

One training step (forward, cross-entropy, backward, SGD at lr 0) at batch 4 (``--batch``),
64 px, statistics groups of 2 (none for per-sample norms), one torch thread: BN, the new variant
and the old one, timed in the same rounds, the order rotating; each prints the median over
rounds and new / old. The variants (new against old):

- ``written``: the Kalman norm's small step written out (``fused.KalmanStep``) against the traced
  one (its layers' ``covariance`` set, for the step only, to a value the written step does not
  take: the ``TracedStep`` branch);
- ``centring``: centred ``bkn-flow``, the prior reading the forward's centred weight, against a
  prior that centres every weight again;
- ``detach``: ``detach_prior_weights=True`` against the prior's gradient into the weights;
- ``depthwise``: the depthwise convolutions' moment rule with its backward written out against
  the grouped rule autograd differentiates (``moments._grouped``).

    python experiments/step_variants.py written --model mobilenet_v2 --norm bkn-flow
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections.abc import Callable, Iterator

import torch
from torch import nn

from kalmannorm import center_conv_weights, moments
from kalmannorm.lab.bench_micro import _build, _data, _workload, timed_rounds
from kalmannorm.layers.base import KalmanNormBase
from kalmannorm.layers.moving_average_batch import _CenteredWeight, centered_weight


def _kalman_layers(model: nn.Module) -> list[KalmanNormBase]:
    return [m for m in model.modules() if isinstance(m, KalmanNormBase)]


@contextlib.contextmanager
def _traced_small_steps(model: nn.Module) -> Iterator[None]:
    layers = _kalman_layers(model)
    for layer in layers:
        layer.covariance = "traced"  # neither "diag" nor "full": the TracedStep branch
    try:
        yield
    finally:
        for layer in layers:
            layer.covariance = "diag"


@contextlib.contextmanager
def _centring_again(model: nn.Module) -> Iterator[None]:
    shared = _CenteredWeight.convolved_weight
    _CenteredWeight.convolved_weight = lambda self: centered_weight(self.weight)
    try:
        yield
    finally:
        _CenteredWeight.convolved_weight = shared


@contextlib.contextmanager
def _grouped_depthwise_rule(model: nn.Module) -> Iterator[None]:
    written = moments._depthwise
    moments._depthwise = moments._grouped
    try:
        yield
    finally:
        moments._depthwise = written


def _centre(model: nn.Module) -> None:
    center_conv_weights(model, "all")


def _detach(model: nn.Module) -> None:
    for layer in _kalman_layers(model):
        layer.detach_prior_weights = True


Prepare = Callable[[nn.Module], None] | None
Context = Callable[[nn.Module], contextlib.AbstractContextManager] | None
#: name: (the new and the old variant's names, how each model is prepared (new, old; None: as
#: converted), the context the old model's step runs in (None: none))
VARIANTS: dict[str, tuple[tuple[str, str], tuple[Prepare, Prepare], Context]] = {
    "written": (("written", "traced"), (None, None), _traced_small_steps),
    "centring": (("shared centring", "centring again"), (_centre, _centre), _centring_again),
    "detach": (("weights detached", "gradient into the weights"), (_detach, None), None),
    "depthwise": (("depthwise rule written", "grouped rule"), (None, None),
                  _grouped_depthwise_rule),
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--norm", default="bkn-flow")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    (new_name, old_name), (prepare_new, prepare_old), old_context = VARIANTS[args.variant]
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    x, y = _data("classify", args.batch, 64, cpu)
    bn = _workload(_build(args.model, "torch_bn", x, 2, cpu), x, y, False)
    variants = []
    for prepare in (prepare_new, prepare_old):
        model = _build(args.model, args.norm, x, 2, cpu)
        if prepare is not None:
            prepare(model)
        variants.append(_workload(model, x, y, False))
    new, old = variants

    def old_step() -> None:
        with contextlib.nullcontext() if old_context is None else old_context(old.model):
            old.step()

    calls = {"bn": bn.step, "new": new.step, "old": old_step}
    samples = timed_rounds(calls, warmup=3, repeats=args.rounds, iters=3, sync=lambda: None)
    ms = {name: statistics.median(values) for name, values in samples.items()}
    print(
        f"{args.model} batch {args.batch}, {args.norm}: BN {ms['bn']:.1f} ms, {new_name} "
        f"{ms['new']:.1f} ms ({ms['new'] / ms['bn']:.2f}x), {old_name} {ms['old']:.1f} ms "
        f"({ms['old'] / ms['bn']:.2f}x); new / old {ms['new'] / ms['old']:.3f}"
    )


if __name__ == "__main__":
    main()
