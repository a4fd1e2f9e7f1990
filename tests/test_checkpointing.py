"""Activation checkpointing (torch.utils.checkpoint) over normalization layers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import kalmannorm

DOUBLE = torch.float64
KALMAN = ("bkn", "gkn")


class Blocks(nn.Module):
    """Four conv-norm-ReLU blocks; with ``segments`` the pairs (0, 1) and (2, 3) are
    checkpointed, so a Kalman layer's upstream is in the same or in another segment."""

    def __init__(self, norm: str, **options: object) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(
                nn.Sequential(
                    nn.Conv2d(8, 8, 3, padding=1),
                    kalmannorm.build_norm(norm, 8, **options),
                    nn.ReLU(),
                )
                for _ in range(4)
            )
        )
        self.checkpointed = False
        self.reentrant = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for pair in (self.blocks[:2], self.blocks[2:]):
            if self.checkpointed:
                x = checkpoint(pair, x, use_reentrant=self.reentrant)
            else:
                x = pair(x)
        return x.mean((2, 3))


def _twins(norm: str, **options: object) -> tuple[Blocks, Blocks]:
    torch.manual_seed(0)
    plain = Blocks(norm, **options).double()
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpointed = True
    for model in (plain, checkpointed):
        if norm in KALMAN:
            kalmannorm.link_chain(model, example_input=torch.randn(4, 8, 5, 5, dtype=DOUBLE))
        if norm == "cbn":
            for conv, layer, _ in model.blocks:
                layer.attach_conv(conv)
    return plain, checkpointed


def _step(model: Blocks, x: torch.Tensor) -> None:
    model.zero_grad()
    model(x).square().sum().backward()


@pytest.mark.parametrize(
    ("norm", "options"),
    [
        ("bkn", {"stat_batch_size": 2}),
        ("bkn", {"stat_batch_size": 2, "prior": "propagate"}),
        ("bkn", {"stat_batch_size": 2, "covariance": "full"}),
        ("gkn", {}),
        ("bn", {"stat_batch_size": 2}),
    ],
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["fused", "composite"])
def test_checkpointed_model_has_the_gradients_and_moving_averages_of_the_plain_one(
    norm: str, options: dict, channels_last: bool
) -> None:
    plain, checkpointed = _twins(norm, **options)
    x = torch.randn(4, 8, 5, 5, dtype=DOUBLE)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    for _ in range(2):  # the second step runs on moved moving averages and a second pass
        _step(plain, x)
        _step(checkpointed, x)
        for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            torch.testing.assert_close(q.grad, p.grad, msg=name)
        # the recomputation neither counts a batch twice nor moves an average again
        for (name, b), c in zip(plain.named_buffers(), checkpointed.buffers()):
            torch.testing.assert_close(c, b, msg=name)
    if norm in KALMAN:
        # the prior's gradient crosses segment boundaries: the transition/gain of every linked
        # layer gets one
        linked = [m for m in checkpointed.modules() if getattr(m, "chain_index", 0) > 0]
        assert len(linked) == 3
        assert all(m.gain_logit is None or m.gain_logit.grad.abs().sum() > 0 for m in linked)


def test_reentrant_checkpointing_is_refused_for_linked_kalman_layers() -> None:
    _, checkpointed = _twins("bkn", stat_batch_size=2)
    checkpointed.reentrant = True
    x = torch.randn(4, 8, 5, 5, dtype=DOUBLE, requires_grad=True)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        checkpointed(x).sum().backward()


def test_recomputing_an_earlier_pass_is_refused() -> None:
    # two forward passes, then one backward through both: the first pass's recomputation
    # cannot replay the statistics its layers took in that pass
    _, checkpointed = _twins("bkn", stat_batch_size=2)
    first, second = (torch.randn(4, 8, 5, 5, dtype=DOUBLE) for _ in range(2))
    loss = checkpointed(first).sum() + checkpointed(second).sum()
    with pytest.raises(RuntimeError, match="recomputed a forward pass other than"):
        loss.backward()


@pytest.mark.parametrize("norm", ["brn", "cbn"])
def test_stateful_baselines_refuse_recomputation(norm: str) -> None:
    _, checkpointed = _twins(norm, stat_batch_size=2)
    x = torch.randn(4, 8, 5, 5, dtype=DOUBLE)
    with pytest.raises(RuntimeError, match="outside checkpointed segments"):
        checkpointed(x).sum().backward()


def test_torchvision_resnet_with_checkpoint_sequential_matches_the_plain_model() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    plain = kalmannorm.convert_norm(
        torchvision.models.resnet18(weights=None, num_classes=5), "bkn", stat_batch_size=2
    ).double()
    checkpointed = copy.deepcopy(plain)
    x = torch.randn(4, 3, 32, 32, dtype=DOUBLE)
    kalmannorm.link_chain(checkpointed, example_input=x)
    # segments must not start with an in-place ReLU (a torch.utils.checkpoint limitation)
    stem = nn.Sequential(checkpointed.conv1, checkpointed.bn1, checkpointed.relu)
    stages = nn.Sequential(checkpointed.maxpool, checkpointed.layer1, checkpointed.layer2)
    head = nn.Sequential(checkpointed.layer3, checkpointed.layer4, checkpointed.avgpool)
    plain(x).square().sum().backward()
    stem_out = checkpoint(stem, x, use_reentrant=False)
    features = torch.utils.checkpoint.checkpoint_sequential(
        stages, 2, stem_out, use_reentrant=False
    )
    pooled = checkpoint(head, features, use_reentrant=False).flatten(1)
    checkpointed.fc(pooled).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    for (name, b), c in zip(plain.named_buffers(), checkpointed.buffers()):
        torch.testing.assert_close(c, b, msg=name)


def test_compiled_checkpointed_model_matches_the_plain_one() -> None:
    # Under torch.compile the checkpoint is a higher-order op that refuses the chain hand-over's
    # side effects unless told not to replay them in the backward, which is what a
    # recomputation must do anyway.
    plain, checkpointed = _twins("bkn", stat_batch_size=2)
    compiled = torch.compile(checkpointed, fullgraph=True)
    x = torch.randn(4, 8, 5, 5, dtype=DOUBLE)
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        for _ in range(2):
            plain.zero_grad()
            checkpointed.zero_grad()
            plain(x).square().sum().backward()
            compiled(x).square().sum().backward()
            for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
                torch.testing.assert_close(q.grad, p.grad, msg=name)
            for (name, b), c in zip(plain.named_buffers(), checkpointed.buffers()):
                torch.testing.assert_close(c, b, msg=name)
