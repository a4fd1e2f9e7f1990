"""Cross-Iteration BatchNorm against its definition: BatchNorm with a window of one or during the
burn-in, the plain window average under a frozen convolution, the Taylor compensation against
autograd, per-channel rejection, checkpoints and resuming, the feeding convolution and errors."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import kalmannorm
from kalmannorm.baselines import (
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    GhostBatchNorm2d,
)
from kalmannorm.layers.cross_iteration import moment_gradients

DOUBLE = torch.float64


def conv_cbn(c_in=3, c_out=4, bias=True, **options):
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias)
    model = nn.Sequential(conv, CrossIterationBatchNorm2d(c_out, conv=conv, **options))
    return model.double()


def perturb(conv, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in conv.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def group_stats(z, s):
    """Per-group mean, biased variance and second moment of z (N, C, H, W): (G, C) each."""
    grouped = z.unflatten(0, (-1, s))
    mean = grouped.mean((1, 3, 4))
    var = grouped.var((1, 3, 4), correction=0)
    return mean, var, var + mean.square()


# -- equivalences with BatchNorm ---------------------------------------------------------------


@pytest.mark.parametrize("options", [{"window_size": 1}, {"window_size": 3, "burn_in": 5}])
def test_window_of_one_or_burn_in_is_batchnorm(options):
    model = conv_cbn(stat_batch_size=2, **options)
    reference = nn.Sequential(copy.deepcopy(model[0]), GhostBatchNorm2d(4, stat_batch_size=2))
    reference.double()
    reference[1].load_state_dict(model[1].state_dict(), strict=False)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, reference)]
    for step in range(4):
        x = torch.randn(6, 3, 4, 4, dtype=DOUBLE)
        outs = []
        for m, opt in zip((model, reference), optimizers):
            opt.zero_grad()
            xi = x.clone().requires_grad_(True)
            y = m(xi)
            (y * torch.arange(y.numel(), dtype=DOUBLE).view_as(y).sin()).sum().backward()
            opt.step()
            outs.append((y, xi.grad))
        torch.testing.assert_close(outs[0][0], outs[1][0], msg=f"step {step}")
        torch.testing.assert_close(outs[0][1], outs[1][1], msg=f"step {step}")
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)
    assert int(model[1].window_count) == 0 and model[1].window_stats.numel() == 0
    # And plain nn.BatchNorm2d with one group.
    single = conv_cbn(window_size=1)
    bn = nn.Sequential(copy.deepcopy(single[0]), nn.BatchNorm2d(4).double())
    x = torch.randn(4, 3, 3, 3, dtype=DOUBLE)
    torch.testing.assert_close(single(x), bn(x))
    single.eval(), bn.eval()
    torch.testing.assert_close(single(x), bn(x))


def test_burn_in_then_window_fills_and_is_used():
    model = conv_cbn(stat_batch_size=2, window_size=3, burn_in=2)
    layer = model[1]
    for step in range(1, 6):
        model(torch.randn(4, 3, 3, 3, dtype=DOUBLE))
        assert int(layer.cbn_step) == step
        assert int(layer.window_count) == max(0, step - 2)  # records from step 3 on
        stats = layer.last_statistics
        assert all(not t.requires_grad for t in stats)  # nothing keeps the graph alive
        if step <= 3:  # burn-in, then the first step after it (empty window): BatchNorm
            torch.testing.assert_close(stats.mean, stats.batch_mean)
        else:
            assert not torch.allclose(stats.mean, stats.batch_mean)
    assert layer.window_stats.shape == (2, 3, 2, 4)  # 2 records, 3 offsets, 2 groups, 4 channels


# -- the window average and its compensation ---------------------------------------------------


def test_frozen_convolution_gives_the_plain_average_of_the_window():
    model = conv_cbn(stat_batch_size=2, window_size=3)
    layer = model[1]
    history = []
    for _ in range(5):
        x = torch.randn(4, 3, 3, 3, dtype=DOUBLE)
        y = model(x)
        mean, _, second = group_stats(model[0](x).detach(), 2)
        history.append((mean, second))
    window = history[-3:]  # the current step and two records, each group its own window
    mean_bar = torch.stack([m for m, _ in window]).mean(0)
    var_bar = torch.stack([s for _, s in window]).mean(0) - mean_bar.square()
    torch.testing.assert_close(layer.last_statistics.mean, mean_bar)
    torch.testing.assert_close(layer.last_statistics.var, var_bar)
    torch.testing.assert_close(layer.last_statistics.batch_mean, history[-1][0])
    # The output is normalised with them.
    z = model[0](x).detach().unflatten(0, (2, 2))
    view = (2, 1, 4, 1, 1)
    expected = (z - mean_bar.view(view)) / (var_bar.view(view) + layer.eps).sqrt()
    expected = expected * layer.weight.view(1, 1, 4, 1, 1) + layer.bias.view(1, 1, 4, 1, 1)
    torch.testing.assert_close(y, expected.flatten(0, 1).detach())


def test_compensation_is_the_first_order_taylor_step_through_the_weight():
    model = conv_cbn(stat_batch_size=2, window_size=2)
    conv, layer = model
    u_old = torch.randn(4, 3, 5, 5, dtype=DOUBLE)
    model(u_old)  # one record, with the current weights
    old_weight = conv.weight.detach().clone().requires_grad_(True)
    old_bias = conv.bias.detach().clone().requires_grad_(True)
    perturb(conv, scale=0.05)
    past_mean, past_sq, exists = layer._compensated(DOUBLE)
    assert exists.all()
    # The mean is linear in (W, b): the compensated mean is the old batch's mean under the new
    # weights, exactly.
    new_mean, _, new_second = group_stats(conv(u_old).detach(), 2)
    torch.testing.assert_close(past_mean[0], new_mean)
    # The second moment: nu(W', b') + <dnu/dW, W - W'> + <dnu/db, b - b'> (autograd's).
    z = nn.functional.conv2d(u_old, old_weight, old_bias, padding=1)
    _, _, old_second = group_stats(z, 2)
    expected = torch.empty_like(old_second)
    delta_w = conv.weight.detach() - old_weight.detach()
    delta_b = conv.bias.detach() - old_bias.detach()
    for g in range(2):
        for c in range(4):
            gw, gb = torch.autograd.grad(
                old_second[g, c], (old_weight, old_bias), retain_graph=True
            )
            expected[g, c] = old_second[g, c] + (gw * delta_w).sum() + (gb * delta_b).sum()
    torch.testing.assert_close(past_sq[0], expected.detach())
    # It misses exactly the second-order term E[(conv(u; W - W', b - b'))^2] >= 0.
    _, _, second_order = group_stats(nn.functional.conv2d(u_old, delta_w, delta_b, padding=1), 2)
    torch.testing.assert_close(new_second - past_sq[0], second_order)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (6, 4, 5, 5)),
        (lambda: nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=2, bias=False), (6, 4, 7, 7)),
        (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (6, 4, 5, 5)),
        (lambda: nn.Conv2d(4, 6, (3, 1), padding="same"), (6, 4, 5, 4)),
        (lambda: nn.Conv1d(4, 6, 3), (6, 4, 7)),
        (lambda: nn.Linear(4, 6), (6, 4)),
    ],
)
def test_moment_gradients_equal_autograd(make, shape):
    layer = make().double()
    u = torch.randn(shape, dtype=DOUBLE)
    z = layer(u)
    groups, s = 3, 2
    count = s * z[0, 0].numel() if z.dim() > 2 else s
    grad_mean, grad_sq = moment_gradients(layer, u, z.detach(), groups, count)
    conv_groups = getattr(layer, "groups", 1)
    for g in range(groups):
        part = layer(u[g * s : (g + 1) * s])
        dims = (0, *range(2, part.dim()))
        mean_grad = torch.autograd.grad(part.mean(dims).sum(), layer.weight, retain_graph=True)[0]
        sq_grad = torch.autograd.grad(part.square().mean(dims).sum(), layer.weight)[0]
        per_channel = grad_mean[g].repeat_interleave(6 // conv_groups, 0)
        torch.testing.assert_close(per_channel.reshape(mean_grad.shape), mean_grad)
        torch.testing.assert_close(grad_sq[g].reshape(sq_grad.shape), sq_grad)


def test_records_with_negative_compensated_variance_are_rejected_per_channel():
    model = conv_cbn(stat_batch_size=2, window_size=2, bias=False)
    conv, layer = model
    model(torch.randn(4, 3, 3, 3, dtype=DOUBLE))
    with torch.no_grad():
        conv.weight[0].zero_()  # channel 0: nu~ = nu' + <2 E[z patch], -W'> = -nu' < 0
    past_mean, past_sq, _ = layer._compensated(DOUBLE)
    assert ((past_sq - past_mean.square())[0, :, 0] < 0).all()
    assert ((past_sq - past_mean.square())[0, :, 1:] >= 0).all()
    model(torch.randn(4, 3, 3, 3, dtype=DOUBLE))
    stats = layer.last_statistics
    torch.testing.assert_close(stats.mean[:, 0], stats.batch_mean[:, 0])  # record rejected
    torch.testing.assert_close(stats.var[:, 0], stats.batch_var[:, 0])
    torch.testing.assert_close(
        stats.mean[:, 1:], (stats.batch_mean[:, 1:] + past_mean[0, :, 1:]) / 2
    )


def normalise_groups(z, mean, var, layer, s=2):
    """(z - mean_g) / sqrt(var_g + eps) * gamma + beta for groups of s samples; (G, C) stats."""
    c = z.shape[1]
    view = (-1, 1, c, 1, 1)
    grouped = z.unflatten(0, (-1, s))
    y = (grouped - mean.view(view)) / (var.view(view) + layer.eps).sqrt()
    y = y * layer.weight.detach().view(1, 1, c, 1, 1) + layer.bias.detach().view(1, 1, c, 1, 1)
    return y.flatten(0, 1)


def test_training_steps_use_each_record_compensated_with_its_own_weights():
    """Real SGD steps (the weights move every step) with a window of k = 4 that evicts: each
    step normalises with mu_bar = (xbar_t + sum_tau mu_tau(W_t)) / n and
    sigma2_bar = (nu_t + sum_tau nu~_tau) / n - mu_bar^2 over the current batch and the three
    previous ones, where mu_tau(W_t) is the old batch's mean recomputed with the current weights
    (the mean is linear in W, so exact) and nu~_tau = nu_tau(W_t) - E[conv(u_tau; W_t - W_tau,
    b_t - b_tau)^2] (the first-order step omits exactly that term). The old statistics are
    constants for autograd, so the input gradient flows through the current batch's only, with
    weight 1/n. The moving averages follow the current batch alone:
    running <- 0.9 running + 0.1 (xbar_t, S_t m / (m - 1))."""
    torch.manual_seed(0)
    model = conv_cbn(stat_batch_size=2, window_size=4)
    conv, layer = model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    past = []  # (input, weight, bias) of every earlier step, oldest first
    running_mean, running_var = torch.zeros(4, dtype=DOUBLE), torch.ones(4, dtype=DOUBLE)
    moved = 0.0
    for step in range(7):
        x = torch.randn(4, 3, 5, 5, dtype=DOUBLE, requires_grad=True)
        weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
        optimizer.zero_grad()
        y = model(x)
        probe = torch.randn(y.shape, dtype=DOUBLE)
        (y * probe).sum().backward()

        x_ref = x.detach().clone().requires_grad_(True)
        z = nn.functional.conv2d(x_ref, weight, bias, padding=1)
        mean, var, second = group_stats(z, 2)
        means, seconds = [mean], [second]
        with torch.no_grad():
            for u, old_weight, old_bias in past[-3:]:
                old_z = nn.functional.conv2d(u, old_weight, old_bias, padding=1)
                old_mean, _, _ = group_stats(old_z, 2)
                new_mean, _, new_second = group_stats(
                    nn.functional.conv2d(u, weight, bias, padding=1), 2
                )
                _, _, omitted = group_stats(
                    nn.functional.conv2d(u, weight - old_weight, bias - old_bias, padding=1), 2
                )
                assert (new_second - omitted - new_mean.square() > 0).all()  # none rejected
                moved = max(moved, float((new_mean - old_mean).abs().max()))
                means.append(new_mean)
                seconds.append(new_second - omitted)
        mean_bar = torch.stack(means).mean(0)
        var_bar = torch.stack(seconds).mean(0) - mean_bar.square()
        expected = normalise_groups(z, mean_bar, var_bar, layer)
        torch.testing.assert_close(layer.last_statistics.mean, mean_bar.detach(), msg=f"{step}")
        torch.testing.assert_close(layer.last_statistics.var, var_bar.detach(), msg=f"{step}")
        torch.testing.assert_close(y.detach(), expected.detach(), msg=f"step {step}")
        (expected * probe).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, msg=f"input gradient, step {step}")

        running_mean = 0.9 * running_mean + 0.1 * mean.detach().mean(0)
        running_var = 0.9 * running_var + 0.1 * var.detach().mean(0) * 50 / 49
        torch.testing.assert_close(layer.running_mean, running_mean, msg=f"step {step}")
        torch.testing.assert_close(layer.running_var, running_var, msg=f"step {step}")
        past.append((x.detach(), weight, bias))
        optimizer.step()
    assert int(layer.window_count) == 7  # records 0..6 written, the window holds 4, 5, 6
    assert moved > 1e-2  # the weights moved enough for the compensation to matter


def test_gradcheck_with_a_full_window():
    model = conv_cbn(stat_batch_size=2, window_size=3)
    for seed in range(3):
        model(torch.randn(4, 3, 3, 3, dtype=DOUBLE))
        perturb(model[0], seed=seed)
    model[0].requires_grad_(False)  # compensation reads W without gradient, by design
    saved = copy.deepcopy(model[1].state_dict())
    names = ["1.weight", "1.bias"]

    def run(x, weight, bias):
        model[1].load_state_dict(saved)  # every call sees the same window
        return functional_call(model, {"1.weight": weight, "1.bias": bias}, (x,))

    x = torch.randn(4, 3, 3, 3, dtype=DOUBLE, requires_grad=True)
    params = [dict(model.named_parameters())[n].detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(run, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)
    run(x, *params)
    assert (model[1].last_statistics.mean != model[1].last_statistics.batch_mean).all()


# -- checkpoints and resuming ------------------------------------------------------------------


def _train(model, inputs, seed):
    outputs = []
    for i, x in enumerate(inputs):
        outputs.append(model(x))
        perturb(model[0], scale=0.02, seed=seed + i)
    return outputs


@pytest.mark.parametrize("done", [2, 5])
def test_state_dict_round_trip_resumes_burn_in_and_window(done):
    def build():
        torch.manual_seed(3)
        return conv_cbn(stat_batch_size=2, window_size=3, burn_in=3)

    model = build()
    inputs = [torch.randn(4, 3, 3, 3, dtype=DOUBLE) for _ in range(done + 4)]
    _train(model, inputs[:done], seed=0)
    saved = copy.deepcopy(model.state_dict())
    assert int(saved["1.cbn_step"]) == done
    resumed = build()
    resumed.load_state_dict(saved)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, msg=key)
    expected = _train(model, inputs[done:], seed=done)
    got = _train(resumed, inputs[done:], seed=done)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert int(resumed[1].window_count) == done + 4 - 3
    model.eval(), resumed.eval()
    torch.testing.assert_close(resumed(inputs[0]), model(inputs[0]))
    # A BatchNorm checkpoint loads strictly into a CBN layer (empty window, step 0).
    fresh = build()
    fresh[1].load_state_dict(nn.BatchNorm2d(4).double().state_dict())
    assert int(fresh[1].cbn_step) == 0 and fresh[1].window_stats.numel() == 0


def test_deepcopy_and_pickle_keep_the_model_own_convolution():
    model = conv_cbn(stat_batch_size=2, window_size=3)
    _train(model, [torch.randn(4, 3, 3, 3, dtype=DOUBLE) for _ in range(2)], seed=0)
    assert list(model[1].modules()) == [model[1]]  # the convolution is not a submodule
    assert not any(k.startswith("1.") and "conv" in k for k in model.state_dict())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(4, 3, 3, 3, dtype=DOUBLE)
    expected = copy.deepcopy(model)(x)
    for clone in (copy.deepcopy(model), loaded):
        assert clone[1].conv is clone[0] and clone[1].feeding.owner is clone[1]
        torch.testing.assert_close(clone(x), expected)
        assert int(clone[1].window_count) == 3
    assert int(model[1].window_count) == 2


# -- the feeding convolution and errors --------------------------------------------------------


class RegisteredAfter(nn.Module):
    """Registers its norm before the convolution that feeds it."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.norm(self.conv(x))


def test_conversion_finds_the_feeding_convolution_or_fails_clearly():
    model = kalmannorm.convert_norm(
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), "cbn"
    )
    assert model[3].conv is model[2] and model[3].layer_name == "3"
    with pytest.raises(ValueError, match=r"CrossIterationBatchNorm2d '0': no convolution/linear"):
        kalmannorm.convert_norm(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)), "cbn")
    with pytest.raises(ValueError, match="'norm': no convolution/linear .* is registered before"):
        kalmannorm.convert_norm(RegisteredAfter(), "cbn")
    x = torch.randn(4, 3, 2, 2)
    traced = kalmannorm.convert_norm(RegisteredAfter(), "cbn", example_input=x)
    assert traced.norm.conv is traced.conv
    traced(x).sum().backward()
    # Without a window nothing needs a convolution.
    alone = kalmannorm.convert_norm(nn.Sequential(nn.BatchNorm2d(3)), "cbn", window_size=1)
    assert alone[0](torch.randn(4, 3, 2, 2)).shape == (4, 3, 2, 2)


def test_training_without_a_feeding_convolution_or_with_the_wrong_one_fails_clearly():
    layer = CrossIterationBatchNorm2d(4)
    layer.eval()(torch.randn(2, 4, 2, 2))  # evaluation needs no convolution
    with pytest.raises(RuntimeError, match="has no feeding convolution.*attach_conv"):
        layer.train()(torch.randn(2, 4, 2, 2))
    pooled = nn.Sequential(nn.Conv2d(3, 4, 1), nn.MaxPool2d(2), nn.BatchNorm2d(4))
    kalmannorm.convert_norm(pooled, "cbn")
    with pytest.raises(RuntimeError, match=r"input has shape \(2, 4, 2, 2\) but its feeding"):
        pooled(torch.randn(2, 3, 4, 4))
    skipped = CrossIterationBatchNorm2d(4, conv=nn.Conv2d(3, 4, 1))
    with pytest.raises(RuntimeError, match="did not run before it"):
        skipped(torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match="normalises 4 channels but Conv2d"):
        layer.attach_conv(nn.Conv2d(3, 5, 1))
    with pytest.raises(TypeError, match="convolution .* or nn.Linear"):
        layer.attach_conv(nn.ConvTranspose2d(3, 4, 1))
    with pytest.raises(ValueError, match="window_size must be >= 1"):
        CrossIterationBatchNorm2d(4, window_size=0)


def test_linear_feeding_layer_and_batch_size_change_restarts_the_window():
    linear = nn.Linear(5, 3).double()
    model = nn.Sequential(linear, CrossIterationBatchNorm1d(3, conv=linear, stat_batch_size=2))
    model.double()
    for _ in range(3):
        model(torch.randn(6, 5, dtype=DOUBLE))
    assert int(model[1].window_count) == 3
    stats = model[1].last_statistics
    assert stats.mean.shape == (3, 3) and not torch.allclose(stats.mean, stats.batch_mean)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randn(4, 5, dtype=DOUBLE))
    assert any("window restarts" in str(w.message) for w in caught)
    assert int(model[1].window_count) == 1 and model[1].window_stats.shape[2] == 2
