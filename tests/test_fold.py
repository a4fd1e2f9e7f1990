"""fold(): eval-mode outputs preserved, no Kalman layer left, exportable."""

import pytest
import torch
from conftest import randomize_kalman
from torch import nn

import kalmannorm
from kalmannorm.fold import ChannelAffine, fold
from kalmannorm.lab.models import SmallCNN, preact_resnet20
from kalmannorm.layers.base import KalmanNormBase


def _trained(model: nn.Module, x: torch.Tensor, steps: int = 3) -> nn.Module:
    """A few training forwards so that moving statistics are not trivial."""
    randomize_kalman(model, seed=1)
    with torch.no_grad():
        for _ in range(steps):
            model(x + torch.randn_like(x))
    return model.eval()


def _kalman_layers(model):
    return [m for m in model.modules() if isinstance(m, KalmanNormBase)]


@pytest.mark.parametrize("build", [lambda: SmallCNN(3, 10, 8), lambda: preact_resnet20()])
def test_fold_preserves_eval_outputs_and_removes_norms(build):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    model = _trained(kalmannorm.convert_norm(build(), "bkn", stat_batch_size=2), x)
    folded = fold(model)
    assert not _kalman_layers(folded)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    # The original model is untouched and still a training model.
    assert _kalman_layers(model)


def test_conv_bn_pairs_fold_into_the_convolution():
    x = torch.randn(4, 3, 16, 16)
    model = _trained(kalmannorm.convert_norm(SmallCNN(3, 10, 8), "bkn", stat_batch_size=2), x)
    folded = fold(model)
    assert not any(isinstance(m, ChannelAffine) for m in folded.modules())  # all conv-BN pairs
    n_conv = sum(isinstance(m, nn.Conv2d) for m in folded.modules())
    assert n_conv == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    preact = fold(
        _trained(kalmannorm.convert_norm(preact_resnet20(), "bkn"), torch.randn(4, 3, 8, 8))
    )
    # Pre-activation blocks normalise block inputs (sums), which become affine maps.
    assert any(isinstance(m, ChannelAffine) for m in preact.modules())


def test_batch_statistics_norms_are_kept_and_untraceable_models_get_affines():
    x = torch.randn(4, 3, 16, 16)
    model = _trained(kalmannorm.convert_norm(SmallCNN(3, 10, 8), "bkn", stat_batch_size=2), x)
    kalmannorm.set_eval_statistics(model, "batch")
    assert len(_kalman_layers(fold(model))) == 4
    # one-sample groups: the default "auto" evaluates with each sample's statistics, kept too
    single = _trained(kalmannorm.convert_norm(SmallCNN(3, 10, 8), "bkn", stat_batch_size=1), x)
    assert len(_kalman_layers(fold(single))) == 4
    kalmannorm.set_eval_statistics(single, "moving")
    assert not _kalman_layers(fold(single))

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: torch.fx cannot trace this
                x = -x
            return self.bn(self.conv(x))

    branchy = _trained(kalmannorm.convert_norm(Branchy(), "bkn"), x)
    folded = fold(branchy)
    assert isinstance(folded.bn, ChannelAffine)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), branchy(x), rtol=1e-4, atol=1e-5)


def test_folded_model_exports_with_torch_export():
    x = torch.randn(2, 3, 16, 16)
    model = _trained(kalmannorm.convert_norm(preact_resnet20(), "bkn", stat_batch_size=2), x)
    folded = fold(model)
    exported = torch.export.export(folded, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-4, atol=1e-5)


def test_folded_model_exports_to_onnx(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    x = torch.randn(2, 3, 16, 16)
    model = _trained(kalmannorm.convert_norm(SmallCNN(3, 10, 8), "bkn", stat_batch_size=2), x)
    path = tmp_path / "folded.onnx"
    torch.onnx.export(fold(model), (x,), str(path), dynamo=True)
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert "Conv" in ops and "BatchNormalization" not in ops
    onnx.checker.check_model(onnx.load(str(path)))


@pytest.mark.parametrize("flow", ["data", "execution"])
def test_fold_keeps_batch_statistics_layers_predicting_from_folded_ones(flow):
    from kalmannorm.lab.models import preact_resnet20

    torch.manual_seed(0)
    x = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    model = kalmannorm.convert_norm(
        preact_resnet20(10, 1).double(), "bkn", stat_batch_size=2, example_input=x, flow=flow
    )
    model.train()
    for _ in range(2):
        model(torch.randn(8, 1, 16, 16, dtype=torch.float64))
    model.eval()
    for name, layer in model.named_modules():
        if name.endswith("bn2"):  # half the layers evaluate with batch statistics
            layer.eval_statistics = "batch"
    with torch.no_grad():
        expected = model(x)
        folded = kalmannorm.fold(model)
        torch.testing.assert_close(folded(x), expected)
        torch.testing.assert_close(folded(x), expected)  # and again: the hand-over resets
