"""What the prior-variance calibration (``calibrate_prior``) does to a trained model's prior.

Loads a finished ``kalmannorm train`` run of a BKN model, measures every Kalman layer's prior
error against its batch statistics (``kalmannorm.diagnostics.prior_errors``) on training batches,
then turns the calibration on (kappa = EMA(batch var) / EMA(prior var), filled by training-mode
forward passes without gradients over other training batches, the model's weights unchanged) and
measures again on the same batches. Prints the errors by category, before and after.

Usage: python experiments/prior_calibration.py RUN_FOLDER [--fill 50] [--batches 8]
       [--source batch]  (the chain relinked to read the producers' batch statistics)
"""

from __future__ import annotations

import argparse
import itertools

import torch

import kalmannorm
from kalmannorm.diagnostics import prior_errors, summarize_by_category
from kalmannorm.lab.analysis.run import load_run
from kalmannorm.layers.batch_kalman import BatchKalmanNorm


def enable_calibration(model: torch.nn.Module) -> int:
    """Give every BKN layer the calibration buffers (zero: kappa = 1 until filled)."""
    count = 0
    for layer in model.modules():
        if isinstance(layer, BatchKalmanNorm) and not layer.calibrate_prior:
            layer.calibrate_prior = True
            for name in ("batch_var", "prior_var"):
                layer.register_buffer(f"calibration_{name}", torch.zeros_like(layer.running_mean))
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--fill", type=int, default=50, help="training batches that fill kappa")
    parser.add_argument("--batches", type=int, default=8, help="training batches measured")
    parser.add_argument("--source", choices=("posterior", "batch"), help="relink the chain so")
    args = parser.parse_args()
    run = load_run(args.run)
    batches = iter(run.data.train_batches_in_order(128))
    measured = [x for x, _ in itertools.islice(batches, args.batches)]
    if args.source:
        kalmannorm.link_chain(run.model, example_input=measured[0], flow="data", source=args.source)
    before = summarize_by_category(prior_errors(run.model, measured))
    print(f"{args.run}: {enable_calibration(run.model)} layers calibrated over {args.fill} batches")
    run.model.train()
    with torch.no_grad():
        for x, _ in itertools.islice(batches, args.fill):
            run.model(x)
    after = summarize_by_category(prior_errors(run.model, measured))
    print(f"{'category':20s} before mean/logvar   after mean/logvar (vs batch statistics)")
    for category in before:
        b, a = before[category], after[category]
        print(f"  {category:18s} {b[0]:.3f} / {b[1]:.3f}        {a[0]:.3f} / {a[1]:.3f}")


if __name__ == "__main__":
    main()
