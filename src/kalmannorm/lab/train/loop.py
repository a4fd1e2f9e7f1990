"""``kalmannorm train``: one run, top to bottom.

1. Check the configuration (names, batch arithmetic) before touching data or model.
2. Load the data into memory (or open the image folders), build and convert the model, SGD
   with momentum and a per-step learning-rate schedule.
3. Resume from the run folder's checkpoint if asked (refusing another configuration).
4. Train: each epoch visits the training set in an order drawn from (seed, epoch); each step's
   augmentation is drawn from (seed, step). Both are recomputed, never stored, so a resumed run
   sees exactly the data the uninterrupted run would have seen. Each process takes its slice of
   the global batch and may accumulate it in several passes.
5. Every ``eval_every`` steps: test accuracy with moving and with batch statistics, one metrics
   record, a checkpoint. At the end: ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as torch_f

from kalmannorm.lab.train import distributed
from kalmannorm.lab.train.checkpoint import (
    capture_rng,
    check_fingerprint,
    load_checkpoint,
    remove_stale_temporaries,
    restore_rng,
    save_checkpoint,
)
from kalmannorm.lab.train.config import (
    PROGRESS,
    SCHEDULES,
    TrainConfig,
    fingerprint,
    save_config,
)
from kalmannorm.lab.train.evaluate import evaluate, precise_accuracy
from kalmannorm.lab.train.metrics import MetricsLog, read_metrics
from kalmannorm.lab.train.model import build_model_for, check_names, load_run_data
from kalmannorm.lab.train.plan import BatchPlan, ConfigError, plan_batches
from kalmannorm.lab.train.schedule import build_scheduler
from kalmannorm.optim import parameter_groups

CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
CONFIG = "config.toml"


def check_config(config: TrainConfig, processes: int = 1) -> BatchPlan:
    """Everything that can be checked without data: names, values, batch arithmetic."""
    check_names(config.dataset, config.model, config.norm)
    if config.schedule not in SCHEDULES:
        raise ConfigError(
            f"unknown schedule {config.schedule!r}; use one of {', '.join(SCHEDULES)}"
        )
    if config.progress not in PROGRESS:
        raise ConfigError(f"progress must be one of {', '.join(PROGRESS)}")
    if (config.steps is not None and config.steps < 1) or config.epochs < 1:
        raise ConfigError("steps and epochs must be positive")
    if config.seed < 0:
        raise ConfigError(f"seed must be non-negative, got {config.seed}")
    if any(not 0 < m <= 1 for m in config.milestones):
        raise ConfigError(
            f"milestones are fractions of training in (0, 1], got {config.milestones}"
        )
    return plan_batches(
        config.batch_size,
        config.stat_batch_size,
        processes,
        config.accumulation_steps,
        norm=config.norm,
    )


def train(config: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run (or, with ``resume``, continue) the training run ``config``; returns the summary
    (an empty dict on processes other than the main one)."""
    plan = check_config(config, distributed.world_size_from_env())
    dist, device = distributed.setup(config.device)
    try:
        return _train(config, plan, dist, device, resume)
    finally:
        distributed.teardown(dist)


# -- data order: pure functions of (seed, epoch, step) ------------------------------------------


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The permutation of the training set visited in ``epoch``."""
    return torch.randperm(
        n, generator=torch.Generator().manual_seed(2 * (seed * 1_000_003 + epoch))
    )


def batch_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s augmentation draws."""
    return 2 * (seed * 1_000_003 + step) + 1


# -- the run ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Meters:
    """Training loss and accuracy summed since the last evaluation (saved in checkpoints)."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0


def _train(
    config: TrainConfig,
    plan: BatchPlan,
    dist: distributed.Distributed,
    device: torch.device,
    resume: bool,
) -> dict[str, Any]:
    out = Path(config.out)
    checkpoint_path = out / CHECKPOINT
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
    if not resume and (checkpoint_path.exists() or (out / SUMMARY).exists()):
        raise ConfigError(
            f"{out} already holds a run; pass --resume to continue it, or choose another --out"
        )
    if config.threads:
        torch.set_num_threads(config.threads)

    # data
    data = load_run_data(config)
    steps_per_epoch = data.train_size // config.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"batch size {config.batch_size} exceeds the {data.train_size} training images"
        )
    total_steps = config.steps or config.epochs * steps_per_epoch
    eval_every = config.eval_every or steps_per_epoch
    checkpoint_every = config.checkpoint_every or eval_every

    # model and optimizer (identical initial weights on every process)
    torch.manual_seed(config.seed)
    model = build_model_for(config, data).to(device)
    kalman_decay = config.kalman_weight_decay
    parameters = (
        model.parameters()  # one group: every parameter alike
        if config.kalman_lr_scale == 1.0 and kalman_decay in (None, config.weight_decay)
        else parameter_groups(
            model,
            config.lr,
            config.weight_decay,
            kalman_lr_scale=config.kalman_lr_scale,
            kalman_weight_decay=config.kalman_weight_decay,
        )
    )
    optimizer = torch.optim.SGD(
        parameters,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    scheduler = build_scheduler(optimizer, total_steps, config)

    # resume
    step, meters, elapsed = 0, Meters(), 0.0
    if resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        check_fingerprint(checkpoint_path, state["config"], fingerprint(config))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, meters, elapsed = state["step"], Meters(**state["meters"]), state["elapsed_s"]
        if len(state["rng"]) == dist.world_size:
            restore_rng(state["rng"][dist.rank])
        else:
            torch.manual_seed(config.seed + 7919 * step + dist.rank)
    else:
        torch.manual_seed(config.seed + dist.rank)  # dropout etc.: per process

    derived = {
        "train_size": data.train_size,
        "test_size": data.test_size,
        "num_classes": data.num_classes,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "eval_every": eval_every,
        "processes": plan.processes,
        "samples_per_pass": plan.per_pass,
        "stat_batch_size_used": plan.stat_batch_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
    }
    log = MetricsLog(out, dist.is_main, step, total_steps, config.progress)
    if dist.is_main:
        save_config(config, out / CONFIG, "kalmannorm train: resolved configuration")
        log.log(
            f"{'resuming at step ' + str(step) if step else 'training'}: {config.model} with "
            f"{config.norm}, gradient batch {config.batch_size} = {plan.processes} process(es) x "
            f"{plan.accumulation_steps} pass(es) x {plan.per_pass}, statistics groups of "
            f"{plan.stat_batch_size}; {total_steps} steps ({steps_per_epoch}/epoch) on "
            f"{data.train_size} {config.dataset} images -> {out}"
        )

    wrapped = distributed.wrap(model, dist, device)
    part = plan.process_slice(dist.rank)

    def checkpoint() -> None:
        distributed.average_buffers(model, dist)
        rng = distributed.gather(capture_rng(), dist)
        if dist.is_main:
            save_checkpoint(
                checkpoint_path,
                {
                    "config": fingerprint(config),
                    "step": step,
                    "epoch": step // steps_per_epoch,
                    "position": step % steps_per_epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "meters": dataclasses.asdict(meters),
                    "rng": rng,
                    "world_size": dist.world_size,
                    "elapsed_s": elapsed + time.perf_counter() - started,
                },
            )
        distributed.barrier(dist)

    started = time.perf_counter()
    window_start, window_step = started, step
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        order = epoch_order(config.seed, epoch, data.train_size)
        last = min(steps_per_epoch, position + total_steps - step)
        batches = [
            (
                order[i * config.batch_size : (i + 1) * config.batch_size],
                batch_seed(config.seed, epoch * steps_per_epoch + i),
            )
            for i in range(position, last)
        ]
        for x, y in data.train_batches(batches, part, config.augment):
            model.train()
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
            loss, correct = _train_step(wrapped, optimizer, x.to(device), y.to(device), plan)
            scheduler.step()
            step += 1
            meters.loss_sum += loss * len(y)
            meters.correct += correct
            meters.count += len(y)
            log.step(loss)

            if step % eval_every == 0 or step == total_steps:
                distributed.average_buffers(model, dist)
                loss_sum, n_correct, count = distributed.all_reduce_sum(
                    [meters.loss_sum, meters.correct, meters.count], dist, device
                )
                if not math.isfinite(loss_sum):
                    raise FloatingPointError(
                        f"training diverged: the loss is {loss_sum / count} at step {step}; try "
                        f"a lower --lr or a warm-up"
                    )
                accuracy = evaluate(
                    model,
                    data,
                    stat_batch_size=plan.stat_batch_size,
                    eval_batch_size=config.eval_batch_size,
                    dist=dist,
                    device=device,
                )
                if config.precise_bn_batches > 0:
                    accuracy["test_acc_precise"] = precise_accuracy(
                        model,
                        data,
                        _precise_batches(data, config, part, plan.per_pass),
                        eval_batch_size=config.eval_batch_size,
                        dist=dist,
                        device=device,
                    )
                now = time.perf_counter()
                trained = (step - window_step) * config.batch_size
                log.record(
                    {
                        "step": step,
                        "epoch": step / steps_per_epoch,
                        "train_loss": loss_sum / count,
                        "train_acc": n_correct / count,
                        **accuracy,
                        "lr": lr,
                        "samples_per_s": trained / (now - window_start),
                        "elapsed_s": elapsed + now - started,
                    }
                )
                meters = Meters()
                checkpoint()
                window_start, window_step = time.perf_counter(), step
            elif step % checkpoint_every == 0:
                checkpoint()
    log.close()
    if not dist.is_main:
        return {}

    summary = summarize(read_metrics(out / "metrics.jsonl"), config, derived)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    final, best = summary["final"], summary["best"]["test_acc_moving"]
    print(
        f"done: test accuracy moving {final['test_acc_moving']:.4f}, batch "
        f"{final['test_acc_batch']:.4f} (best {best['value']:.4f} at step {best['step']}) "
        f"-> {out / SUMMARY}",
        flush=True,
    )
    return summary


def _train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    plan: BatchPlan,
) -> tuple[float, int]:
    """One optimizer step on this process's batch, in ``plan.accumulation_steps`` passes.

    Each pass's loss is scaled by its share of the batch, so the accumulated gradient is that of
    the mean loss; DDP averages it over processes on the last pass (``no_sync`` before).
    """
    passes = list(zip(x.split(plan.per_pass), y.split(plan.per_pass)))
    loss_total, correct = 0.0, 0
    for index, (xp, yp) in enumerate(passes):
        last = index == len(passes) - 1
        sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            logits = model(xp)
            loss = torch_f.cross_entropy(logits, yp) * (len(yp) / len(y))
            loss.backward()
        loss_total += float(loss.detach())
        correct += int((logits.detach().argmax(1) == yp).sum())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_total, correct


def _precise_batches(data, config: TrainConfig, part: slice, per_pass: int):
    """PreciseBN's inputs: the first ``precise_bn_batches`` forward batches of the training set
    in the first epochs' order, without augmentation, this process's slice split into passes as
    in training (so every layer sees its training statistics groups)."""
    per_process = len(range(config.batch_size)[part])
    wanted = -(-config.precise_bn_batches // max(1, per_process // per_pass))  # global batches
    batches: list[tuple[torch.Tensor, int]] = []
    epoch = 0
    while len(batches) < wanted and data.train_size >= config.batch_size:
        order = epoch_order(config.seed, epoch, data.train_size)
        starts = range(0, data.train_size - config.batch_size + 1, config.batch_size)
        batches += [(order[s : s + config.batch_size], 0) for s in starts]
        epoch += 1
    remaining = config.precise_bn_batches
    for x, _ in data.train_batches(batches[:wanted], part, False):
        for chunk in x.split(per_pass):
            if remaining == 0:
                return
            remaining -= 1
            yield chunk


def summarize(
    records: list[dict[str, Any]], config: TrainConfig, derived: dict[str, Any]
) -> dict[str, Any]:
    """Final and best accuracies (both evaluation modes) of a run's metrics records."""
    final = records[-1]
    columns = ("test_acc_moving", "test_acc_batch", "test_acc_precise")
    columns = tuple(key for key in columns if key in final)
    best = {
        key: {
            "value": max(r[key] for r in records if key in r),
            "step": max((r for r in records if key in r), key=lambda r: (r[key], -r["step"]))[
                "step"
            ],
        }
        for key in columns
    }
    return {
        "status": "finished",
        "steps": final["step"],
        "final": {k: final[k] for k in ("train_loss", "train_acc", *columns)},
        "best": best,
        "wall_time_s": final["elapsed_s"],
        "derived": derived,
        "config": dataclasses.asdict(config),
    }
