"""The reference models: shapes, sizes, the registry, and a BKN training step."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as torch_f

import kalmannorm
from kalmannorm.lab.models import (
    MODELS,
    PreActResNet,
    SmallCNN,
    available_models,
    build_model,
    preact_resnet20,
    preact_resnet32,
    preact_resnet56,
    preact_resnet110,
)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("in_channels", "size"), [(3, 32), (1, 28), (1, 8)], ids=["cifar", "mnist", "digits"]
)
def test_small_cnn_shapes(in_channels: int, size: int) -> None:
    model = SmallCNN(in_channels=in_channels, num_classes=7, width=8)
    out = model(torch.randn(4, in_channels, size, size))
    assert out.shape == (4, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("in_channels", "size"), [(3, 32), (1, 28)], ids=["cifar", "mnist"])
def test_preact_resnet_shapes(in_channels: int, size: int) -> None:
    model = preact_resnet20(num_classes=100, in_channels=in_channels)
    out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 100)


def test_preact_resnet20_structure() -> None:
    model = preact_resnet20()
    # He et al.: ResNet-20 has about 0.27M parameters (ours adds two 1x1 projections).
    assert 265_000 < _count(model) < 280_000
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == 20
    projections = [
        m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
    ]
    assert [(p.in_channels, p.out_channels, p.stride) for p in projections] == [
        (16, 32, (2, 2)),
        (32, 64, (2, 2)),
    ]
    # Pre-activation: 2 norms per unit plus the final one, all plain BatchNorm2d.
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2 * 9 + 1


def test_deeper_resnets_grow_with_depth() -> None:
    counts = [_count(f()) for f in (preact_resnet20, preact_resnet32, preact_resnet56)]
    assert counts == sorted(counts)
    assert 0.84e6 < counts[2] < 0.87e6
    assert preact_resnet110().depth == 110


def test_preact_resnet_rejects_bad_depth() -> None:
    with pytest.raises(ValueError, match="6n \\+ 2"):
        PreActResNet(21)


def test_width_scales_channels() -> None:
    model = PreActResNet(8, num_classes=3, in_channels=1, width=4)
    assert model.fc.in_features == 16
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)


def test_build_model_registry() -> None:
    assert set(available_models()) == set(MODELS)
    model = build_model("small_cnn", num_classes=5, in_channels=1)
    assert isinstance(model, SmallCNN)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 5)
    resnet = build_model("preact_resnet20", num_classes=10, in_channels=1)
    assert isinstance(resnet, PreActResNet) and resnet.depth == 20
    assert resnet.conv1.in_channels == 1


def test_build_model_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet9000'") as info:
        build_model("resnet9000", 10, 3)
    for name in available_models():
        assert name in str(info.value)


def test_registration_order_is_execution_order() -> None:
    """Linking by registration order gives the same chain as a traced pass."""
    x = torch.randn(4, 3, 32, 32)
    by_registration = kalmannorm.convert_norm(preact_resnet20(), "bkn", stat_batch_size=2)
    traced = kalmannorm.convert_norm(preact_resnet20(), "bkn", stat_batch_size=2, example_input=x)
    names = kalmannorm.find_chain(by_registration).names
    assert names == kalmannorm.find_chain(traced).names
    assert len(names) == 19


@pytest.mark.parametrize("name", ["preact_resnet20", "small_cnn"])
def test_bkn_training_step(name: str) -> None:
    torch.manual_seed(0)
    model = kalmannorm.convert_norm(build_model(name, 10, 3), "bkn", stat_batch_size=2)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    chain = kalmannorm.find_chain(model)
    assert chain is not None and len(chain) > 1
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch_f.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    # The Kalman parameters of linked layers get gradients: the prior path is exercised.
    second = chain.layers[1]
    assert second.transition is not None and second.transition.grad is not None
    assert second.gain_logit.grad is not None and torch.isfinite(second.gain_logit.grad).all()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    stats = kalmannorm.kalman_statistics(model)
    assert stats[chain.names[1]].posterior_mean.shape[0] == 4  # 8 samples / s=2
    with torch.no_grad():
        assert torch.isfinite(torch_f.cross_entropy(model(x), y))
