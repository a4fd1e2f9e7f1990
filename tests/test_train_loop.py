"""The training loop's step reads nothing back from the device: the loss and accuracy of each
step stay there until the next evaluation or checkpoint, where the non-finite guard reads them
in one transfer and still reports the step a divergence happened at."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny
from torch.utils._python_dispatch import TorchDispatchMode


class _HostReads(TorchDispatchMode):
    """Counts device-to-host reads: ``aten._local_scalar_dense`` (``item``, ``float``, ``int``,
    ``bool`` of a tensor) and ``tolist``/``numpy`` (which on CPU bypass the dispatcher)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def __enter__(self):
        for name, original in self.originals.items():

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                self.reads.append(_name)
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


# torch's own norms (plain BN: "none", GroupNorm): the layers read nothing, so what is counted
# is the loop's own step
@pytest.mark.parametrize(("norm", "passes"), [("none", 1), ("none", 2), ("gn", 2)])
def test_a_training_step_reads_nothing_back_from_the_device(
    tmp_path, monkeypatch, norm, passes
) -> None:
    from kalmannorm.lab.train import loop, train

    step, per_step = loop._step, []

    def counted(run, x, y):
        with _HostReads() as reads:
            step(run, x, y)
        per_step.append(len(reads.reads))

    monkeypatch.setattr(loop, "_step", counted)
    config = tiny(tmp_path, norm=norm, stat_batch_size=None, steps=6, eval_every=3)
    config.accumulation_steps = passes
    config.progress = "log"
    train(config)
    assert per_step == [0] * 6
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    assert all(0 < r["train_loss"] < 10 and 0 <= r["train_acc"] <= 1 for r in records)


def test_a_non_finite_loss_found_steps_later_is_reported_at_its_step(tmp_path, monkeypatch):
    from kalmannorm.lab.train import loop, train
    from kalmannorm.lab.train.checkpoint import load_checkpoint

    step, calls = loop._train_step, []

    def poisoned(model, optimizer, x, y, plan):
        calls.append(1)
        if len(calls) == 7:  # the loss goes NaN at step 7, weights untouched
            losses, correct = step(model, optimizer, x, y, plan)
            return losses * float("nan"), correct
        return step(model, optimizer, x, y, plan)

    monkeypatch.setattr(loop, "_train_step", poisoned)
    config = tiny(tmp_path, norm="bn", steps=12, eval_every=5)
    with pytest.raises(loop.DivergedError, match=r"at step 7: the training loss is nan") as info:
        train(config)
    assert "resume from step 5" in str(info.value)
    assert len(calls) == 10  # found at the checkpoint of step 10, which is not written
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 5


def test_the_progress_bar_reads_the_loss_at_most_once_a_second(tmp_path, monkeypatch) -> None:
    pytest.importorskip("tqdm")
    from kalmannorm.lab.train import metrics

    clock = [0.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: clock[0])
    log = metrics.MetricsLog(tmp_path, True, 0, 10, "bar")
    reads = []

    class Losses:  # a step's losses on the device: reading them is what costs
        def sum(self):
            reads.append(clock[0])
            return torch.tensor(0.75)

    for _ in range(5):
        log.step(Losses())
        clock[0] += 0.3
    log.close()
    assert reads == [0.0, pytest.approx(1.2)]
