"""Faults and bad input: nothing lost, nothing silent (issue 16).

The layers: half-precision models train with float32 statistics; an empty batch gives an empty
output (as torch's BatchNorm) and changes no state. The harness: a non-finite loss or weight never
reaches a checkpoint; a run folder takes one process at a time; SIGINT/SIGTERM save and exit;
checkpoints carry a checksum; data-parallel accumulation equals one process.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile

import pytest
import torch
from torch import nn

import kalmannorm

# -- the layers ---------------------------------------------------------------------------------


def _small_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


HALF_CASES = [
    ("bkn", {"stat_batch_size": 2}),
    ("bkn", {"stat_batch_size": 2, "flow": "authors"}),
    ("bkn", {"stat_batch_size": 2, "flow": "execution"}),
    ("bkn", {"stat_batch_size": 2, "flow": "execution", "prior": "propagate"}),
    ("bkn", {"stat_batch_size": 2, "flow": "execution", "covariance": "full"}),
    ("bkn", {"stat_batch_size": 2, "covariance": "full"}),
    ("gkn", {}),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["half", "bfloat16"])
@pytest.mark.parametrize(("norm", "options"), HALF_CASES, ids=lambda v: str(v))
def test_half_precision_models_train_with_float32_statistics(norm, options, dtype) -> None:
    model = kalmannorm.convert_norm(_small_model(), norm, **options).to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        x = torch.randn(4, 3, 6, 6, dtype=dtype)
        loss = model(x).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss)
    statistics = kalmannorm.kalman_statistics(model)
    assert statistics
    for stats in statistics.values():
        assert stats.posterior_mean.dtype == torch.float32
        assert stats.batch_var.dtype == torch.float32
    model.eval()
    for mode in ("moving", "batch"):
        kalmannorm.set_eval_statistics(model, mode)
        y = model(x)
        assert y.dtype == dtype and torch.isfinite(y).all()


_STAT_BATCH = {"bkn", "bkn-flow", "bn", "brn", "cbn", "mabn"}
_EMPTY_NORMS = [n for n in kalmannorm.available_norms() if n != "in"]  # "in": torch's own layer
# every norm with one group per batch, and the batch-statistics norms with groups of 2 as well
_EMPTY_CASES = [(n, None) for n in _EMPTY_NORMS] + [
    (n, 2) for n in _EMPTY_NORMS if n in _STAT_BATCH
]


@pytest.mark.parametrize(("norm", "stat_batch_size"), _EMPTY_CASES)
def test_empty_batch_gives_an_empty_output_and_changes_nothing(norm, stat_batch_size) -> None:
    options = {} if stat_batch_size is None else {"stat_batch_size": stat_batch_size}
    model = kalmannorm.convert_norm(_small_model(), norm, **options)
    model(torch.randn(4, 3, 6, 6))  # links the chain (and CBN's convolutions)
    twin = copy.deepcopy(model)
    for training in (True, False):
        model.train(training)
        x = torch.randn(0, 3, 6, 6, requires_grad=True)
        y = model(x)
        assert y.shape == (0, 4)
        y.sum().backward()
        assert x.grad.shape == x.shape
    state, before = model.state_dict(), twin.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    # the next real batch computes what it would have without the empty one
    model.train()
    twin.train()
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(model(x), twin(x))


# -- the harness: a non-finite loss or weight never reaches a checkpoint ------------------------


class _PoisonedData:
    """The run's data set, with NaN images in the global batch of step ``at`` (1-based)."""

    def __init__(self, data, at: int) -> None:
        self._data, self._at, self._step = data, at, 0

    def __getattr__(self, name):
        return getattr(self._data, name)

    def train_batches(self, batches, part, augment=True):
        for x, y in self._data.train_batches(batches, part, augment):
            self._step += 1
            yield (torch.full_like(x, float("nan")) if self._step == self._at else x), y


def _poison(monkeypatch, at: int) -> None:
    from kalmannorm.lab.train import loop

    load = loop.load_run_data
    monkeypatch.setattr(loop, "load_run_data", lambda config: _PoisonedData(load(config), at))


@pytest.mark.parametrize("norm", ["none", "bn", "gn", "bkn"])
def test_a_nan_batch_between_evaluations_never_reaches_a_checkpoint(
    tmp_path, monkeypatch, norm
) -> None:
    from conftest import tiny

    from kalmannorm.lab.train import train
    from kalmannorm.lab.train.checkpoint import load_checkpoint
    from kalmannorm.lab.train.loop import DivergedError

    _poison(monkeypatch, at=5)
    stat = None if norm == "none" else 2
    config = tiny(tmp_path, norm=norm, stat_batch_size=stat, steps=8, eval_every=20)
    config.checkpoint_every = 2
    with pytest.raises(DivergedError) as info:
        train(config)
    message = str(info.value)
    assert "at step 5" in message and "--lr" in message
    assert "resume from step 4" in message and "--resume" in message
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 4
    for key, value in state["model"].items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key


def test_non_finite_weights_with_a_finite_loss_are_not_saved(tmp_path, monkeypatch) -> None:
    from conftest import tiny

    from kalmannorm.lab.train import loop, train
    from kalmannorm.lab.train.checkpoint import load_checkpoint

    step = loop._train_step
    calls = []

    def poisoned(model, *args):
        result = step(model, *args)
        calls.append(1)
        if len(calls) == 5:  # a moving average goes bad; training itself does not read it
            next(b for b in model.buffers() if b.is_floating_point()).fill_(float("inf"))
        return result

    monkeypatch.setattr(loop, "_train_step", poisoned)
    config = tiny(tmp_path, norm="bn", steps=8, eval_every=20)
    config.checkpoint_every = 2
    with pytest.raises(loop.DivergedError, match="hold NaN or Inf"):
        train(config)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4


def test_divergence_before_any_checkpoint_says_so(tmp_path, monkeypatch) -> None:
    from conftest import tiny

    from kalmannorm.lab.train import train
    from kalmannorm.lab.train.loop import DivergedError

    _poison(monkeypatch, at=2)
    with pytest.raises(DivergedError, match="no checkpoint was written. Lower --lr"):
        train(tiny(tmp_path, norm="bn", steps=8, eval_every=20))
    assert not (tmp_path / "checkpoint.pt").exists()


# -- the harness: one process per run folder ----------------------------------------------------


def _cli(*args: str, timeout: float = 240, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kalmannorm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


TRAIN = [
    "train",
    "--dataset",
    "digits",
    "--model-option",
    "width=8",
    "--norm",
    "bn",
    "--stat-batch-size",
    "2",
    "--batch-size",
    "16",
    "--lr",
    "0.05",
    "--threads",
    "1",
    "--progress",
    "log",
]


def test_a_locked_run_folder_is_refused_in_one_line(tmp_path) -> None:
    from conftest import tiny

    from kalmannorm.lab.train import train
    from kalmannorm.lab.train.checkpoint import RunFolderBusyError, lock_run_folder

    tmp_path.mkdir(exist_ok=True)
    with lock_run_folder(tmp_path):
        with pytest.raises(RunFolderBusyError, match=f"pid {os.getpid()}"):
            train(tiny(tmp_path))
        result = _cli(*TRAIN, "--steps", "4", "--out", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "is in use by another kalmannorm run" in (
        result.stderr
    )
    assert not (tmp_path / "metrics.jsonl").exists()
    train(tiny(tmp_path))  # free again once the holder is done


def test_two_runs_started_on_one_folder_one_refused_no_duplicate_records(tmp_path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "kalmannorm", *TRAIN, "--steps", "60", "--eval-every", "20"]
    processes = [
        subprocess.Popen(
            [*command, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=240), p.stderr.read().decode()) for p in processes]
    for p in processes:
        p.stdout.close()
        p.stderr.close()
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "in use by another kalmannorm run" in refused or "already holds a run" in refused
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [20, 40, 60]


def test_a_live_process_temporary_is_not_deleted(tmp_path) -> None:
    from kalmannorm.lab.train.checkpoint import remove_stale_temporaries

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".checkpoint.pt.{sleeper.pid}.tmp"
        dead = tmp_path / ".checkpoint.pt.2147483647.tmp"  # above every pid_max
        live.write_bytes(b"being written")
        dead.write_bytes(b"left by a kill")
        remove_stale_temporaries(tmp_path)
        assert live.exists() and not dead.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# -- the harness: SIGINT / SIGTERM save and stop ------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_the_current_step_and_prints_the_resume_command(tmp_path, signum) -> None:
    from kalmannorm.lab.cli import build_parser, config_from_args
    from kalmannorm.lab.train import train
    from kalmannorm.lab.train.checkpoint import load_checkpoint

    args = [*TRAIN, "--steps", "600", "--eval-every", "50", "--augment"]
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "kalmannorm", *args, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not (out / "checkpoint.pt").exists():  # past step 50: in the middle of training
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.02)
    process.send_signal(signum)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 128 + signum, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    name = signal.Signals(signum).name
    match = re.search(rf"interrupted \({name}\) at step (\d+) of 600", stderr)
    assert match, stderr
    assert f"kalmannorm train --out {out} --resume" in stderr
    step = int(match.group(1))
    assert 50 < step < 600
    assert load_checkpoint(out / "checkpoint.pt")["step"] == step

    if signum == signal.SIGTERM:  # resumed, it ends exactly as a run never interrupted
        resumed = _cli("train", "--out", str(out), "--resume")
        assert resumed.returncode == 0, resumed.stderr
        reference = tmp_path / "reference"
        train(config_from_args(build_parser().parse_args([*args, "--out", str(reference)])))
        done = load_checkpoint(out / "checkpoint.pt")["model"]
        for key, value in load_checkpoint(reference / "checkpoint.pt")["model"].items():
            assert torch.equal(done[key], value), key


# -- the harness: checkpoints carry a checksum --------------------------------------------------


def _flip_a_byte_inside_a_tensor(path) -> None:
    """Flip one byte in the middle of the largest tensor's data inside the checkpoint's zip."""
    with zipfile.ZipFile(path) as archive:
        info = max(
            (i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size
        )
    with open(path, "r+b") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        position = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
        handle.seek(position)
        byte = handle.read(1)
        handle.seek(position)
        handle.write(bytes([byte[0] ^ 0x10]))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from conftest import tiny

    from kalmannorm.lab.train import train

    out = tmp_path_factory.mktemp("finished")
    train(tiny(out, steps=4, eval_every=2))
    return out


def test_checkpoints_load_and_carry_their_checksum(finished_run) -> None:
    from kalmannorm.lab.train.checkpoint import CHECKSUM, load_checkpoint, state_checksum

    raw = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    saved = raw.pop(CHECKSUM)
    assert saved == state_checksum(raw)
    assert load_checkpoint(finished_run / "checkpoint.pt")["step"] == 4


@pytest.mark.parametrize(
    "damage", ["flipped byte", "truncated", "garbage", "empty", "a folder", "another pickle"]
)
def test_a_damaged_checkpoint_is_refused_in_one_line(
    tmp_path, finished_run, damage, capsys
) -> None:
    from kalmannorm.lab.cli import main
    from kalmannorm.lab.train.checkpoint import CheckpointCorruptError, load_checkpoint

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    path = run / "checkpoint.pt"
    if damage == "flipped byte":
        _flip_a_byte_inside_a_tensor(path)
        expected = "do not match the checksum"
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        expected = "does not read as a checkpoint"
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * 40)
        expected = "does not read as a checkpoint"
    elif damage == "empty":
        path.write_bytes(b"")
        expected = "does not read as a checkpoint"
    elif damage == "a folder":
        path.unlink()
        path.mkdir()
        expected = "does not read as a checkpoint"
    else:
        torch.save({"weights": torch.zeros(3)}, path)
        expected = "is not a kalmannorm checkpoint"
    with pytest.raises(CheckpointCorruptError, match=expected):
        load_checkpoint(path)
    (run / "summary.json").unlink()  # a run to resume, not a finished one
    args = ["train", "--out", str(run), "--resume", "--steps", "6"]
    if damage == "flipped byte":  # the real command line: one line, no traceback
        result = _cli(*args, timeout=120)
        code, stderr = result.returncode, result.stderr
    else:
        code, stderr = main(args), capsys.readouterr().err
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and expected in stderr, stderr
    assert "delete it" in stderr


def test_a_checkpoint_of_format_1_without_checksum_still_loads(tmp_path, finished_run) -> None:
    from kalmannorm.lab.train.checkpoint import CHECKSUM, load_checkpoint

    state = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    state.pop(CHECKSUM)
    state["format"] = 1
    torch.save(state, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["step"] == 4


# -- the harness: data-parallel accumulation passes ---------------------------------------------


@pytest.mark.parametrize(("processes", "passes"), [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (2, 4)])
def test_process_parts_make_each_pass_the_single_process_pass(processes, passes) -> None:
    from kalmannorm.lab.train.plan import plan_batches

    batch = 32
    single = plan_batches(batch, 2, 1, passes)
    plan = plan_batches(batch, 2, processes, passes)
    positions = torch.arange(batch)
    whole = positions[single.process_part(0)].split(single.per_pass)
    parts = [positions[plan.process_part(r)].split(plan.per_pass) for r in range(processes)]
    for j in range(passes):
        together = torch.cat([parts[r][j] for r in range(processes)])
        assert torch.equal(together.sort().values, whole[j].sort().values)
    every = torch.cat([positions[plan.process_part(r)] for r in range(processes)])
    assert torch.equal(every.sort().values, positions)


def test_a_second_ctrl_c_stops_at_once_a_forwarded_sigterm_does_not(monkeypatch) -> None:
    from kalmannorm.lab.train import loop

    clock = [100.0]
    monkeypatch.setattr(loop.time, "monotonic", lambda: clock[0])
    request = loop._StopRequest()
    request.saved_step = 40
    request(signal.SIGINT, None)
    request(signal.SIGTERM, None)  # torchrun's SIGTERM right after the terminal's SIGINT
    clock[0] += 0.5
    request(signal.SIGINT, None)  # the same keypress seen twice: still saving
    assert request.signum == signal.SIGINT
    clock[0] += 2.0
    with pytest.raises(loop.TrainingInterruptedError, match="without saving .* holds step 40"):
        request(signal.SIGINT, None)


def test_training_in_a_thread_installs_no_signal_handler(tmp_path) -> None:
    import threading

    from conftest import tiny

    from kalmannorm.lab.train import train

    before = signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=train, args=(tiny(tmp_path, steps=2, eval_every=2),))
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive() and (tmp_path / "summary.json").exists()
    assert signal.getsignal(signal.SIGINT) is before
