"""A training step never waits for the device (issue 17): no host synchronisation.

Counted through a dispatch mode (:mod:`kalmannorm._dispatch_count`): every ATen call of one
forward + backward + optimizer step, and among them the ones that hand a value to the host
(``aten._local_scalar_dense`` behind ``item()``/``bool(t)``/``if t``, ``aten.equal``,
``nonzero``, ...). The counts are those of the dispatcher, the same on any device, so a count of
zero here is zero on a GPU: torch's BatchNorm makes none, and neither do the library's norms.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import conv_bn_stack
from torch import nn

import kalmannorm
from kalmannorm._dispatch_count import _is_blocking_transfer, count_dispatch

#: norms with statistics groups (the rest normalise per sample)
_STAT_BATCH = {"bkn", "bkn-flow", "bn", "brn", "cbn", "mabn"}


def _options(norm: str) -> dict:
    return {"stat_batch_size": 2} if norm in _STAT_BATCH else {}


def _counted_step(model: nn.Module, x: torch.Tensor, warmup: int = 2):
    """Counts of one training step (forward, backward, SGD step) after ``warmup`` steps (the
    first forward traces the chain and reads, once per layer, what later steps keep)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    model.train()
    for _ in range(warmup):
        step()
    with count_dispatch() as counts:
        step()
    return counts


def test_the_counter_sees_each_kind_of_host_read() -> None:
    t = torch.randn(5)
    with count_dispatch() as counts:
        t.sum().item()
        bool(t[0] > 0)
        float(t.max())
        if (t > 0).any():
            pass
        torch.equal(t, t)
        t.nonzero()
        t[t > 0]
        t.sum() * 2  # not a sync
    assert counts.host_syncs == 7, counts.syncs
    assert counts.syncs["equal"] == counts.syncs["nonzero"] == counts.syncs["index"] == 1
    assert counts.aten_calls > counts.host_syncs


def test_blocking_copies_between_host_and_device_are_syncs() -> None:
    # (no device here: the predicate is given the arguments a copy to or from one has)
    cpu, pinned = torch.randn(3), torch.randn(3)
    pinned.is_pinned = lambda: True
    cuda = torch.device("cuda")
    assert _is_blocking_transfer("_to_copy", (cpu,), {"device": cuda})
    assert not _is_blocking_transfer("_to_copy", (pinned,), {"device": cuda, "non_blocking": True})
    assert not _is_blocking_transfer("_to_copy", (cpu,), {"device": torch.device("cpu")})
    assert not _is_blocking_transfer("_to_copy", (cpu,), {"dtype": torch.float64})
    assert not _is_blocking_transfer("_to_copy", (cpu,), {"device": torch.device("meta")})


def test_torch_batchnorm_makes_no_sync() -> None:
    counts = _counted_step(conv_bn_stack(dtype=torch.float32), torch.randn(4, 3, 6, 6))
    assert counts.host_syncs == 0, counts.syncs


@pytest.mark.parametrize("norm", ["bkn", "bkn-flow", "bn", "gkn", "cbn", "brn", "mabn"])
def test_a_training_step_of_a_converted_resnet18_never_syncs(norm) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = kalmannorm.convert_norm(torchvision.models.resnet18(), norm, **_options(norm))
    counts = _counted_step(model, torch.randn(4, 3, 64, 64), warmup=1)
    assert counts.host_syncs == 0, f"{norm}: {dict(counts.syncs)}"


_CORE_CASES = [
    ("bkn", {}),
    ("bkn", {"flow": "authors"}),
    ("bkn", {"flow": "execution"}),
    ("bkn", {"flow": "execution", "prior": "propagate"}),
    ("bkn", {"covariance": "full"}),
    ("bkn", {"calibrate_prior": True}),
    ("bkn", {"momentum": None}),
    ("bkn-flow", {}),
    ("bn", {}),
    ("bn", {"momentum": None}),
    ("gkn", {}),
    ("cbn", {}),
    ("brn", {}),
    ("mabn", {}),
]


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["float32", "float64", "bf16"]
)
@pytest.mark.parametrize(("norm", "options"), _CORE_CASES, ids=lambda v: str(v))
def test_a_training_step_never_syncs(norm, options, dtype) -> None:
    """Fused (contiguous) and composite (channels-last) paths, every chain flow and prior,
    and evaluation with batch statistics."""
    options = {**_options(norm), **options}
    momentum = options.pop("momentum", 0.1)  # None: cumulative averages (1 / steps)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        model = conv_bn_stack((3, 8, 8, 8), dtype=dtype)
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.momentum = momentum
        model = kalmannorm.convert_norm(model, norm, **options)
        x = torch.randn(4, 3, 6, 6, dtype=dtype).to(memory_format=memory_format)
        model.to(memory_format=memory_format)
        counts = _counted_step(model, x)
        assert counts.host_syncs == 0, f"{memory_format}: {dict(counts.syncs)}"
        model.eval()
        kalmannorm.set_eval_statistics(model, "batch")
        with count_dispatch() as counts:
            model(x)
        assert counts.host_syncs == 0, f"eval, batch statistics: {dict(counts.syncs)}"


def test_check_finite_is_the_opt_in_sync_one_per_layer() -> None:
    """``check_finite=True`` reads one flag per Kalman layer per step (for a clear error at the
    layer that sees NaN first); the default reads none and lets NaN reach the loss."""
    model = kalmannorm.convert_norm(
        conv_bn_stack((3, 8, 8, 8), dtype=torch.float32), "bkn", stat_batch_size=2,
        check_finite=True,
    )  # fmt: skip
    counts = _counted_step(model, torch.randn(4, 3, 6, 6))
    assert counts.syncs == {"_local_scalar_dense": 3}
    default = kalmannorm.convert_norm(conv_bn_stack(dtype=torch.float32), "bkn", stat_batch_size=2)
    bad = torch.randn(4, 3, 6, 6)
    bad[0, 0, 0, 0] = float("nan")
    assert default(bad).isnan().any()
    with pytest.raises(FloatingPointError, match="BatchKalmanNorm2d '1'.*NaN or Inf"):
        model(bad)


class _SmoothNet(nn.Module):
    """Zero-padded convolutions, a padded average pool and smooth activations (quadrature)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(),
            nn.AvgPool2d(3, 1, 1), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
            nn.Hardswish(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_a_training_step_converts_no_constant(dtype) -> None:
    """No ``_to_copy`` in a step: the data-flow prior's tap geometries and quadrature nodes lie
    on the model's device in its statistics' dtype (on a GPU, a CPU constant converted in each
    pass is a blocking host-to-device copy: one stream synchronisation each)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = kalmannorm.convert_norm(_SmoothNet(), "bkn-flow", stat_batch_size=2, example_input=x)
    model.to(dtype)  # the constants follow the model
    program = kalmannorm.find_chain(model).programs[2]
    assert program is not None  # the last layer predicts through the pool and activations
    counts = _counted_step(model, x.to(dtype))
    assert counts.calls["_to_copy"] == 0, dict(counts.calls)


def test_the_prior_s_constants_follow_the_model_to_empty_and_back() -> None:
    x = torch.randn(4, 3, 8, 8)
    model = kalmannorm.convert_norm(_SmoothNet(), "bkn-flow", stat_batch_size=2, example_input=x)
    reference = copy.deepcopy(model)
    expected = reference(x)
    model.to("meta")
    conv = _operations(model, "conv")[0]
    assert conv.info["geometry"].valid.device.type == "meta"
    model.to_empty(device="cpu").load_state_dict(reference.state_dict())
    torch.testing.assert_close(model(x), expected)  # the constants are the built ones again
    assert conv.info["geometry"].valid.dtype == torch.float32


def _operations(model: nn.Module, op: str) -> list:
    from kalmannorm.dataflow import Operation

    found, pending = [], [p for p in kalmannorm.find_chain(model).programs if p is not None]
    while pending:
        node = pending.pop()
        if isinstance(node, Operation) and node.op == op:
            found.append(node)
        pending.extend(node.children)
    return found
