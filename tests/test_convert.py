"""convert_norm on real torchvision models, FrozenBatchNorm2d included, and the registry."""

import copy

import pytest
import torch
from torch import nn

import kalmannorm
from kalmannorm.lab.models import PreActResNet

torchvision = pytest.importorskip("torchvision")


def _train_step(model, x):
    out = model(x)
    logits = out.logits if hasattr(out, "logits") else out
    loss = logits.float().logsumexp(-1).mean()
    if hasattr(out, "aux_logits") and out.aux_logits is not None:
        loss = loss + out.aux_logits.logsumexp(-1).mean()
    loss.backward()
    return loss


def _round_trip(build, model, x):
    fresh = build()
    fresh.load_state_dict(copy.deepcopy(model.state_dict()))
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_resnet50_bkn_forward_backward_eval_state_dict():
    def build():
        return kalmannorm.convert_norm(
            torchvision.models.resnet50(weights=None), "bkn", stat_batch_size=2
        )

    model = build()
    assert sum(isinstance(m, kalmannorm.BatchKalmanNorm2d) for m in model.modules()) == 53
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    chain = kalmannorm.find_chain(model)
    assert chain.names[:4] == ["bn1", "layer1.0.bn1", "layer1.0.bn2", "layer1.0.bn3"]
    # data-flow chain: a diagonal transition on each layer's own channels
    assert model.layer1[0].bn2.transition.shape == (64,)
    assert model.layer2[0].bn1.transition.shape == (128,)
    x = torch.randn(4, 3, 32, 32)
    loss = _train_step(model, x)
    assert torch.isfinite(loss)
    assert model.layer4[2].bn3.transition.grad is not None
    assert model.conv1.weight.grad.abs().sum() > 0
    _round_trip(build, model, x)


def test_resnet50_registration_order_equals_traced_order():
    x = torch.randn(2, 3, 32, 32)
    registered = kalmannorm.convert_norm(torchvision.models.resnet50(weights=None), "bkn")
    traced = kalmannorm.convert_norm(
        torchvision.models.resnet50(weights=None), "bkn", example_input=x
    )
    assert kalmannorm.find_chain(registered).names == kalmannorm.find_chain(traced).names


def test_inception_v3_with_auxiliary_head():
    def build():
        net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
        return kalmannorm.convert_norm(net, "bkn", stat_batch_size=2)

    model = build()
    x = torch.randn(2, 3, 299, 299)
    assert torch.isfinite(_train_step(model, x))
    assert model.AuxLogits.conv0.bn.transition.grad is not None
    _round_trip(build, model, x)


def test_resnet_gkn_trains_and_matches_group_norm_layout():
    model = kalmannorm.convert_norm(torchvision.models.resnet18(weights=None), "gkn")
    # 64 channels: 8 groups of 8 (docs/baselines.md, "GroupNorm's group count")
    assert model.bn1.num_groups == 8 and model.layer1[0].bn2.transition.shape == (8, 8)
    assert model.layer4[0].bn1.num_groups == 32
    assert torch.isfinite(_train_step(model, torch.randn(1, 3, 64, 64)))


def test_frozen_batchnorm_detection_model_trains_a_step():
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    backbone = resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=5
    )
    with torch.no_grad():
        backbone.body.bn1.running_mean.fill_(0.25)
    model = FasterRCNN(backbone, num_classes=3, min_size=96, max_size=128)
    kalmannorm.convert_norm(model, "bkn", stat_batch_size=1)
    body = model.backbone.body
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert isinstance(body.bn1, kalmannorm.BatchKalmanNorm2d) and body.bn1.weight.requires_grad
    torch.testing.assert_close(body.bn1.running_mean, torch.full((64,), 0.25))
    model.train()
    images = [torch.rand(3, 96, 112), torch.rand(3, 96, 128)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[5.0, 5.0, 40.0, 50.0]]), "labels": torch.tensor([2])},
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = body.layer1[0].bn1.weight.detach().clone()
    losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, body.layer1[0].bn1.weight.detach())
    assert body.layer1[0].bn1.last_statistics.posterior_mean.shape == (2, 64)
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and "boxes" in detections[0]


def test_checkpoint_of_another_model_is_refused_clearly():
    small = kalmannorm.convert_norm(torchvision.models.resnet18(weights=None), "bkn")
    large = kalmannorm.convert_norm(torchvision.models.resnet34(weights=None), "bkn")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        small.load_state_dict(large.state_dict())
    wide = kalmannorm.convert_norm(PreActResNet(20, width=32), "bkn")
    with pytest.raises(
        RuntimeError, match=r"BatchKalmanNorm2d 'layer1.0.bn1'.*other channel counts"
    ):
        wide.load_state_dict(PreActResNet(20, width=16).state_dict())


def test_registry_names_and_unknown_name():
    names = kalmannorm.available_norms()
    assert {"bkn", "gkn"} <= set(names)
    with pytest.raises(ValueError, match="unknown norm 'kn'; registered norms: .*bkn"):
        kalmannorm.convert_norm(nn.Sequential(nn.BatchNorm2d(3)), "kn")
    layer = kalmannorm.build_norm("bkn", 8, dims=1, stat_batch_size=4)
    assert isinstance(layer, kalmannorm.BatchKalmanNorm1d) and layer.stat_batch_size == 4
    with pytest.raises(ValueError, match="already registered"):
        kalmannorm.register_norm("bkn", "again")(lambda source: None)


@pytest.mark.parametrize("name", ["gn", "gkn", "frn", "ln"])
def test_a_per_sample_norm_refuses_stat_batch_size_in_one_line(name):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    with pytest.raises(TypeError, match=f"'{name}' computes each sample's statistics on its own"):
        kalmannorm.convert_norm(model, name, stat_batch_size=2)
    assert isinstance(model[1], nn.BatchNorm2d)  # nothing converted
    kalmannorm.convert_norm(model, name)


def test_a_batchnorm_root_is_returned_converted():
    converted = kalmannorm.convert_norm(nn.BatchNorm1d(5), "bkn")
    assert isinstance(converted, kalmannorm.BatchKalmanNorm1d)
    assert kalmannorm.find_chain(converted).names == [""]


def test_build_norm_passes_eps_to_norms_with_their_own_default() -> None:
    # FRN's default eps is its paper's 1e-6, not BatchNorm's; a given eps must reach it
    assert float(kalmannorm.build_norm("frn", 8).eps) == pytest.approx(1e-6)
    assert float(kalmannorm.build_norm("frn", 8, eps=1e-3).eps) == pytest.approx(1e-3)
    assert kalmannorm.build_norm("bn", 8, eps=1e-3).eps == pytest.approx(1e-3)
    assert kalmannorm.build_norm("bkn", 8, eps=1e-3).eps == pytest.approx(1e-3)
