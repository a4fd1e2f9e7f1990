"""``kalmannorm train``: one run, top to bottom.

1. Check the configuration (names, batch arithmetic) before touching data or model.
2. :func:`_setup`: load the data into memory (or open the image folders; with ``holdout``, a
   held-out part of the training set replaces the test set), build and convert the model, SGD
   with momentum and a per-step learning-rate schedule; resume from the run folder's checkpoint
   if asked (refusing another configuration). Everything a run holds from step to step is one
   :class:`RunState`.
3. :func:`_step`, for every step: each epoch visits the training set in an order drawn from
   (seed, epoch); each step's augmentation is drawn from (seed, step). Both are recomputed,
   never stored, so a resumed run sees exactly the data the uninterrupted run would have seen.
   Each process takes its part of the global batch and may accumulate it in several passes.
4. :func:`_evaluate_and_log`, every ``eval_every`` steps: accuracy with moving and with batch
   statistics (and PreciseBN's), one metrics record; :func:`_save`: a checkpoint then and every
   ``checkpoint_every`` steps. At the end, :func:`_finish`: ``summary.json``.

The step does not synchronise with the device: its loss and accuracy stay there, per pass, and
are read in one transfer before each evaluation and checkpoint (:func:`_read_pending`). That is
where the non-finite guard is: a non-finite loss stops the run there, reported at the step it
occurred, and since a checkpoint is written only after that read, and only of finite weights,
buffers and optimizer state, the last checkpoint before the divergence is what is kept (the steps
after it are lost, as they would be had the run stopped at once). The progress bar, when shown,
reads the loss at most once a second; under torchrun the processes agree on a stop request after
every step (one all-reduce). The run folder is locked for the run (a second process on it is
refused); SIGINT and SIGTERM finish the step, save a checkpoint and stop with the command that
resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as torch_f

import kalmannorm
from kalmannorm.lab.data.holdout import HOLDOUT, TEST
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
            summary = _train(config, plan, dist, device, resume)
        else:
            out = Path(config.out)
            prepare_run_folder(out)
            with lock_run_folder(out):
                remove_stale_temporaries(out)
                summary = _train(config, plan, dist, device, resume)
        # leave together: a process that tears its process group down while another still
        # writes can abort at exit in gloo's threads ("terminate called", seen once in a test)
        distributed.barrier(dist)
        return summary
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
    """Refuse an evaluation set (test set or holdout) too small for one statistics group when
    the model has layers whose batch-statistics evaluation needs whole groups (it would score no
    image: NaN)."""
    held_out = getattr(data, "eval_set", TEST) == HOLDOUT
    name, fix = ("the holdout", "a larger --holdout") if held_out else ("the test set", None)
    if data.test_size < 1:
        raise ConfigError(f"{name} is empty; use {fix or 'a larger --test-subset'}")
    batch_dependent = [layer for layer in find_norm_layers(model) if layer.kind != GKN]
    if batch_dependent and data.test_size < plan.stat_batch_size:
        raise ConfigError(
            f"{name} holds {data.test_size} images, fewer than one statistics group of "
            f"{plan.stat_batch_size}: the batch-statistics evaluation would score none; use "
            f"{fix or f'--test-subset {plan.stat_batch_size} or more'}"
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


@dataclasses.dataclass
class Pending:
    """One finished step whose loss and accuracy are still on the device (per pass)."""

    step: int
    losses: torch.Tensor  # (passes,) each pass's loss, scaled by its share of the batch
    correct: torch.Tensor  # (passes,) correct predictions per pass
    count: int


@dataclasses.dataclass
class RunState:
    """What one run holds from step to step: built by :func:`_setup`, advanced by
    :func:`_step`, read by :func:`_evaluate_and_log` and written by :func:`_save`."""

    config: TrainConfig
    plan: BatchPlan
    dist: distributed.Distributed
    device: torch.device
    out: Path
    data: Any
    model: nn.Module  # the bare model: evaluation, state dicts
    wrapped: nn.Module  # what trains: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps_per_epoch: int
    total_steps: int
    eval_every: int
    checkpoint_every: int
    derived: dict[str, Any]
    step: int = 0
    meters: Meters = dataclasses.field(default_factory=Meters)
    pending: list[Pending] = dataclasses.field(default_factory=list)
    saved_step: int | None = None  # the step of the checkpoint on disk
    lr: float = 0.0  # the rate the last step used
    elapsed_before: float = 0.0  # seconds trained by the processes before a resume
    started: float = 0.0  # perf_counter() when this process started training
    window: tuple[float, int] = (0.0, 0)  # (time, step) the throughput is measured from
    log: MetricsLog = dataclasses.field(init=False)  # opened once the start step is known

    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started


def source_revision() -> str | None:
    """The git commit of the library's source tree (``+dirty`` with uncommitted changes), or
    None where the library is not a tracked part of a git checkout (an installed copy): which
    code produced a run, for results kept as evidence."""
    where = Path(kalmannorm.__file__).parent

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10
        )
        if done.returncode != 0:
            raise subprocess.SubprocessError(done.stderr)
        return done.stdout.strip()

    try:
        git("ls-files", "--error-unmatch", "__init__.py")  # not a copy inside someone's repo
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit


def _train(
    config: TrainConfig,
    plan: BatchPlan,
    dist: distributed.Distributed,
    device: torch.device,
    resume: bool,
) -> dict[str, Any]:
    run = _setup(config, plan, dist, device, resume)
    with _stop_on_signals() as stop:
        stop.out, stop.saved_step = run.out, run.saved_step
        run.started = time.perf_counter()
        run.window = (run.started, run.step)
        for x, y in _training_batches(run):
            _step(run, x, y)
            if run.step % run.eval_every == 0 or run.step == run.total_steps:
                _evaluate_and_log(run)
                _save(run)
                run.window = (time.perf_counter(), run.step)
            elif run.step % run.checkpoint_every == 0:
                _save(run)
            stop.saved_step = run.saved_step
            if _stop_requested(run, stop):
                _stop(run, stop)
    run.log.close()
    return _finish(run)


def _setup(
    config: TrainConfig,
    plan: BatchPlan,
    dist: distributed.Distributed,
    device: torch.device,
    resume: bool,
) -> RunState:
    """Data, model, optimizer and schedule; the checkpoint's state if resuming; the log."""
    out = Path(config.out)
    if not resume and ((out / CHECKPOINT).exists() or (out / SUMMARY).exists()):
        raise ConfigError(
            f"{out} already holds a run; pass --resume to continue it, or choose another --out"
        )
    if config.threads:
        torch.set_num_threads(config.threads)

    data = load_run_data(config)
    steps_per_epoch = data.train_size // config.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"batch size {config.batch_size} exceeds the {data.train_size} training images"
        )
    total_steps = config.steps or config.epochs * steps_per_epoch
    eval_every = config.eval_every or steps_per_epoch
    if config.warmup_steps > total_steps:
        raise ConfigError(
            f"warmup_steps {config.warmup_steps} exceeds the {total_steps} training steps: the "
            f"learning rate would never reach --lr; use fewer warm-up steps"
        )

    torch.manual_seed(config.seed)  # identical initial weights on every process
    model = build_model_for(config, data).to(device)
    _check_test_set(model, data, plan)
    optimizer = _build_optimizer(model, config)
    run = RunState(
        config=config,
        plan=plan,
        dist=dist,
        device=device,
        out=out,
        data=data,
        model=model,
        wrapped=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, total_steps, config),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        eval_every=eval_every,
        checkpoint_every=config.checkpoint_every or eval_every,
        derived={
            "train_size": data.train_size,
            "test_size": data.test_size,
            "eval_set": getattr(data, "eval_set", TEST),
            "num_classes": data.num_classes,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "eval_every": eval_every,
            "processes": plan.processes,
            "samples_per_pass": plan.per_pass,
            "stat_batch_size_used": plan.stat_batch_size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "torch": torch.__version__,
            "kalmannorm": kalmannorm.__version__,
            "source_revision": source_revision(),
        },
    )
    _restore(run, resume)
    run.log = MetricsLog(out, dist.is_main, run.step, total_steps, config.progress)
    if dist.is_main:
        save_config(config, out / CONFIG, "kalmannorm train: resolved configuration")
        held_out = (
            f", {data.test_size} held out for evaluation (the test set is not used)"
            if run.derived["eval_set"] == HOLDOUT
            else ""
        )
        run.log.log(
            f"{'resuming at step ' + str(run.step) if run.step else 'training'}: {config.model} "
            f"with {config.norm}, gradient batch {config.batch_size} = {plan.processes} "
            f"process(es) x {plan.accumulation_steps} pass(es) x {plan.per_pass}, statistics "
            f"groups of {plan.stat_batch_size}; {total_steps} steps ({steps_per_epoch}/epoch) on "
            f"{data.train_size} {config.dataset} images{held_out} -> {out}"
        )
    run.wrapped = distributed.wrap(model, dist, device)
    return run


def _build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum; the Kalman parameters in their own group when they get their own
    learning rate or weight decay."""
    kalman_decay = config.kalman_weight_decay
    parameters = (
        model.parameters()  # one group: every parameter alike
        if config.kalman_lr_scale == 1.0 and kalman_decay in (None, config.weight_decay)
        else parameter_groups(
            model,
            config.lr,
            config.weight_decay,
            kalman_lr_scale=config.kalman_lr_scale,
            kalman_weight_decay=kalman_decay,
        )
    )
    return torch.optim.SGD(
        parameters,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )


def _restore(run: RunState, resume: bool) -> None:
    """Continue from the run folder's checkpoint (refusing another configuration), or seed
    this process's random draws (dropout etc.) for a fresh start."""
    config, dist, path = run.config, run.dist, run.checkpoint_path
    if not (resume and path.exists()):
        torch.manual_seed(config.seed + dist.rank)
        if resume and dist.is_main:  # not an error: compare starts every run with --resume
            print(f"{run.out} holds no checkpoint to resume: starting at step 0", flush=True)
        return
    state = load_checkpoint(path)
    check_fingerprint(path, state["config"], fingerprint(config))
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.step = run.saved_step = state["step"]
    run.meters, run.elapsed_before = Meters(**state["meters"]), state["elapsed_s"]
    if len(state["rng"]) == dist.world_size:
        restore_rng(state["rng"][dist.rank])
    else:
        torch.manual_seed(config.seed + 7919 * run.step + dist.rank)


def _training_batches(run: RunState) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's part of every global batch from ``run.step`` on: each epoch in the order
    drawn from (seed, epoch), each step's augmentation drawn from (seed, step)."""
    config, spe = run.config, run.steps_per_epoch
    part = run.plan.process_part(run.dist.rank)
    while run.step < run.total_steps:
        epoch, position = divmod(run.step, spe)
        order = epoch_order(config.seed, epoch, run.data.train_size)
        last = min(spe, position + run.total_steps - run.step)
        batches = [
            (
                order[i * config.batch_size : (i + 1) * config.batch_size],
                batch_seed(config.seed, epoch * spe + i),
            )
            for i in range(position, last)
        ]
        yield from run.data.train_batches(batches, part, config.augment)


def _step(run: RunState, x: torch.Tensor, y: torch.Tensor) -> None:
    """One optimizer step and the schedule's step. Its loss and accuracy stay on the device
    (``run.pending``) until :func:`_read_pending`: no host synchronisation here."""
    run.model.train()
    run.lr = run.optimizer.param_groups[0]["lr"]  # the rate this step uses
    try:
        losses, correct = _train_step(
            run.wrapped, run.optimizer, x.to(run.device), y.to(run.device), run.plan
        )
    except Exception as error:
        _read_pending(run, agree=False)  # an earlier non-finite loss explains any failure
        if isinstance(error, FloatingPointError):  # a layer's own finite check
            raise _diverged(run, run.step + 1, str(error)) from error
        raise
    run.scheduler.step()
    run.step += 1
    run.pending.append(Pending(run.step, losses, correct, len(y)))
    run.log.step(losses)


def _read_pending(run: RunState, agree: bool = True) -> None:
    """The non-finite guard: read the losses and accuracies of the steps since the last read
    (one device-to-host transfer), stop at the first non-finite loss, add the rest to the meters.

    Called before every evaluation and checkpoint, so no checkpoint ever holds a step after a
    non-finite loss. Under torchrun the processes agree on the earliest such step (``agree``:
    all processes call it at the same step; a process failing alone reads only its own).
    """
    pending, run.pending = run.pending, []
    rows = (
        torch.stack([torch.cat([p.losses.float(), p.correct.float()]) for p in pending]).tolist()
        if pending
        else []
    )
    passes = run.plan.accumulation_steps
    bad: tuple[int, float] | None = None
    for entry, row in zip(pending, rows):
        loss = 0.0
        for value in row[:passes]:  # summed on the host in pass order, as a float64
            loss += value
        if not math.isfinite(loss):
            bad = (entry.step, loss)
            break
        run.meters.loss_sum += loss * entry.count
        run.meters.correct += int(sum(row[passes:]))
        run.meters.count += entry.count
    if agree and run.dist.enabled:
        reports = [r for r in distributed.gather(bad, run.dist) if r is not None]
        bad = min(reports) if reports else None
    if bad is not None:
        raise _diverged(run, bad[0], f"the training loss is {bad[1]}")


def _evaluate_and_log(run: RunState) -> None:
    """Evaluation accuracy (moving, batch and, if asked, precise-BN statistics), training loss
    and accuracy since the last record: one metrics record; the meters start again."""
    config, dist, device = run.config, run.dist, run.device
    _read_pending(run)
    distributed.average_buffers(run.model, dist)
    _check_state(run)
    loss_sum, n_correct, count = distributed.all_reduce_sum(
        [run.meters.loss_sum, run.meters.correct, run.meters.count], dist, device
    )
    accuracy = evaluate(
        run.model,
        run.data,
        stat_batch_size=run.plan.stat_batch_size,
        eval_batch_size=config.eval_batch_size,
        dist=dist,
        device=device,
    )
    if config.precise_bn_batches > 0:
        part = run.plan.process_part(dist.rank)
        accuracy["test_acc_precise"] = precise_accuracy(
            run.model,
            run.data,
            _precise_batches(run.data, config, part, run.plan.per_pass),
            eval_batch_size=config.eval_batch_size,
            dist=dist,
            device=device,
        )
    now = time.perf_counter()
    since, since_step = run.window
    record = {
        "step": run.step,
        "epoch": run.step / run.steps_per_epoch,
        "train_loss": loss_sum / count,
        "train_acc": n_correct / count,
        **accuracy,
        "lr": run.lr,
        "samples_per_s": (run.step - since_step) * config.batch_size / (now - since),
        "elapsed_s": run.elapsed_before + now - run.started,
    }
    if run.derived["eval_set"] != TEST:
        record["eval_set"] = run.derived["eval_set"]
    run.log.record(record)
    run.meters = Meters()


def _save(run: RunState) -> None:
    """A checkpoint of the current step, of finite state only (the last good one survives)."""
    dist = run.dist
    _read_pending(run)
    distributed.average_buffers(run.model, dist)
    _check_state(run)
    rng = distributed.gather(capture_rng(), dist)
    if dist.is_main:
        state = {
            "config": fingerprint(run.config),
            "step": run.step,
            "epoch": run.step // run.steps_per_epoch,
            "position": run.step % run.steps_per_epoch,
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "meters": dataclasses.asdict(run.meters),
            "rng": rng,
            "world_size": dist.world_size,
            "elapsed_s": run.elapsed(),
        }
        try:
            save_checkpoint(run.checkpoint_path, state)
        except OSError as error:
            kept = f"step {run.saved_step} is kept" if run.saved_step is not None else "none yet"
            raise CheckpointWriteError(
                f"cannot write {run.checkpoint_path} at step {run.step}: "
                f"{error.strerror or error} (the previous checkpoint: {kept}); make room or fix "
                f"the folder's permissions, then: {resume_command(run.out, dist.world_size)}"
            ) from None
    distributed.barrier(dist)
    run.saved_step = run.step


def _check_state(run: RunState) -> None:
    """Refuse to evaluate or save non-finite weights, buffers or optimizer state."""
    bad = _nonfinite_state(run.model, run.optimizer)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise _diverged(run, run.step, f"{', '.join(bad[:3])}{more} hold NaN or Inf")


def _diverged(run: RunState, step: int, what: str) -> DivergedError:
    if run.saved_step is None:
        return DivergedError(
            f"training diverged at step {step}: {what}; no checkpoint was written. Lower --lr "
            f"(or raise --warmup-steps) and start again"
        )
    saved, path = run.saved_step, run.checkpoint_path
    return DivergedError(
        f"training diverged at step {step}: {what}; nothing after step {saved} was saved "
        f"({path} holds step {saved}). Lower --lr (or raise --warmup-steps) and start again in "
        f"a new --out, or, for a transient fault, resume from step {saved}: "
        f"{resume_command(run.out, run.dist.world_size)}"
    )


def _stop_requested(run: RunState, stop: _StopRequest) -> bool:
    """Whether SIGINT/SIGTERM asked to stop. Under torchrun the processes agree on it after
    every step (one all-reduce of one number), so that all stop at the same step."""
    requested = stop.signum is not None
    if run.dist.enabled:
        requested = bool(distributed.all_reduce_sum([float(requested)], run.dist, run.device)[0])
    return requested


def _stop(run: RunState, stop: _StopRequest) -> None:
    """Save the current step (unless saved already) and stop with the command that resumes."""
    if run.saved_step != run.step:
        _save(run)
    run.log.close()
    signum = stop.signum or signal.SIGTERM
    raise TrainingInterruptedError(
        f"interrupted ({signal.Signals(signum).name}) at step {run.step} of {run.total_steps}: "
        f"checkpoint saved to {run.checkpoint_path}; continue with: "
        f"{resume_command(run.out, run.dist.world_size)}",
        signum,
    )


def _finish(run: RunState) -> dict[str, Any]:
    """``summary.json`` (main process; the others return an empty dict)."""
    if not run.dist.is_main:
        return {}
    summary = summarize(read_metrics(run.out / "metrics.jsonl"), run.config, run.derived)
    (run.out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    final, best = summary["final"], summary["best"]["test_acc_moving"]
    where = "holdout" if summary["eval_set"] == HOLDOUT else "test"
    print(
        f"done: {where} accuracy moving {final['test_acc_moving']:.4f}, batch "
        f"{final['test_acc_batch']:.4f} (best {best['value']:.4f} at step {best['step']}) "
        f"-> {run.out / SUMMARY}",
        flush=True,
    )
    return summary


def _train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    plan: BatchPlan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on this process's batch, in ``plan.accumulation_steps`` passes.

    Each pass's loss is scaled by its share of the batch, so the accumulated gradient is that of
    the mean loss; DDP averages it over processes on the last pass (``no_sync`` before). Returns
    each pass's (scaled) loss and number of correct predictions, on the device: nothing is read
    back to the host.
    """
    passes = list(zip(x.split(plan.per_pass), y.split(plan.per_pass)))
    losses, correct = [], []
    for index, (xp, yp) in enumerate(passes):
        last = index == len(passes) - 1
        sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            logits = model(xp)
            loss = torch_f.cross_entropy(logits, yp) * (len(yp) / len(y))
            loss.backward()
        losses.append(loss.detach())
        correct.append((logits.detach().argmax(1) == yp).sum())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return torch.stack(losses), torch.stack(correct)


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
        "eval_set": derived.get("eval_set", TEST),  # "holdout": validation numbers
        "steps": final["step"],
        "final": {k: final[k] for k in ("train_loss", "train_acc", *columns)},
        "best": best,
        "wall_time_s": final["elapsed_s"],
        "derived": derived,
        "config": dataclasses.asdict(config),
    }
