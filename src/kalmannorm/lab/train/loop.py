"""``kalmannorm train``: one run, top to bottom.

1. Check the configuration (names, batch arithmetic) before touching data or model.
2. Load the data into memory (or open the image folders), build and convert the model, SGD
   with momentum and a per-step learning-rate schedule.
3. Resume from the run folder's checkpoint if asked (refusing another configuration).
4. Train: each epoch visits the training set in an order drawn from (seed, epoch); each step's
   augmentation is drawn from (seed, step). Both are recomputed, never stored, so a resumed run
   sees exactly the data the uninterrupted run would have seen. Each process takes its part of
   the global batch and may accumulate it in several passes.
5. Every ``eval_every`` steps: test accuracy with moving and with batch statistics, one metrics
   record, a checkpoint. At the end: ``summary.json``.

Nothing is lost: the run folder is locked for the run (a second process on it is refused); a
non-finite loss stops the run at that step, and a checkpoint is written only of finite weights,
buffers and optimizer state, so the last good checkpoint survives a divergence; SIGINT and
SIGTERM finish the step, save a checkpoint and stop with the command that resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shlex
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as torch_f

from kalmannorm.lab.errors import UserError
from kalmannorm.lab.train import distributed
from kalmannorm.lab.train.batch_mode import GKN, find_norm_layers
from kalmannorm.lab.train.checkpoint import (
    CheckpointError,
    capture_rng,
    check_fingerprint,
    load_checkpoint,
    lock_run_folder,
    remove_stale_temporaries,
    restore_rng,
    save_checkpoint,
)
from kalmannorm.lab.train.config import TrainConfig, check_values, fingerprint, save_config
from kalmannorm.lab.train.evaluate import evaluate, precise_accuracy
from kalmannorm.lab.train.metrics import MetricsLog, read_metrics
from kalmannorm.lab.train.model import build_model_for, check_names, load_run_data
from kalmannorm.lab.train.plan import BatchPlan, ConfigError, plan_batches
from kalmannorm.lab.train.schedule import build_scheduler
from kalmannorm.optim import parameter_groups

CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
CONFIG = "config.toml"


class DivergedError(UserError, FloatingPointError):
    """A non-finite loss, weight or statistic: the run stopped before saving it."""


class TrainingInterruptedError(UserError):
    """SIGINT or SIGTERM stopped the run (after saving a checkpoint, unless asked twice)."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)  # the shell's convention: 130 (SIGINT), 143 (SIGTERM)


class CheckpointWriteError(CheckpointError):
    """The checkpoint could not be written (disk full, permissions); the previous one is kept."""


def check_config(config: TrainConfig, processes: int = 1) -> BatchPlan:
    """Everything that can be checked without data: names, values, device name, batches."""
    check_names(config.dataset, config.model, config.norm)
    check_values(config)
    distributed.check_device(config.device, here=False)  # here: when the run starts
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
        if not dist.is_main:  # only the main process writes to the run folder
            return _train(config, plan, dist, device, resume)
        out = Path(config.out)
        prepare_run_folder(out)
        with lock_run_folder(out):
            remove_stale_temporaries(out)
            return _train(config, plan, dist, device, resume)
    finally:
        distributed.teardown(dist)


def prepare_run_folder(out: Path) -> None:
    """Create the run folder, or say in one line why it cannot be one."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose a folder for the run")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"--out {out} lies below {blocking}, which is a file; choose a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"cannot create the run folder {out}: {error.strerror or error}; choose another --out"
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write to the run folder {out}; choose another --out")


def resume_command(out: Path, processes: int) -> str:
    """The command line that continues the run in ``out``."""
    launcher = (
        f"torchrun --nproc_per_node={processes} -m kalmannorm" if processes > 1 else "kalmannorm"
    )
    return f"{launcher} train --out {shlex.quote(str(out))} --resume"


class _StopRequest:
    """SIGINT/SIGTERM while training: the step finishes, a checkpoint is saved, the run stops.

    A second Ctrl-C more than a second after the first stops at once, without saving (a
    launcher that forwards the terminal's SIGINT and then sends SIGTERM does not count).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.at = 0.0
        self.saved_step: int | None = None
        self.out = Path()

    def __call__(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self.at = signum, now
        elif signum == signal.SIGINT and now - self.at > 1.0:
            kept = (
                f"{self.out / CHECKPOINT} holds step {self.saved_step}"
                if self.saved_step is not None
                else "no checkpoint was written"
            )
            raise TrainingInterruptedError(
                f"interrupted twice: stopped without saving ({kept})", signum
            )


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_StopRequest]:
    """SIGINT and SIGTERM set the stop request while the block runs (main thread only: signal
    handlers cannot be installed from other threads, where the run simply has none)."""
    request = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _check_test_set(model: nn.Module, data, plan: BatchPlan) -> None:
    """Refuse a test set too small for one statistics group when the model has layers whose
    batch-statistics evaluation needs whole groups (it would score no image: NaN)."""
    if data.test_size < 1:
        raise ConfigError("the test set is empty; use a larger --test-subset")
    batch_dependent = [layer for layer in find_norm_layers(model) if layer.kind != GKN]
    if batch_dependent and data.test_size < plan.stat_batch_size:
        raise ConfigError(
            f"the test set holds {data.test_size} images, fewer than one statistics group of "
            f"{plan.stat_batch_size}: the batch-statistics evaluation would score none; use "
            f"--test-subset {plan.stat_batch_size} or more"
        )


def _nonfinite_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the model's parameters and buffers and of optimizer state tensors that hold
    NaN or Inf (one device-to-host transfer for all)."""
    named = [(f"model {k}", v) for k, v in model.state_dict().items()]
    for index, state in optimizer.state_dict()["state"].items():
        named += [(f"optimizer state {index}.{k}", v) for k, v in state.items()]
    named = [(k, v) for k, v in named if torch.is_tensor(v) and v.is_floating_point()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(v).all() for _, v in named]).tolist()
    return [k for (k, _), ok in zip(named, finite) if not ok]


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
    if config.warmup_steps > total_steps:
        raise ConfigError(
            f"warmup_steps {config.warmup_steps} exceeds the {total_steps} training steps: the "
            f"learning rate would never reach --lr; use fewer warm-up steps"
        )

    # model and optimizer (identical initial weights on every process)
    torch.manual_seed(config.seed)
    model = build_model_for(config, data).to(device)
    _check_test_set(model, data, plan)
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
    saved_step: int | None = None  # the step of the checkpoint on disk
    if resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        check_fingerprint(checkpoint_path, state["config"], fingerprint(config))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, meters, elapsed = state["step"], Meters(**state["meters"]), state["elapsed_s"]
        saved_step = step
        if len(state["rng"]) == dist.world_size:
            restore_rng(state["rng"][dist.rank])
        else:
            torch.manual_seed(config.seed + 7919 * step + dist.rank)
    else:
        torch.manual_seed(config.seed + dist.rank)  # dropout etc.: per process
        if resume and dist.is_main:  # not an error: compare starts every run with --resume
            print(f"{out} holds no checkpoint to resume: starting at step 0", flush=True)

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
    part = plan.process_part(dist.rank)

    def diverged(what: str) -> DivergedError:
        if saved_step is None:
            return DivergedError(
                f"training diverged at step {step}: {what}; no checkpoint was written. Lower --lr "
                f"(or raise --warmup-steps) and start again"
            )
        return DivergedError(
            f"training diverged at step {step}: {what}; nothing after step {saved_step} was "
            f"saved ({checkpoint_path} holds step {saved_step}). Lower --lr (or raise "
            f"--warmup-steps) and start again in a new --out, or, for a transient fault, resume "
            f"from step {saved_step}: {resume_command(out, dist.world_size)}"
        )

    def check_state() -> None:
        """Refuse to evaluate or save non-finite weights, buffers or optimizer state."""
        bad = _nonfinite_state(model, optimizer)
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise diverged(f"{', '.join(bad[:3])}{more} hold NaN or Inf")

    def checkpoint() -> None:
        nonlocal saved_step
        distributed.average_buffers(model, dist)
        check_state()
        rng = distributed.gather(capture_rng(), dist)
        if dist.is_main:
            state = {
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
            }
            try:
                save_checkpoint(checkpoint_path, state)
            except OSError as error:
                kept = f"step {saved_step} is kept" if saved_step is not None else "none yet"
                raise CheckpointWriteError(
                    f"cannot write {checkpoint_path} at step {step}: {error.strerror or error} "
                    f"(the previous checkpoint: {kept}); make room or fix the folder's "
                    f"permissions, then: {resume_command(out, dist.world_size)}"
                ) from None
        distributed.barrier(dist)
        saved_step = step

    with _stop_on_signals() as stop:
        stop.out, stop.saved_step = out, saved_step
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
                try:
                    loss, correct = _train_step(
                        wrapped, optimizer, x.to(device), y.to(device), plan
                    )
                except FloatingPointError as error:  # a layer's own finite check
                    step += 1
                    raise diverged(str(error)) from error
                scheduler.step()
                step += 1
                meters.loss_sum += loss * len(y)
                meters.correct += correct
                meters.count += len(y)
                log.step(loss)
                # The loss is on the host already (the meters), so checking it costs no sync;
                # under torchrun the processes agree on it and on a stop request in one
                # all-reduce of two numbers.
                nonfinite, stopping = distributed.all_reduce_sum(
                    [float(not math.isfinite(loss)), float(stop.signum is not None)], dist, device
                )
                if nonfinite:
                    raise diverged(f"the training loss is {loss}")

                if step % eval_every == 0 or step == total_steps:
                    distributed.average_buffers(model, dist)
                    check_state()
                    loss_sum, n_correct, count = distributed.all_reduce_sum(
                        [meters.loss_sum, meters.correct, meters.count], dist, device
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
                stop.saved_step = saved_step
                if stopping:
                    if saved_step != step:
                        checkpoint()
                    log.close()
                    name = signal.Signals(stop.signum or signal.SIGTERM).name
                    raise TrainingInterruptedError(
                        f"interrupted ({name}) at step {step} of {total_steps}: checkpoint saved "
                        f"to {checkpoint_path}; continue with: "
                        f"{resume_command(out, dist.world_size)}",
                        stop.signum or signal.SIGTERM,
                    )
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


def _precise_batches(data, config: TrainConfig, part: slice | torch.Tensor, per_pass: int):
    """PreciseBN's inputs: the first ``precise_bn_batches`` forward batches of the training set
    in the first epochs' order, without augmentation, this process's slice split into passes as
    in training (so every layer sees its training statistics groups)."""
    per_process = len(range(config.batch_size)[part]) if isinstance(part, slice) else len(part)
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
