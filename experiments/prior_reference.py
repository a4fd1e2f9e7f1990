"""The data-flow prior against the best a moment propagator can do (issue 12's ResNet-18 check).

For each Kalman layer of torchvision ResNet-18 (converted with ``prior="propagate"``, data flow,
batch source) whose input is a convolution, the *reference* prior propagates the exact per-group
moments of the tensor that really enters that convolution through the same convolution rule
(:func:`kalmannorm.moments.convolution`, zero border included). The chain's own prior predicts
those moments from the producers' statistics and the operations in between. Both are scored
against the layer's batch statistics (median over channels and groups of |mean error| / batch std
and |log variance ratio|), after 8 SGD steps on random data, over 4 batches.

Usage: python experiments/prior_reference.py [--size 160] [--batch 8] [--stat-batch 2]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torchvision

import kalmannorm
from kalmannorm import dataflow
from kalmannorm import functional as kf
from kalmannorm import moments as mo
from kalmannorm.chain import is_chain_member
from kalmannorm.diagnostics import layer_category


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--stat-batch", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = (args.batch, 3, args.size, args.size)
    model = kalmannorm.convert_norm(
        torchvision.models.resnet18(num_classes=10), "bkn", prior="propagate",
        stat_batch_size=args.stat_batch, flow="data", source="batch",
        example_input=torch.randn(shape),
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(8):
        x, y = torch.randn(shape, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    traced = dataflow.trace(model, torch.randn(shape, generator=g), is_chain_member)
    programs, _ = dataflow.compile_programs(traced)
    layers = dict(model.named_modules())
    reference: dict[str, list] = {}
    handles = []
    for name, program in zip(traced.names, programs):
        if not (isinstance(program, dataflow.Operation) and program.op == "conv"):
            continue
        conv, geometry = program.info["module"], program.info["geometry"]

        def hook(module, inputs, name=name, geometry=geometry):
            mean, var, _ = kf.group_moments(inputs[0].detach().double(), args.stat_batch)
            reference.setdefault(name, []).append(
                dataflow._conv_moments(module, geometry, mo.Moments(mean, var))
            )

        handles.append(conv.register_forward_pre_hook(hook))
    scores: dict[str, dict[str, list[float]]] = {}
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(shape, generator=g))
            for name in reference:
                stats = layers[name].last_statistics
                bm, bv = stats.batch_mean.double(), stats.batch_var.double()
                ref = reference[name][-1]
                for label, (pm, pv) in (
                    ("chain", (stats.prior_mean.double(), stats.prior_var.double())),
                    ("reference", (ref.mean, ref.var)),
                ):
                    row = scores.setdefault(name, {}).setdefault(label, [])
                    row.append(((pm - bm).abs() / bv.sqrt()).median().item())
                    row.append((pv / bv).log().abs().median().item())
    for handle in handles:
        handle.remove()

    where = {n: layer_category(p, i) for i, (n, p) in enumerate(zip(traced.names, programs))}
    print(f"resnet18, {args.size} px, batch {args.batch}, s = {args.stat_batch}")
    print(f"{'layer':24s} {'category':16s} chain mean/logvar   reference mean/logvar   ratio")
    by_category: dict[str, list[tuple[float, ...]]] = {}
    for name, row in scores.items():
        chain = (statistics.fmean(row["chain"][0::2]), statistics.fmean(row["chain"][1::2]))
        ref = (statistics.fmean(row["reference"][0::2]), statistics.fmean(row["reference"][1::2]))
        by_category.setdefault(where[name], []).append((*chain, *ref))
        ratio = (chain[0] / ref[0], chain[1] / ref[1])
        print(f"{name:24s} {where[name]:16s} {chain[0]:.3f} / {chain[1]:.3f}        "
              f"{ref[0]:.3f} / {ref[1]:.3f}          {ratio[0]:.2f} / {ratio[1]:.2f}")  # fmt: skip
    print("by category (mean over layers): chain mean/logvar, reference mean/logvar, ratio")
    for category, rows in by_category.items():
        c = [statistics.fmean(r[i] for r in rows) for i in range(4)]
        print(f"  {category:16s} {c[0]:.3f} / {c[1]:.3f}   {c[2]:.3f} / {c[3]:.3f}   "
              f"{c[0] / c[2]:.2f} / {c[1] / c[3]:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
