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
    assert kalmannorm.convert.default_num_groups(48) == 24
    assert kalmannorm.convert.default_num_groups(64) == 32
