"""Faults and bad input: nothing lost, nothing silent (issue 16).

The layers: half-precision models train with float32 statistics; an empty batch gives an empty
output (as torch's BatchNorm) and changes no state. The harness: a non-finite loss or weight never
reaches a checkpoint; a run folder takes one process at a time; SIGINT/SIGTERM save and exit;
checkpoints carry a checksum; data-parallel accumulation equals one process.
"""

from __future__ import annotations

import copy

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


_STAT_BATCH = {"bkn", "bn", "brn", "cbn", "mabn"}
_EMPTY_NORMS = [n for n in kalmannorm.available_norms() if n != "in"]  # "in": torch's own layer


@pytest.mark.parametrize("stat_batch_size", [None, 2])
@pytest.mark.parametrize("norm", _EMPTY_NORMS)
def test_empty_batch_gives_an_empty_output_and_changes_nothing(norm, stat_batch_size) -> None:
    if stat_batch_size is not None and norm not in _STAT_BATCH:
        pytest.skip("a batch-independent norm")
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
