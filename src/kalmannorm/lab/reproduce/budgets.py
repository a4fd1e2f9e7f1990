"""What ``kalmannorm reproduce`` trains: the grids of a budget.

A budget is a set of ``kalmannorm compare`` grids under one folder plus how much data the
analyses read. ``small`` fits 2 CPU cores in about two hours (Fashion-MNIST, the small CNN,
300-step runs; see :data:`kalmannorm.lab.train.presets.SWEEP_STEPS`); ``paper`` holds the paper's
recipes for GPUs (CIFAR-10/100 with the paper's Inception network and the authors' 400-epoch
schedule; ImageNet ResNet-50/101 at gradient batch 256, statistics batch 4).

Every norm of a grid gets the same recipe and the same budget; the only per-norm settings are the
step schedules of BRN and CBN, scaled to the run length by one rule
(:func:`kalmannorm.lab.train.presets.sweep_norms`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from kalmannorm.lab.analysis.params import count_parameters, width_for_parameter_count
from kalmannorm.lab.reproduce.budget import TABLE3_STAT_BATCH, Budget
from kalmannorm.lab.reproduce.residual import residual
from kalmannorm.lab.train.compare import CompareConfig, Variant
from kalmannorm.lab.train.config import config_from_dict
from kalmannorm.lab.train.model import build_model_for, load_run_data
from kalmannorm.lab.train.presets import SWEEP_STEPS, microbatch_sweep, paper_cifar

#: Grid names, in the order they run.
SWEEP, SETTINGS, WIDENED = "sweep", "settings", "widened"

#: The paper's (gradient batch, statistics batch) settings beyond the sweep's (128, s).
SMALL_SETTINGS = ((16, 4), (8, 2))
#: Norms trained at those settings (the paper compares BN, BRN and BKN there; we keep the
#: two the claim is about, to fit the CPU budget).
SETTINGS_NORMS = ("bn", "bkn")


def _rooted(cfg: CompareConfig, root: Path, name: str) -> CompareConfig:
    return dataclasses.replace(cfg, out=str(root / name))


def settings_grid(train: dict[str, Any], g: int, s: int, steps_at_128: int) -> CompareConfig:
    """BN and BKN at gradient batch ``g`` and statistics batch ``s``: as many samples as a
    run of ``steps_at_128`` steps at batch 128, learning rate and warm-up scaled linearly."""
    steps = steps_at_128 * 128 // g
    return CompareConfig(
        train={
            **train,
            "batch_size": g,
            "lr": train["lr"] * g / 128,
            "steps": steps,
            "warmup_steps": steps // 10,
            "eval_every": steps // 2,
        },
        norms=[Variant(n, n) for n in SETTINGS_NORMS],
        stat_batch_sizes=[s],
        seeds=[0, 1, 2],
        baseline=None,
        jobs=2,
    )


def widened_width(train: dict[str, Any], stat_batch_size: int) -> tuple[int, int, int]:
    """(width, its parameter count, BKN's count): the smallest ``width`` model option of the
    grid's model with ghost BN that has at least as many parameters as the BKN model."""
    config = config_from_dict({**train, "norm": "bkn", "stat_batch_size": stat_batch_size})
    data = load_run_data(config)

    def build(norm: str, width: int) -> nn.Module:
        return build_model_for(
            dataclasses.replace(
                config, norm=norm, model_options={**config.model_options, "width": width}
            ),
            data,
        )

    target = count_parameters(build("bkn", config.model_options["width"]))
    match = width_for_parameter_count(lambda w: build("bn", w), target)
    return match.width, match.parameters, target


def small(root: str | Path = "runs/reproduce-small") -> Budget:
    """Fashion-MNIST, small CNN, 2 CPU cores, about two hours."""
    root = Path(root)
    sweep = _rooted(microbatch_sweep(), root, SWEEP)
    grids = {SWEEP: sweep}
    for g, s in SMALL_SETTINGS:
        grids[f"{SETTINGS}-g{g}-s{s}"] = _rooted(
            settings_grid(sweep.train, g, s, SWEEP_STEPS), root, f"{SETTINGS}-g{g}-s{s}"
        )
    width, _, _ = widened_width(sweep.train, TABLE3_STAT_BATCH)
    grids[WIDENED] = CompareConfig(
        train={**sweep.train, "model_options": {**sweep.train["model_options"], "width": width}},
        norms=[Variant("bn", f"bn-width{width}")],
        stat_batch_sizes=[TABLE3_STAT_BATCH],
        seeds=list(sweep.seeds),
        baseline=None,
        jobs=2,
        out=str(root / WIDENED),
    )
    notes = [
        f"Scale: every sweep run is {SWEEP_STEPS} SGD steps at gradient batch 128 "
        f"({SWEEP_STEPS * 128 / 60_000:.2f} epoch of Fashion-MNIST's 60,000 training images) of "
        "the small CNN (four conv3x3-norm-ReLU blocks of widths 16, 32, 32, 64, global average "
        "pooling, linear), lr 0.05 with 30 warm-up steps then cosine, momentum 0.9, weight decay "
        "5e-4, pad-crop and flip augmentation. Accuracies are therefore far below converged "
        "values (the paper trains for hundreds of epochs); what is compared is the norms under "
        "one short, identical budget. No norm was tuned: BKN keeps its defaults (q = 0.9, "
        "R = 0.1, A = 0, chosen once in docs/design/init-sweep.md on a different setting), BRN "
        "and CBN their authors' schedules scaled to the run length by one rule. The exception "
        "is bkn-lr100 (not in the paper): its factor 100 on the learning rate of q, R and A was "
        "picked among 10, 100 and 1000 on this very sweep's s = 2 cell and seeds "
        "(docs/design/kalman-learning-rate.md), so its s = 2 column is not an independent test.",
        "Test accuracy is on Fashion-MNIST's 10,000 test images; with batch statistics, whole "
        "statistics groups of whole evaluation batches only (9,920 images at s = 32, 9,856 at "
        "s = 128 and for the batch-independent norms).",
        "The statistics analyses (sections 4-5) forward the first 10,000 training images "
        "without augmentation through the seed-0 model of each cell.",
        "CBN trails BN even at s = 128. Diagnosed on seed 0 of that cell with the same recipe "
        "(a one-off script, 2026-11-22): BN 76.23 %, CBN 68.80 %; CBN with a window of 1 gives "
        "BN's 76.23 % exactly, CBN whose window statistics are recomputed exactly with the "
        "current weights 69.13 %, CBN's forward with BatchNorm's backward 76.11 % (74.87 % over "
        "3 seeds, BN 75.15 %), and its moving and batch-statistics accuracies agree. The gap "
        "comes from CBN's backward (the records are constants, so the gradient reaches the "
        "statistics only through the current batch, weighted 1/n for a window of n = 4), not "
        "from its statistics or its moving averages (layers/cross_iteration.py).",
        "BRN trails BN at s = 128 (71.41 +/- 0.57 % vs 75.15 +/- 1.02 %, 3 seeds). Diagnosed on "
        "seed 0 with the same recipe (a one-off script, 2026-11-22), no bug: with r_max = 1, "
        "d_max = 0 BRN gives BN's 76.23 % exactly; once relaxed, r and d are almost never "
        "clipped, so training normalises by the moving averages (momentum 0.1), which lag the "
        "fast-moving weights, and d is a constant for the gradient. Relaxing r only gives "
        "74.97 %, d only 72.27 %, momentum 0.5 74.07 %; moving and batch-statistics accuracies "
        "agree; the schedule is not the cause (fixed limits from step 0: 72.23 % vs 72.00 %). "
        "See layers/batch_renorm.py.",
    ]
    return Budget(
        "small",
        root,
        grids,
        analysis_samples=10_000,
        notes=notes,
        report_dir=Path("docs/results/small-cnn"),
    )


#: ImageNet at the paper's (256, 4): 90 epochs, step decay every 30 (the standard ResNet recipe).
PAPER_IMAGENET_TRAIN = {
    "dataset": "imagefolder",
    "batch_size": 256,
    "epochs": 90,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "schedule": "step",
    "milestones": [1 / 3, 2 / 3, 8 / 9],
    "gamma": 0.1,
    "device": "cuda",
    "progress": "log",
}


def paper(root: str | Path = "runs/reproduce-paper") -> Budget:
    """The paper's recipes, for GPUs: CIFAR-10/100 micro-batch (128, 2) and ImageNet (256, 4)."""
    root = Path(root)
    grids: dict[str, CompareConfig] = {}
    for dataset in ("cifar10", "cifar100"):
        grids[dataset] = paper_cifar(dataset, str(root / dataset))
    for model in ("resnet50", "resnet101"):
        grids[f"imagenet-{model}"] = CompareConfig(
            train={**PAPER_IMAGENET_TRAIN, "model": f"tv:{model}"},
            norms=[Variant("bn", "bn"), Variant("bkn", "bkn")],
            stat_batch_sizes=[4],
            seeds=[0],
            baseline=Variant("none", "bn-plain"),
            jobs=1,
            out=str(root / f"imagenet-{model}"),
        )
    return Budget(
        "paper", root, grids, analysis_samples=50_000, report_dir=Path("docs/results/paper")
    )


BUDGETS = {"residual": residual, "small": small, "paper": paper}
