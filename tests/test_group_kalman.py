"""GroupKalmanNorm against GroupNorm, a direct Eq. (5) on group statistics, and gradcheck."""

import pytest
import torch
from conftest import conv_bn_stack, randomize_kalman
from torch import nn
from torch.func import functional_call

import kalmannorm
from kalmannorm import GroupKalmanNorm


def test_first_layer_is_group_norm_forward_and_backward():
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    gn = nn.GroupNorm(3, 6).double()
    gkn = GroupKalmanNorm(3, 6).double()
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
        gn.bias.normal_()
        gkn.weight.copy_(gn.weight)
        gkn.bias.copy_(gn.bias)
    grad = torch.randn_like(x)
    (gx_ref,) = torch.autograd.grad(gn(x), x, grad)
    (gx,) = torch.autograd.grad(gkn(x), x, grad)
    torch.testing.assert_close(gkn(x), gn(x))
    torch.testing.assert_close(gx, gx_ref)


def test_linked_layer_applies_eq5_to_per_sample_group_statistics():
    model = kalmannorm.convert_norm(conv_bn_stack((2, 4, 6)), "gkn", num_groups=2)
    randomize_kalman(model, seed=1)
    captured = {}

    def capture(module, inputs):
        captured["x"] = inputs[0].detach()

    model[4].register_forward_pre_hook(capture)
    out = model(torch.randn(3, 2, 3, 3, dtype=torch.float64))
    first, second = model[1].last_statistics, model[4].last_statistics
    x = captured["x"]
    groups = x.reshape(3, 2, -1)
    xbar, s2 = groups.mean(-1), groups.var(-1, unbiased=False)
    a, r, q = model[4].transition.detach(), model[4].noise.detach(), model[4].gain.detach()
    prior_mean = first.posterior_mean @ a.T
    prior_var = first.posterior_var @ (a * a).T + r
    mean = (1 - q) * prior_mean + q * xbar
    var = (1 - q) * prior_var + q * s2 + q * (1 - q) * (xbar - prior_mean) ** 2
    torch.testing.assert_close(second.posterior_mean, mean)
    torch.testing.assert_close(second.posterior_var, var)
    normalised = (groups - mean.unsqueeze(-1)) / (var.unsqueeze(-1) + 1e-5).sqrt()
    expected = normalised.reshape_as(x) * model[4].weight.view(1, -1, 1, 1) + model[4].bias.view(
        1, -1, 1, 1
    )
    torch.testing.assert_close(out, expected.detach())


def test_gradcheck_gkn_chain():
    model = kalmannorm.convert_norm(conv_bn_stack((2, 4, 4)), "gkn", num_groups=2)
    randomize_kalman(model, seed=2)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())

    def run(inp, *flat):
        return functional_call(model, dict(zip(names, flat)), (inp,))

    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)
    assert model[4].transition.shape == (2, 2)


def test_train_and_eval_compute_the_same():
    model = kalmannorm.convert_norm(conv_bn_stack((2, 4, 4)), "gkn", num_groups=2)
    randomize_kalman(model, seed=3)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    train_out = model(x)
    model.eval()
    torch.testing.assert_close(model(x), train_out)


def test_group_count_must_divide_channels():
    with pytest.raises(ValueError, match="divisible by num_groups"):
        GroupKalmanNorm(3, 8)
    with pytest.raises(ValueError, match=r"expects input \(N, 8"):
        GroupKalmanNorm(2, 8)(torch.randn(2, 4, 3, 3))
    default_num_groups = kalmannorm.convert.default_num_groups
    # at most 32 groups of at least 8 channels (GN paper, Table 3); min_channels=1: the old rule
    channels = (4, 12, 16, 48, 64, 256, 2048)
    assert [default_num_groups(c) for c in channels] == [1, 1, 2, 6, 8, 32, 32]
    assert default_num_groups(48, min_channels=1) == 24
    assert default_num_groups(16, min_channels=1) == 16
    assert default_num_groups(16, min_channels=4) == 4
    with pytest.raises(ValueError, match="min_channels_per_group must be a positive"):
        default_num_groups(16, min_channels=0)
    model = kalmannorm.convert_norm(conv_bn_stack((2, 16, 48)), "gkn")
    assert [m.num_groups for m in model if isinstance(m, GroupKalmanNorm)] == [2, 6]
    model = kalmannorm.convert_norm(conv_bn_stack((2, 16)), "gkn", min_channels_per_group=1)
    assert model[1].num_groups == 16
    with pytest.raises(ValueError, match="gkn: num_groups=3 does not divide the 16 channels"):
        kalmannorm.convert_norm(conv_bn_stack((2, 16)), "gkn", num_groups=3)


def _run_and_grads(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    node = type(out.grad_fn).__name__
    out.backward(out.detach() + 1.0)  # a non-trivial upstream gradient
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out.detach().contiguous(), x.grad.contiguous(), grads, node


@pytest.mark.parametrize("affine", [True, False])
def test_fused_path_equals_composite_path(affine):
    model = kalmannorm.convert_norm(conv_bn_stack((3, 4, 6, 6)), "gkn", num_groups=2)
    for layer in model.modules():
        if isinstance(layer, GroupKalmanNorm) and not affine:
            layer.weight, layer.bias, layer.affine = None, None, False
    randomize_kalman(model, seed=5)
    x = torch.randn(3, 3, 4, 5, dtype=torch.float64)
    fused = _run_and_grads(model, x)
    assert fused[3] == "FusedGroupNormBackward"
    stats = model[7].last_statistics
    # channels_last activations are not NCHW-contiguous: every layer takes the composite path.
    model.to(memory_format=torch.channels_last)
    composite = _run_and_grads(model, x.to(memory_format=torch.channels_last))
    assert composite[3] != "FusedGroupNormBackward"
    torch.testing.assert_close(fused[0], composite[0])
    torch.testing.assert_close(fused[1], composite[1])
    assert fused[2].keys() == composite[2].keys()
    assert any("transition" in name for name in fused[2])
    for name in fused[2]:
        torch.testing.assert_close(fused[2][name], composite[2][name], msg=name)
    for a, b in zip(stats, model[7].last_statistics):
        if a is not None:
            torch.testing.assert_close(a, b)


def test_fused_path_on_feature_vectors_gradcheck():
    model = nn.Sequential(
        nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4), nn.BatchNorm1d(4)
    ).double()
    kalmannorm.convert_norm(model, "gkn", num_groups=2)
    randomize_kalman(model, seed=6)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert type(model(x).grad_fn).__name__ == "FusedGroupNormBackward"
    assert model[4].transition.shape == (2, 2)
    assert torch.autograd.gradcheck(model, (x,), eps=1e-6, atol=1e-5)
