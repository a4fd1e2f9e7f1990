"""BatchKalmanNorm against BatchNorm, against an independent Eq. (5) reference, and gradcheck."""

import copy

import pytest
import torch
from conftest import conv_bn_stack, randomize_kalman
from torch import nn
from torch.func import functional_call

import kalmannorm
from kalmannorm import BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d
from kalmannorm.chain import Posterior


def _bn_forward_backward(module, x, grad):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(grad)
    return y, x.grad


def test_layer_without_upstream_is_batchnorm_forward_backward_and_running_stats():
    x = torch.randn(8, 5, 4, 4, dtype=torch.float64)
    grad = torch.randn_like(x)
    bn = nn.BatchNorm2d(5).double()
    bkn = BatchKalmanNorm2d(5).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    bkn.load_state_dict(bn.state_dict())
    y_ref, gx_ref = _bn_forward_backward(bn, x, grad)
    y, gx = _bn_forward_backward(bkn, x, grad)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(bkn.weight.grad, bn.weight.grad)
    torch.testing.assert_close(bkn.bias.grad, bn.bias.grad)
    torch.testing.assert_close(bkn.running_mean, bn.running_mean)
    torch.testing.assert_close(bkn.running_var, bn.running_var)
    bn.eval(), bkn.eval()
    torch.testing.assert_close(bkn(x), bn(x))


def test_gain_one_makes_every_layer_of_a_chain_batchnorm():
    torch.manual_seed(1)
    reference = conv_bn_stack()
    model = kalmannorm.convert_norm(
        copy.deepcopy(reference), "bkn", flow="execution", gain=1.0, learn_gain=False
    )
    randomize_kalman(model, affine=False)  # A and R are irrelevant when q = 1
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    grad = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    y_ref, gx_ref = _bn_forward_backward(reference, x, grad)
    y, gx = _bn_forward_backward(model, x, grad)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    for (name, p), (_, p_ref) in zip(
        [(n, p) for n, p in model.named_parameters() if n.split(".")[-1] in ("weight", "bias")],
        reference.named_parameters(),
    ):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=name)


def test_statistics_groups_equal_batchnorm_on_each_group():
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    grad = torch.randn_like(x)
    bkn = BatchKalmanNorm2d(4, stat_batch_size=2).double()
    y, gx = _bn_forward_backward(bkn, x, grad)
    means, variances = [], []
    for g in range(3):
        part = slice(2 * g, 2 * g + 2)
        bn = nn.BatchNorm2d(4, momentum=1.0).double()
        y_ref, gx_ref = _bn_forward_backward(bn, x[part], grad[part])
        torch.testing.assert_close(y[part], y_ref)
        torch.testing.assert_close(gx[part], gx_ref)
        means.append(bn.running_mean)
        variances.append(bn.running_var)
    # Moving averages: one EMA step towards the mean over groups of BN's per-group update.
    torch.testing.assert_close(bkn.running_mean, 0.1 * torch.stack(means).mean(0))
    torch.testing.assert_close(bkn.running_var, 0.9 + 0.1 * torch.stack(variances).mean(0))


def _reference_chain(inputs, layers, eps):
    """Eq. (5) by loops over groups, channels and values; no library code."""
    outputs, posteriors = [], []
    previous = None
    for x, layer in zip(inputs, layers):
        n, c = x.shape[:2]
        s = layer.stat_batch_size
        q = layer.gain.tolist() if layer.gain is not None else None
        a = layer.transition.tolist() if layer.transition is not None else None
        r = layer.noise.tolist() if layer.noise is not None else None
        y = torch.empty_like(x)
        post = []
        for g in range(n // s):
            group_post = []
            for ch in range(c):
                values = x[g * s : (g + 1) * s, ch].flatten().tolist()
                xbar = sum(values) / len(values)
                svar = sum((v - xbar) ** 2 for v in values) / len(values)
                if previous is None:
                    mu, var = xbar, svar
                else:
                    up = previous[g]
                    prior_mu = sum(a[ch][j] * up[j][0] for j in range(len(up)))
                    prior_var = sum(a[ch][j] ** 2 * up[j][1] for j in range(len(up))) + r[ch]
                    p = 1 - q[ch]
                    mu = p * prior_mu + q[ch] * xbar
                    var = p * prior_var + q[ch] * svar + p * q[ch] * (xbar - prior_mu) ** 2
                group_post.append((mu, var))
                w, b = layer.weight[ch].item(), layer.bias[ch].item()
                y[g * s : (g + 1) * s, ch] = (x[g * s : (g + 1) * s, ch] - mu) / (
                    var + eps
                ) ** 0.5 * w + b
            post.append(group_post)
        outputs.append(y)
        posteriors.append(post)
        previous = post
    return outputs, posteriors


def test_three_layer_chain_matches_independent_reference():
    model = kalmannorm.convert_norm(conv_bn_stack(), "bkn", flow="execution", stat_batch_size=2)
    randomize_kalman(model, seed=3)
    layers = [m for m in model if isinstance(m, BatchKalmanNorm2d)]
    captured_in, captured_out = [], []

    def capture(module, inputs, output):
        captured_in.append(inputs[0].detach())
        captured_out.append(output.detach())

    for layer in layers:
        layer.register_forward_hook(capture)
    model(torch.randn(4, 3, 3, 3, dtype=torch.float64))
    outputs, posteriors = _reference_chain(captured_in, layers, layers[0].eps)
    for layer, out, ref_out, post in zip(layers, captured_out, outputs, posteriors):
        torch.testing.assert_close(out, ref_out)
        stats = layer.last_statistics
        torch.testing.assert_close(
            stats.posterior_mean,
            torch.tensor([[m for m, _ in g] for g in post], dtype=torch.float64),
        )
        torch.testing.assert_close(
            stats.posterior_var,
            torch.tensor([[v for _, v in g] for g in post], dtype=torch.float64),
        )
    assert layers[0].last_statistics.prior_mean is None
    assert layers[2].last_statistics.prior_mean.shape == (2, 2)


def _gradcheck_model(model, x):
    """gradcheck w.r.t. the input and every parameter (the Kalman ones included)."""
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())

    def run(inp, *flat):
        return functional_call(model, dict(zip(names, flat)), (inp,))

    assert torch.autograd.gradcheck(
        run, (x.requires_grad_(True), *params), eps=1e-6, atol=1e-5, fast_mode=True
    )
    return names


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_gradcheck_chain_into_transition_noise_gain_and_upstream(covariance):
    model = kalmannorm.convert_norm(
        conv_bn_stack((2, 3, 2)), "bkn", stat_batch_size=2, covariance=covariance
    )
    randomize_kalman(model, seed=5)
    names = _gradcheck_model(model, torch.randn(4, 2, 3, 3, dtype=torch.float64))
    assert {"4.transition", "4.noise_raw", "4.gain_logit"} <= set(names)


def test_gradients_reach_upstream_layers_through_the_prior():
    model = kalmannorm.convert_norm(conv_bn_stack((2, 3, 2)), "bkn", stat_batch_size=2)
    randomize_kalman(model, seed=2)
    model(torch.randn(4, 2, 3, 3, dtype=torch.float64)).sum().backward()
    # The sum of a BN output depends on the input only through beta; under BKN the downstream
    # posterior depends on the upstream layer, so conv 0's weight gets a gradient from layer 3.
    assert model[0].weight.grad.abs().sum() > 0
    assert model[4].transition.grad.abs().sum() > 0


def test_gradcheck_propagate_variant():
    model = kalmannorm.convert_norm(
        conv_bn_stack((2, 3, 2)), "bkn", stat_batch_size=2, prior="propagate", guard=1e9
    )
    randomize_kalman(model, seed=4)
    _gradcheck_model(model, torch.randn(4, 2, 3, 3, dtype=torch.float64))
    assert model[4].last_statistics.prior_mean is not None


def test_propagate_guard_falls_back_to_batch_statistics():
    model = kalmannorm.convert_norm(
        conv_bn_stack((2, 3, 2)), "bkn", stat_batch_size=2, prior="propagate"
    )
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    model(x)
    stats = model[4].last_statistics
    ratio = (stats.prior_var / stats.batch_var).mean(-1)
    expected = torch.where(ratio < 100, 0.1, 1.0)
    torch.testing.assert_close(stats.gain[:, 0], expected.to(stats.gain.dtype))
    model[4].guard = 0.0  # every group rejected: the layer is BatchNorm per group
    model(x)
    stats = model[4].last_statistics
    torch.testing.assert_close(stats.posterior_var, stats.batch_var)


def test_moving_averages_converge_to_population_statistics():
    torch.manual_seed(0)
    true_mean = torch.tensor([2.0, -1.0, 0.5])
    true_std = torch.tensor([0.5, 3.0, 1.0])
    layer = BatchKalmanNorm2d(3, stat_batch_size=4, momentum=0.05)
    for _ in range(600):
        layer(true_mean.view(1, 3, 1, 1) + true_std.view(1, 3, 1, 1) * torch.randn(16, 3, 2, 2))
    torch.testing.assert_close(layer.running_mean, true_mean, atol=0.1, rtol=0)
    torch.testing.assert_close(layer.running_var, true_std**2, rtol=0.1, atol=0)


def test_eval_with_batch_statistics_uses_test_groups():
    model = kalmannorm.convert_norm(conv_bn_stack(), "bkn", flow="execution", stat_batch_size=2)
    randomize_kalman(model)
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    train_out = model(x)
    model.eval()
    kalmannorm.set_eval_statistics(model, "batch")
    before = model[1].running_mean.clone()
    torch.testing.assert_close(model(x), train_out)
    torch.testing.assert_close(model[1].running_mean, before)
    kalmannorm.set_eval_statistics(model, "moving")
    assert not torch.allclose(model(x), train_out)


def test_auto_eval_uses_each_samples_statistics_with_one_sample_groups():
    """The default ``eval_statistics="auto"``: with groups of one sample, eval normalises each
    sample with its own posterior (as training did, without touching the moving averages);
    with larger groups it uses the moving statistics."""
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    one = kalmannorm.convert_norm(conv_bn_stack(), "bkn-flow", stat_batch_size=1)
    randomize_kalman(one)
    assert {m.eval_statistics for m in one.modules() if hasattr(m, "eval_statistics")} == {"auto"}
    train_out = one(x)
    before = one[1].running_mean.clone()
    one.eval()
    torch.testing.assert_close(one(x), train_out)
    torch.testing.assert_close(one(x[2:3]), train_out[2:3])  # independent of the other samples
    torch.testing.assert_close(one[1].running_mean, before)
    kalmannorm.set_eval_statistics(one, "moving")
    assert not torch.allclose(one(x), train_out)

    two = kalmannorm.convert_norm(conv_bn_stack(), "bkn-flow", stat_batch_size=2)
    randomize_kalman(two)
    two(x)
    two.eval()
    moving = two(x)
    kalmannorm.set_eval_statistics(two, "moving")
    torch.testing.assert_close(two(x), moving)
    with pytest.raises(ValueError, match="eval_statistics must be one of"):
        kalmannorm.set_eval_statistics(two, "population")


def test_last_statistics_are_detached_and_do_not_keep_graphs():
    model = kalmannorm.convert_norm(
        conv_bn_stack(dtype=torch.float32), "bkn", flow="execution", stat_batch_size=2
    )
    model(torch.randn(4, 3, 3, 3))
    for stats in kalmannorm.kalman_statistics(model).values():
        for value in stats:
            assert value is None or (not value.requires_grad and value.grad_fn is None)
    assert set(kalmannorm.kalman_statistics(model)) == {"1", "4", "7"}


@pytest.mark.parametrize(
    "cls, shape",
    [
        (BatchKalmanNorm1d, (4, 3)),
        (BatchKalmanNorm1d, (4, 3, 5)),
        (BatchKalmanNorm3d, (4, 3, 2, 2, 2)),
    ],
)
def test_1d_and_3d_variants_equal_batchnorm(cls, shape):
    ref_cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 5: nn.BatchNorm3d}[len(shape)]
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(cls(3).double()(x), ref_cls(3).double()(x))


# -- bad input ---------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors():
    layer = BatchKalmanNorm2d(4, stat_batch_size=2)
    with pytest.raises(ValueError, match="expects 4D input"):
        layer(torch.randn(4, 4, 3))
    with pytest.raises(ValueError, match="built for 4 channels but the input has 3"):
        layer(torch.randn(4, 3, 2, 2))
    with pytest.raises(ValueError, match="not divisible by stat_batch_size=2"):
        layer(torch.randn(5, 4, 2, 2))
    with pytest.raises(ValueError, match="variance is undefined"):
        BatchKalmanNorm1d(4, stat_batch_size=1)(torch.randn(4, 4))
    # Non-finite inputs: the check is opt-in (it reads a flag to the host, one sync per layer
    # per step); by default a NaN passes through to the output, as with torch's BatchNorm.
    bad = torch.randn(4, 4, 2, 2)
    bad[1, 2, 0, 0] = float("nan")
    assert layer(bad)[:2, 2].isnan().all()
    checked = BatchKalmanNorm2d(4, stat_batch_size=2, check_finite=True)
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        checked(bad)
    bad[1, 2, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        checked(bad)
    with pytest.raises(ValueError, match="stat_batch_size must be a positive"):
        BatchKalmanNorm2d(4, stat_batch_size=0)
    for wrong in (True, 2.0):  # not silently taken as 1 or 2
        with pytest.raises(TypeError, match="stat_batch_size must be an int or None"):
            BatchKalmanNorm2d(4, stat_batch_size=wrong)
    with pytest.raises(ValueError, match="learn_gain=False"):
        BatchKalmanNorm2d(4, gain=1.0)


def test_errors_name_the_layer_in_a_converted_model():
    model = kalmannorm.convert_norm(
        conv_bn_stack(dtype=torch.float32), "bkn", flow="execution", stat_batch_size=2,
        check_finite=True,
    )  # fmt: skip
    x = torch.randn(4, 3, 3, 3)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="BatchKalmanNorm2d '1'"):
        model(x)


def test_state_dict_round_trip_and_batchnorm_checkpoint():
    reference = conv_bn_stack(dtype=torch.float32)
    bn_checkpoint = copy.deepcopy(reference.state_dict())
    model = kalmannorm.convert_norm(
        copy.deepcopy(reference), "bkn", flow="execution", stat_batch_size=2
    )
    # A plain BatchNorm checkpoint loads strictly; the Kalman parameters keep their init.
    model.load_state_dict(bn_checkpoint)
    randomize_kalman(model, seed=7)
    model(torch.randn(4, 3, 3, 3))
    saved = copy.deepcopy(model.state_dict())
    assert "4.transition" in saved and saved["4.transition"].shape == (5, 4)
    fresh = kalmannorm.convert_norm(
        conv_bn_stack(dtype=torch.float32), "bkn", flow="execution", stat_batch_size=2
    )
    fresh.load_state_dict(saved)
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, saved[key], msg=key)
    x = torch.randn(4, 3, 3, 3)
    fresh.eval(), model.eval()
    torch.testing.assert_close(fresh(x), model(x))


def test_loading_a_checkpoint_of_another_shape_names_layer_and_fix():
    model = kalmannorm.convert_norm(conv_bn_stack(dtype=torch.float32), "bkn", flow="execution")
    other = kalmannorm.convert_norm(conv_bn_stack((3, 6, 5, 2), dtype=torch.float32), "bkn")
    with pytest.raises(RuntimeError, match=r"BatchKalmanNorm2d '1'.*other channel counts"):
        model.load_state_dict(other.state_dict())


def test_propagate_without_a_matching_convolution_warns_and_uses_the_batch():
    # The second convolution takes 5 channels, so it cannot carry the upstream's 4.
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(5, 6, 1), nn.BatchNorm2d(6)
    )
    with pytest.warns(UserWarning, match="uses its batch statistics alone"):
        kalmannorm.convert_norm(model, "bkn", flow="execution", prior="propagate")
    upstream = Posterior(torch.zeros(1, 4), torch.ones(1, 4))
    assert model[3].estimate_inputs(upstream) == ()


def test_a_checkpoint_with_the_removed_temporal_prior_names_the_fix() -> None:
    layer = BatchKalmanNorm2d(3, stat_batch_size=2)
    saved = layer.state_dict()
    old = {**saved, "temporal_mean": torch.zeros(3), "temporal_steps": torch.tensor(5)}
    with (
        pytest.warns(UserWarning, match=r"temporal prior .* strict=False"),
        pytest.raises(RuntimeError, match="Unexpected key"),
    ):
        BatchKalmanNorm2d(3, stat_batch_size=2).load_state_dict(old)
    fresh = BatchKalmanNorm2d(3, stat_batch_size=2)
    with pytest.warns(UserWarning, match="temporal prior"):
        result = fresh.load_state_dict(old, strict=False)
    assert sorted(result.unexpected_keys) == ["temporal_mean", "temporal_steps"]
    assert not result.missing_keys
    for key, value in saved.items():
        torch.testing.assert_close(fresh.state_dict()[key], value)
