"""Optimizer parameter groups for the Kalman parameters (kalmannorm.optim) and the harness key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import tiny
from torch import nn

import kalmannorm
from kalmannorm.lab.train import train
from kalmannorm.lab.train.checkpoint import CheckpointMismatchError, check_fingerprint
from kalmannorm.lab.train.config import TrainConfig, fingerprint


def _model(norm: str = "bkn") -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU()]
    layers += [nn.Conv2d(6, 6, 3), nn.BatchNorm2d(6)]
    return kalmannorm.convert_norm(nn.Sequential(*layers), norm, stat_batch_size=2)


def test_groups_split_the_parameters_once_each() -> None:
    model = _model()
    others, kalman = kalmannorm.parameter_groups(
        model, 0.1, 5e-4, kalman_lr_scale=10, kalman_weight_decay=0
    )
    second = model[4]  # the linked layer: its q, R, A; the first layer has none
    assert {id(p) for p in kalman["params"]} == {
        id(second.gain_logit),
        id(second.noise_raw),
        id(second.transition),
    }
    assert len(others["params"]) + len(kalman["params"]) == len(list(model.parameters()))
    assert not {id(p) for p in others["params"]} & {id(p) for p in kalman["params"]}
    assert (others["lr"], others["weight_decay"]) == (0.1, 5e-4)
    assert (kalman["lr"], kalman["weight_decay"]) == pytest.approx((1.0, 0.0))
    # a model without Kalman parameters gets one group
    assert len(kalmannorm.parameter_groups(_model("bn"), 0.1, 0.0)) == 1
    with pytest.raises(ValueError, match="kalman_lr_scale must be positive"):
        kalmannorm.parameter_groups(model, 0.1, 0.0, kalman_lr_scale=0)


def test_scaled_group_moves_the_kalman_parameters_that_many_times_as_far() -> None:
    x = torch.randn(4, 3, 8, 8)
    steps = {}
    for scale in (1.0, 10.0):
        model = _model()
        before = [p.detach().clone() for p in kalmannorm.kalman_parameters(model)]
        rest = [p.detach().clone() for p in model[0].parameters()]
        optimizer = torch.optim.SGD(
            kalmannorm.parameter_groups(model, 0.01, 0.0, kalman_lr_scale=scale), lr=0.01
        )
        model(x).square().mean().backward()
        optimizer.step()
        after = kalmannorm.kalman_parameters(model)
        steps[scale] = (
            [a.detach() - b for a, b in zip(after, before)],
            [p.detach() - b for p, b in zip(model[0].parameters(), rest)],
        )
    for small, large in zip(steps[1.0][0], steps[10.0][0]):
        assert small.abs().sum() > 0
        torch.testing.assert_close(large, 10 * small)
    for small, large in zip(steps[1.0][1], steps[10.0][1]):
        torch.testing.assert_close(large, small)  # the other parameters are unchanged


def test_harness_trains_the_kalman_parameters_at_their_own_rate(tmp_path: Path) -> None:
    config = tiny(tmp_path / "run", kalman_lr_scale=10.0, kalman_weight_decay=0.0, steps=2)
    train(dataclasses.replace(config, eval_every=2))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert len(groups) == 2
    assert groups[1]["lr"] == pytest.approx(10 * groups[0]["lr"])
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (config.weight_decay, 0.0)


def test_resume_takes_keys_added_since_the_checkpoint_at_their_defaults(tmp_path: Path) -> None:
    current = fingerprint(TrainConfig())
    older = {k: v for k, v in current.items() if k != "kalman_lr_scale"}
    check_fingerprint(tmp_path, older, current)  # written before the key existed: accepted
    changed = fingerprint(dataclasses.replace(TrainConfig(), kalman_lr_scale=10.0))
    with pytest.raises(CheckpointMismatchError, match="kalman_lr_scale: 1.0 -> 10.0"):
        check_fingerprint(tmp_path, older, changed)
