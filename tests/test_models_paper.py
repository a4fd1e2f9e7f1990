"""The paper's networks (CIFAR Inception, BN-Inception) and torchvision models by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kalmannorm
from kalmannorm.lab.models import BNInception, InceptionCifar, build_model


def test_cifar_inception_follows_the_papers_table() -> None:
    model = build_model("inception_cifar", num_classes=10, in_channels=3)
    assert isinstance(model, InceptionCifar)
    x = torch.randn(2, 3, 32, 32)
    stem = model.stem(x)
    assert stem.shape == (2, 32, 16, 16)  # conv, 32 filters, 16x16
    widths = [m.out_channels for m in (model.inception1, model.inception2, model.inception3)]
    assert widths == [256, 480, 512]
    branch = model.inception2
    assert [
        branch.branch1[0].out_channels,
        branch.branch3[0][0].out_channels,
        branch.branch3[1][0].out_channels,
        branch.branch5[0][0].out_channels,
        branch.branch5[1][0].out_channels,
        branch.branch_pool[1][0].out_channels,
    ] == [128, 128, 192, 32, 96, 64]
    assert model.inception3(model.inception2(model.inception1(stem))).shape[2:] == (16, 16)
    assert model(x).shape == (2, 10)
    assert model.head[1].out_features == 1000  # the fully connected layer the table omits


def test_cifar_inception_converts_in_execution_order() -> None:
    x = torch.randn(4, 3, 32, 32)
    by_registration = kalmannorm.convert_norm(
        build_model("inception_cifar"), "bkn", stat_batch_size=2
    )
    traced = kalmannorm.convert_norm(
        build_model("inception_cifar"), "bkn", stat_batch_size=2, example_input=x
    )
    names = kalmannorm.find_chain(traced).names
    assert names == kalmannorm.find_chain(by_registration).names and len(names) == 1 + 3 * 6
    by_registration(x).sum().backward()


def test_bn_inception_widths() -> None:
    model = build_model("bn_inception", num_classes=1000)
    assert isinstance(model, BNInception)
    widths = [m.out_channels for m in model.inception]
    assert widths == [256, 320, 576, 576, 576, 608, 608, 1056, 1024, 1024]
    assert 10.5e6 < sum(p.numel() for p in model.parameters()) < 12e6  # ~11M
    model.eval()
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 1000)


def test_torchvision_models_by_name() -> None:
    pytest.importorskip("torchvision")
    model = build_model("tv:resnet18", num_classes=7, in_channels=1)  # greyscale -> 3 channels
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    converted = kalmannorm.convert_norm(model, "bkn", stat_batch_size=2)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    resnet101 = build_model("resnet101", num_classes=1000)
    assert 44e6 < sum(p.numel() for p in resnet101.parameters()) < 45e6
    with pytest.raises(ValueError, match="unknown torchvision model 'resnet9000'.*resnet50"):
        build_model("tv:resnet9000")
