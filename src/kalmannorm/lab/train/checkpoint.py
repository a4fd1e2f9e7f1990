"""Checkpoints: everything a run needs to continue bit for bit, written atomically, checksummed.

A checkpoint holds the model (its ``state_dict`` carries the norm layers' state: moving
statistics, and schedules or windows kept as buffers), the optimizer, the learning-rate
scheduler, each process's random generator states, the step (from which the data order and
augmentation are recomputed: they are pure functions of seed, epoch and step), the training
meters since the last evaluation, and the run's configuration fingerprint. It is written to a
temporary file in the same folder and renamed over the old one (``os.replace`` is atomic), so a
process killed at any moment leaves either the previous or the new checkpoint, never a torn one.
It loads with ``torch.load(weights_only=True)``: only tensors and plain Python values inside.

Each checkpoint carries the SHA-256 of its contents (every tensor's bytes, dtype and shape, and
every plain value), checked on loading: a flipped byte inside a tensor, which torch's reader does
not notice, is refused, and so is a truncated or garbage file, each with one line saying what to
do.

A run folder is used by one process at a time: :func:`lock_run_folder` holds an exclusive
``fcntl.flock`` on ``<out>/.lock`` for the whole run; a second process on the same folder is
refused (:class:`RunFolderBusyError`) before it writes anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kalmannorm.lab.errors import UserError
from kalmannorm.lab.train.config import TrainConfig, differences, fingerprint

FORMAT = 2  # 2: with the "sha256" checksum; format 1 (no checksum) still loads
_FORMATS = (1, 2)
CHECKSUM = "sha256"
LOCK = ".lock"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used; the message says why and what to do."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint written under another configuration."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint that does not read, or whose contents do not match its checksum."""


class RunFolderBusyError(UserError, RuntimeError):
    """Another process holds the run folder's lock."""


# -- the checksum -----------------------------------------------------------------------------


def state_checksum(state: Any) -> str:
    """SHA-256 of a checkpoint's contents: each tensor's dtype, shape and bytes, and the
    ``repr`` of each plain value, in the state's (saved and restored) order."""
    digest = hashlib.sha256()
    _feed(digest, state)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}:".encode())
        digest.update(_tensor_bytes(tensor))
    elif isinstance(value, dict):
        digest.update(b"{")
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):  # a tuple may come back as a list: the same here
        digest.update(b"[")
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    else:
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def _tensor_bytes(tensor: torch.Tensor) -> bytes | memoryview:
    flat = tensor.reshape(-1).view(torch.uint8)
    try:
        return memoryview(flat.numpy())
    except (ImportError, RuntimeError):  # torch without numpy
        return bytes(flat.tolist())


def _to_cpu(value: Any) -> Any:
    """The state with every tensor on the CPU (one copy, shared by the checksum and the file)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_cpu(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_to_cpu(item) for item in value)
    return value


# -- writing and reading ----------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` with its checksum to ``path`` atomically (temp file, fsync, rename)."""
    contents = _to_cpu({"format": FORMAT, **state})
    contents[CHECKSUM] = state_checksum(contents)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(contents, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint (tensors and plain values only: ``weights_only=True``) and check its
    checksum.

    Raises:
        CheckpointCorruptError: the file does not read (truncated, garbage, not a checkpoint)
            or its contents do not match their checksum.
    """
    path = Path(path)
    fix = (
        "delete it (or restore a copy) to start the run again; without a checkpoint "
        "--resume starts from step 0"
    )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch's readers raise many types: EOF, zip, unpickling, ...
        reason = (str(error).strip().splitlines() or [""])[0][:160]
        raise CheckpointCorruptError(
            f"{path} does not read as a checkpoint ({type(error).__name__}: {reason}): it is "
            f"truncated or corrupt; {fix}"
        ) from None
    if not isinstance(state, dict) or state.get("format") not in _FORMATS:
        raise CheckpointCorruptError(
            f"{path} is not a kalmannorm checkpoint of format {FORMAT}; {fix}"
        )
    if state["format"] >= 2:
        saved = state.pop(CHECKSUM, None)
        if saved != state_checksum(state):
            raise CheckpointCorruptError(
                f"{path} is corrupt: its contents do not match the checksum written with it "
                f"(a disk, copy or transfer error); {fix}"
            )
    return state


def remove_stale_temporaries(folder: Path) -> None:
    """Delete temporary files left by a process killed while writing a checkpoint; a temporary
    of a process still alive is left alone."""
    for tmp in folder.glob(".*.tmp"):
        if not _written_by_live_process(tmp):
            tmp.unlink(missing_ok=True)


def _written_by_live_process(tmp: Path) -> bool:
    """Whether ``.<name>.<pid>.tmp`` names a process that still runs (not this one)."""
    try:
        pid = int(tmp.name.rsplit(".", 2)[-2])
    except (ValueError, IndexError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextlib.contextmanager
def lock_run_folder(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run folder ``folder`` (``<folder>/.lock``) while the
    ``with`` block runs; released when it ends or the process dies.

    Raises:
        RunFolderBusyError: another process holds it.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    handle = open(folder / LOCK, "a+")  # noqa: SIM115 (held for the whole block)
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunFolderBusyError(
                f"{folder} is in use by another kalmannorm run ({holder}); wait for it to "
                f"finish (then --resume), or choose another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def check_fingerprint(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint whose configuration differs, listing the differences.

    Keys added to the configuration since the checkpoint was written count at their defaults.
    """
    diffs = differences(fingerprint(TrainConfig()) | saved, current)
    if diffs:
        raise CheckpointMismatchError(
            f"{path} was written by a run with another configuration; differing keys "
            f"(checkpoint -> now):\n  " + "\n  ".join(diffs) + "\nResume with the same "
            "configuration (e.g. --config <run>/config.toml) or start a new --out folder."
        )


def capture_rng() -> dict[str, Any]:
    """This process's random generator states (torch CPU and CUDA, Python's ``random``)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
