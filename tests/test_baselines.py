"""The baseline norms against their definitions: ghost BN, Batch Renormalization, FRN, EvoNorm-S0,
LayerNorm over channels; the registry and every registered norm in a converted ResNet-50."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

import kalmannorm
from kalmannorm.baselines import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    ChannelLayerNorm,
    CrossIterationBatchNorm2d,
    EvoNormS0,
    FilterResponseNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
)
from kalmannorm.layers.batch_renorm import relaxed_limit

DOUBLE = torch.float64


def _forward_backward(module, x, grad):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(grad)
    return y, x.grad


def _randomize_affine(*modules, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules:
            m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))


def _gradcheck(module, x, reset=None):
    """gradcheck w.r.t. the input and every parameter; ``reset()`` runs before each call."""
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in module.parameters())

    def run(inp, *flat):
        if reset is not None:
            reset()
        return functional_call(module, dict(zip(names, flat)), (inp,))

    assert torch.autograd.gradcheck(
        run, (x.clone().requires_grad_(True), *params), eps=1e-6, atol=1e-5, fast_mode=True
    )


# -- ghost BatchNorm ----------------------------------------------------------------------------


@pytest.mark.parametrize("stat_batch_size", [None, 6])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_bn_with_one_group_is_batchnorm(stat_batch_size, momentum):
    x = torch.randn(6, 5, 4, 4, dtype=DOUBLE)
    grad = torch.randn_like(x)
    bn = nn.BatchNorm2d(5, momentum=momentum).double()
    ghost = GhostBatchNorm2d(5, momentum=momentum, stat_batch_size=stat_batch_size).double()
    _randomize_affine(bn)
    ghost.load_state_dict(bn.state_dict())
    for _ in range(2):
        y_ref, gx_ref = _forward_backward(bn, x, grad)
        y, gx = _forward_backward(ghost, x, grad)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(ghost.weight.grad, bn.weight.grad)
    torch.testing.assert_close(ghost.bias.grad, bn.bias.grad)
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(ghost.state_dict()[key], value, msg=key)
    bn.eval(), ghost.eval()
    torch.testing.assert_close(ghost(x), bn(x))


def test_ghost_bn_is_batchnorm_applied_per_group():
    x = torch.randn(6, 4, 3, 3, dtype=DOUBLE)
    grad = torch.randn_like(x)
    ghost = GhostBatchNorm2d(4, stat_batch_size=2).double()
    _randomize_affine(ghost)
    y, gx = _forward_backward(ghost, x, grad)
    means, variances = [], []
    for g in range(3):
        part = slice(2 * g, 2 * g + 2)
        bn = nn.BatchNorm2d(4, momentum=1.0).double()
        with torch.no_grad():
            bn.weight.copy_(ghost.weight)
            bn.bias.copy_(ghost.bias)
        y_ref, gx_ref = _forward_backward(bn, x[part], grad[part])
        torch.testing.assert_close(y[part], y_ref)
        torch.testing.assert_close(gx[part], gx_ref)
        means.append(bn.running_mean)
        variances.append(bn.running_var)
    # Moving averages: one step towards the mean over groups of BatchNorm's per-group update.
    torch.testing.assert_close(ghost.running_mean, 0.1 * torch.stack(means).mean(0))
    torch.testing.assert_close(ghost.running_var, 0.9 + 0.1 * torch.stack(variances).mean(0))


def test_ghost_bn_composite_path_equals_fused_path():
    x = torch.randn(8, 6, 5, 5, dtype=DOUBLE)
    fused, composite = GhostBatchNorm2d(6, stat_batch_size=4).double(), None
    _randomize_affine(fused)
    composite = copy.deepcopy(fused)
    grad = torch.randn_like(x)
    y, gx = _forward_backward(fused, x, grad)
    # channels_last is not contiguous in NCHW: the composite (autograd) path runs.
    y2, gx2 = _forward_backward(composite, x.to(memory_format=torch.channels_last), grad)
    torch.testing.assert_close(y2, y)
    torch.testing.assert_close(gx2, gx)
    torch.testing.assert_close(composite.weight.grad, fused.weight.grad)
    torch.testing.assert_close(composite.running_var, fused.running_var)


@pytest.mark.parametrize(
    "cls, ref, shape",
    [
        (GhostBatchNorm1d, nn.BatchNorm1d, (4, 3)),
        (GhostBatchNorm1d, nn.BatchNorm1d, (4, 3, 5)),
        (GhostBatchNorm3d, nn.BatchNorm3d, (4, 3, 2, 2, 2)),
    ],
)
def test_ghost_bn_1d_3d_equal_batchnorm(cls, ref, shape):
    x = torch.randn(shape, dtype=DOUBLE)
    ghost, bn = cls(3).double(), ref(3).double()
    torch.testing.assert_close(ghost(x), bn(x))
    torch.testing.assert_close(ghost.running_var, bn.running_var)
    grouped = cls(3, stat_batch_size=2).double()(x)
    torch.testing.assert_close(grouped[:2], ref(3).double()(x[:2]))


def test_ghost_bn_gradcheck_and_batchnorm_checkpoint():
    ghost = GhostBatchNorm2d(3, stat_batch_size=2).double()
    _randomize_affine(ghost)
    _gradcheck(ghost, torch.randn(4, 3, 2, 2, dtype=DOUBLE))
    bn = nn.BatchNorm2d(3)
    bn(torch.randn(4, 3, 2, 2))
    loaded = GhostBatchNorm2d(3, stat_batch_size=2)
    loaded.load_state_dict(bn.state_dict())
    torch.testing.assert_close(loaded.running_mean, bn.running_mean)


# -- Batch Renormalization --------------------------------------------------------------------


def test_brn_with_r_max_1_and_d_max_0_is_batchnorm():
    x = torch.randn(6, 5, 3, 3, dtype=DOUBLE)
    grad = torch.randn_like(x)
    bn = GhostBatchNorm2d(5, stat_batch_size=2).double()
    brn = BatchRenorm2d(5, stat_batch_size=2, r_max=1.0, d_max=0.0).double()
    _randomize_affine(bn)
    brn.load_state_dict(bn.state_dict())
    with torch.no_grad():  # moving statistics far from the batch's: r and d would matter
        for layer in (bn, brn):
            layer.running_mean.fill_(3.0)
            layer.running_var.fill_(7.0)
    for _ in range(2):
        y_ref, gx_ref = _forward_backward(bn, x, grad)
        y, gx = _forward_backward(brn, x, grad)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(brn.weight.grad, bn.weight.grad)
    torch.testing.assert_close(brn.running_mean, bn.running_mean)
    torch.testing.assert_close(brn.running_var, bn.running_var)
    # The default schedule starts with a 5000-step warm-up: BatchNorm too.
    warm = BatchRenorm2d(5, stat_batch_size=2).double()
    warm.load_state_dict(bn.state_dict())
    assert warm.r_max == 1.0 and warm.d_max == 0.0
    torch.testing.assert_close(warm(x), bn(x))


def _renorm_reference(x, running_mean, running_var, weight, bias, eps, r_max, d_max, s):
    """Algorithm 1 of the paper, per group of s samples, with r and d detached."""
    outputs = []
    for part in x.split(s):
        mu = part.mean((0, 2, 3))
        sigma = (part.var((0, 2, 3), correction=0) + eps).sqrt()
        moving_sigma = (running_var + eps).sqrt()
        r = (sigma / moving_sigma).detach().clamp(1 / r_max, r_max)
        d = ((mu - running_mean) / moving_sigma).detach().clamp(-d_max, d_max)
        view = (1, -1, 1, 1)
        xhat = (part - mu.view(view)) / sigma.view(view) * r.view(view) + d.view(view)
        outputs.append(xhat * weight.view(view) + bias.view(view))
    return torch.cat(outputs)


def _brn_with_moving_stats(mean, var, **kwargs):
    brn = BatchRenorm2d(
        3,
        stat_batch_size=2,
        r_max=kwargs.pop("r_max", 3.0),
        d_max=kwargs.pop("d_max", 5.0),
        warmup_steps=0,
        r_max_relax_steps=0,
        d_max_relax_steps=0,
        **kwargs,
    ).double()
    _randomize_affine(brn, seed=3)
    with torch.no_grad():
        brn.running_mean.copy_(torch.tensor(mean))
        brn.running_var.copy_(torch.tensor(var))
    return brn


def test_brn_matches_algorithm_1_and_r_d_get_no_gradient():
    x = torch.randn(4, 3, 3, 3, dtype=DOUBLE) * 1.5 + 0.3
    grad = torch.randn_like(x)
    brn = _brn_with_moving_stats([0.2, -0.1, 0.5], [1.5, 0.8, 2.0])
    ref_params = [p.detach().clone().requires_grad_(True) for p in (brn.weight, brn.bias)]
    running = brn.running_mean.clone(), brn.running_var.clone()
    y, gx = _forward_backward(brn, x, grad)
    xr = x.clone().requires_grad_(True)
    y_ref = _renorm_reference(xr, *running, *ref_params, brn.eps, 3.0, 5.0, 2)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, xr.grad)
    torch.testing.assert_close(brn.weight.grad, ref_params[0].grad)
    # r, d within their bounds here (so they matter), and differentiating through them would
    # give another gradient: the test above does distinguish.
    mu = x[:2].mean((0, 2, 3))
    sigma = (x[:2].var((0, 2, 3), correction=0) + brn.eps).sqrt()
    r = sigma / (running[1] + brn.eps).sqrt()
    d = (mu - running[0]) / (running[1] + brn.eps).sqrt()
    assert ((r > 1 / 3) & (r < 3)).all() and (d.abs() < 5).all() and (r - 1).abs().max() > 0.05
    xt = x.clone().requires_grad_(True)
    view = (1, -1, 1, 1)
    groups = []
    for part in xt.split(2):
        m = part.mean((0, 2, 3))
        s = (part.var((0, 2, 3), correction=0) + brn.eps).sqrt()
        r_live = s / (running[1] + brn.eps).sqrt()
        d_live = (m - running[0]) / (running[1] + brn.eps).sqrt()
        groups.append((part - m.view(view)) / s.view(view) * r_live.view(view) + d_live.view(view))
    (torch.cat(groups) * ref_params[0].detach().view(view)).backward(grad)
    assert not torch.allclose(xt.grad, gx)


def test_brn_clips_r_and_d_and_gradcheck_where_they_are_clipped():
    x = torch.randn(4, 3, 2, 2, dtype=DOUBLE)
    # Moving variance far above the batch's (r at 1/r_max), moving mean far off (|d| at d_max).
    brn = _brn_with_moving_stats([150.0, -150.0, 150.0], [400.0, 400.0, 400.0], momentum=0.0)
    running = brn.running_mean.clone(), brn.running_var.clone()
    y = brn(x)
    y_ref = _renorm_reference(x, *running, brn.weight, brn.bias, brn.eps, 3.0, 5.0, 2)
    torch.testing.assert_close(y, y_ref)
    xhat = (y.detach() - brn.bias.detach().view(1, -1, 1, 1)) / brn.weight.detach().view(
        1, -1, 1, 1
    )
    # d = -5, +5, -5 dominates the mean of each channel's normalised values.
    torch.testing.assert_close(xhat.mean((0, 2, 3)), torch.tensor([-5.0, 5.0, -5.0], dtype=DOUBLE))
    # r and d sit at their bounds, locally constant: autograd's gradient is the true one.
    _gradcheck(brn, x)


def test_brn_moving_averages_take_batch_statistics_on_both_paths():
    # r and d active (within bounds): the normalising statistics mu', sigma' differ from the
    # batch's, but the moving averages must follow the batch statistics, as BatchNorm's do.
    x = torch.randn(4, 3, 3, 3, dtype=DOUBLE) * 1.5 + 0.3
    grad = torch.randn_like(x)
    mean, var = [0.2, -0.1, 0.5], [1.5, 0.8, 2.0]
    fused, composite = (_brn_with_moving_stats(mean, var) for _ in range(2))
    bn = GhostBatchNorm2d(3, stat_batch_size=2).double()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor(mean))
        bn.running_var.copy_(torch.tensor(var))
    for _ in range(2):
        y, gx = _forward_backward(fused, x, grad)
        # channels_last is not contiguous: the composite (autograd) path, not the fused one
        y_c, gx_c = _forward_backward(composite, x.to(memory_format=torch.channels_last), grad)
        y_bn = bn(x).detach()
        assert not torch.allclose(y, y_bn)  # r and d do change the output
        torch.testing.assert_close(y_c, y)
        torch.testing.assert_close(gx_c, gx)
        for layer in (fused, composite):
            torch.testing.assert_close(layer.running_mean, bn.running_mean)
            torch.testing.assert_close(layer.running_var, bn.running_var)
    torch.testing.assert_close(composite.weight.grad, fused.weight.grad)
    torch.testing.assert_close(composite.bias.grad, fused.bias.grad)


def test_brn_schedule_relaxes_linearly_and_state_dict_resumes_it():
    step = torch.tensor
    assert float(relaxed_limit(step(0), 1.0, 3.0, 5000, 35000)) == 1.0
    assert float(relaxed_limit(step(5000), 1.0, 3.0, 5000, 35000)) == 1.0
    assert float(relaxed_limit(step(22500), 1.0, 3.0, 5000, 35000)) == 2.0
    assert float(relaxed_limit(step(40000), 1.0, 3.0, 5000, 35000)) == 3.0
    assert float(relaxed_limit(step(10**6), 0.0, 5.0, 5000, 20000)) == 5.0
    assert float(relaxed_limit(step(1), 0.0, 5.0, 0, 0)) == 5.0

    def build():
        return BatchRenorm2d(
            3, stat_batch_size=2, warmup_steps=2, r_max_relax_steps=4, d_max_relax_steps=2
        ).double()

    layer = build()
    inputs = [torch.randn(4, 3, 2, 2, dtype=DOUBLE) for _ in range(7)]
    limits = []
    for x in inputs[:3]:
        limits.append((layer.r_max, layer.d_max))
        layer(x)
    assert limits == [(1.0, 0.0), (1.0, 0.0), (1.0, 0.0)]
    assert (layer.r_max, layer.d_max) == (1.5, 2.5)
    saved = copy.deepcopy(layer.state_dict())
    assert int(saved["renorm_step"]) == 3
    resumed = build()
    resumed.load_state_dict(saved)
    assert (resumed.r_max, resumed.d_max) == (1.5, 2.5)
    for x in inputs[3:]:
        torch.testing.assert_close(resumed(x), layer(x))
    assert (resumed.r_max, resumed.d_max) == (3.0, 5.0)
    # A BatchNorm checkpoint (no schedule) loads strictly and starts the schedule.
    fresh = build()
    fresh.load_state_dict(nn.BatchNorm2d(3).double().state_dict())
    assert int(fresh.renorm_step) == 0


def test_brn_eval_uses_moving_statistics_and_1d_variant():
    brn = _brn_with_moving_stats([0.5, 0.0, -0.5], [2.0, 1.0, 0.5])
    brn.eval()
    x = torch.randn(4, 3, 2, 2, dtype=DOUBLE)
    bn = nn.BatchNorm2d(3).double().eval()
    bn.load_state_dict(brn.state_dict(), strict=False)
    torch.testing.assert_close(brn(x), bn(x))
    assert int(brn.renorm_step) == 0
    x1 = torch.randn(4, 3, dtype=DOUBLE)
    torch.testing.assert_close(BatchRenorm1d(3).double()(x1), nn.BatchNorm1d(3).double()(x1))


# -- FRN, EvoNorm-S0, LayerNorm over channels --------------------------------------------------


def test_frn_against_direct_formula_and_gradcheck():
    layer = FilterResponseNorm(3).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        layer.tau.copy_(torch.tensor([-0.1, 0.0, 0.5]))
    x = torch.randn(2, 3, 3, 4, dtype=DOUBLE)
    expected = torch.empty_like(x)
    for n in range(2):
        for c in range(3):
            values = x[n, c].flatten().tolist()
            nu2 = sum(v * v for v in values) / len(values)
            y = x[n, c] / (nu2 + 1e-6) ** 0.5 * layer.weight[c] + layer.bias[c]
            expected[n, c] = torch.maximum(y, layer.tau[c])
    torch.testing.assert_close(layer(x), expected.detach())
    learned = FilterResponseNorm(3, learn_eps=True).double()
    with torch.no_grad():
        learned.eps_raw.copy_(torch.tensor([-0.5, 0.2, 1.0]))
    nu2 = x.square().mean((2, 3), keepdim=True)
    eps = 1e-6 + torch.tensor([0.5, 0.2, 1.0], dtype=DOUBLE).view(1, -1, 1, 1)
    torch.testing.assert_close(learned(x), torch.clamp_min(x / (nu2 + eps).sqrt(), 0.0))
    plain = FilterResponseNorm(3, tlu=False).double()
    torch.testing.assert_close(plain(x), x / (nu2 + 1e-6).sqrt())
    # (N, C) inputs: nu^2 = x^2.
    x2 = torch.randn(4, 3, dtype=DOUBLE)
    torch.testing.assert_close(plain(x2), x2 / (x2.square() + 1e-6).sqrt())
    with torch.no_grad():  # keep y away from the TLU kink for finite differences
        layer.tau.copy_(torch.tensor([-5.0, -5.0, -5.0]))
        learned.eps_raw.copy_(torch.tensor([0.3, 0.2, 0.1]))
    _gradcheck(layer, x)
    _gradcheck(learned, x)


def test_evonorm_s0_against_direct_formula_and_gradcheck():
    layer = EvoNormS0(2, 4).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (layer.weight, layer.bias, layer.v):
            p.copy_(torch.randn(4, generator=g, dtype=DOUBLE))
    x = torch.randn(3, 4, 2, 3, dtype=DOUBLE)
    expected = torch.empty_like(x)
    for n in range(3):
        for group in range(2):
            channels = slice(2 * group, 2 * group + 2)
            values = x[n, channels].flatten().tolist()
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / len(values)
            for c in range(2 * group, 2 * group + 2):
                gate = torch.sigmoid(layer.v[c] * x[n, c])
                expected[n, c] = (
                    x[n, c] * gate / (var + 1e-5) ** 0.5 * layer.weight[c] + layer.bias[c]
                )
    torch.testing.assert_close(layer(x), expected.detach())
    linear = EvoNormS0(2, 4, nonlinearity=False, affine=False).double()
    std = x.reshape(3, 2, -1).var(-1, correction=0).add(1e-5).sqrt().repeat_interleave(2, 1)
    torch.testing.assert_close(linear(x), x / std.view(3, 4, 1, 1))
    _gradcheck(layer, x)


def test_channel_layer_norm_and_spatial_layer_norm():
    layer = ChannelLayerNorm(4).double()
    _randomize_affine(layer)
    x = torch.randn(2, 4, 3, 3, dtype=DOUBLE)
    mean = x.mean(1, keepdim=True)
    var = x.var(1, correction=0, keepdim=True)
    view = (1, -1, 1, 1)
    expected = (x - mean) / (var + 1e-5).sqrt() * layer.weight.view(view) + layer.bias.view(view)
    torch.testing.assert_close(layer(x), expected)
    _gradcheck(layer, x)
    spatial = kalmannorm.build_norm("ln", 4, spatial=True, dtype=DOUBLE)
    assert isinstance(spatial, nn.GroupNorm) and spatial.num_groups == 1
    flat = x.flatten(1)
    expected = (x - flat.mean(1).view(-1, 1, 1, 1)) / (
        flat.var(1, correction=0).view(-1, 1, 1, 1) + 1e-5
    ).sqrt()
    torch.testing.assert_close(spatial(x), expected)


# -- registry, conversion and bad input ---------------------------------------------------------

BASELINES = ("bn", "brn", "cbn", "gn", "ln", "in", "frn", "evonorm_s0")


def test_every_baseline_is_registered_and_built_by_name():
    names = kalmannorm.available_norms()
    assert set(BASELINES) <= set(names)
    expected = {
        "bn": GhostBatchNorm2d,
        "brn": BatchRenorm2d,
        "cbn": CrossIterationBatchNorm2d,
        "gn": nn.GroupNorm,
        "ln": ChannelLayerNorm,
        "in": nn.InstanceNorm2d,
        "frn": FilterResponseNorm,
        "evonorm_s0": EvoNormS0,
    }
    for name, cls in expected.items():
        options = {"stat_batch_size": 2} if name in ("bn", "brn", "cbn") else {}
        layer = kalmannorm.build_norm(name, 64, **options)
        assert type(layer) is cls, name
        assert kalmannorm.norm_spec(name).batch_statistics == bool(options), name
    assert kalmannorm.build_norm("gn", 48).num_groups == 6  # >= 8 channels per group
    assert kalmannorm.build_norm("gn", 48, min_channels_per_group=1).num_groups == 24
    assert kalmannorm.build_norm("gn", 64, num_groups=8).num_groups == 8
    assert kalmannorm.build_norm("evonorm_s0", 40).num_groups == 20
    assert kalmannorm.build_norm("bn", 8, dims=1, stat_batch_size=4).stat_batch_size == 4
    assert isinstance(kalmannorm.build_norm("brn", 8, dims=3), BatchRenorm3d)
    assert kalmannorm.build_norm("frn", 8).eps == 1e-6


def test_conversion_copies_batchnorm_state():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model(torch.randn(4, 3, 5, 5))
    for name in ("bn", "brn", "cbn"):
        converted = kalmannorm.convert_norm(copy.deepcopy(model), name, stat_batch_size=2)
        torch.testing.assert_close(converted[1].running_var, model[1].running_var)
        assert int(converted[1].num_batches_tracked) == 1
    converted = kalmannorm.convert_norm(copy.deepcopy(model), "bn")
    converted.eval(), model.eval()
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(converted(x), model(x))


def test_bad_input_gives_clear_errors():
    for name in ("bn", "brn", "cbn"):
        layer = kalmannorm.build_norm(name, 4, stat_batch_size=2)
        with pytest.raises(ValueError, match="not divisible by stat_batch_size=2"):
            layer(torch.randn(5, 4, 2, 2))
        with pytest.raises(ValueError, match="expects 4D input"):
            layer(torch.randn(4, 4, 2))
        with pytest.raises(ValueError, match="built for 4 channels but the input has 3"):
            layer(torch.randn(4, 3, 2, 2))
    with pytest.raises(ValueError, match="variance is undefined"):
        GhostBatchNorm1d(4, stat_batch_size=1)(torch.randn(4, 4))
    with pytest.raises(ValueError, match="stat_batch_size must be a positive"):
        GhostBatchNorm2d(4, stat_batch_size=0)
    with pytest.raises(ValueError, match="r_max must be >= 1"):
        BatchRenorm2d(4, r_max=0.5)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6))
    with pytest.raises(ValueError, match=r"gn: num_groups=4 does not divide the 6 channels"):
        kalmannorm.convert_norm(copy.deepcopy(model), "gn", num_groups=4)
    with pytest.raises(ValueError, match="evonorm_s0: num_groups=5 does not divide"):
        kalmannorm.convert_norm(copy.deepcopy(model), "evonorm_s0", num_groups=5)
    with pytest.raises(ValueError, match="num_groups .4. must divide num_features .6."):
        EvoNormS0(4, 6)
    with pytest.raises(ValueError, match="expects input"):
        FilterResponseNorm(3)(torch.randn(2, 4, 2, 2))
    # Batch-free norms have no statistics groups: a statistics-batch size is refused.
    for name in ("gn", "ln", "in", "frn", "evonorm_s0"):
        with pytest.raises(TypeError, match="stat_batch_size"):
            kalmannorm.convert_norm(copy.deepcopy(model), name, stat_batch_size=3)


@pytest.fixture(scope="module")
def resnet50():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet50(weights=None)


@pytest.mark.parametrize("name", sorted(kalmannorm.available_norms()))
def test_every_norm_declares_what_it_takes(name):
    """The registry's declarations against the builders: a norm with batch statistics takes
    ``stat_batch_size``, a per-sample one refuses it; one with its own eps keeps it."""
    spec = kalmannorm.norm_spec(name)
    if spec.batch_statistics:
        assert kalmannorm.build_norm(name, 8, stat_batch_size=2).stat_batch_size == 2
    else:
        with pytest.raises(TypeError, match="stat_batch_size"):
            kalmannorm.build_norm(name, 8, stat_batch_size=2)
    layer = kalmannorm.build_norm(name, 8)
    if spec.own_eps:
        assert layer.eps != 1e-5 and kalmannorm.build_norm(name, 8, eps=1e-3).eps == 1e-3


@pytest.mark.parametrize("name", sorted(kalmannorm.available_norms()))
def test_resnet50_converted_to_every_registered_norm_trains_and_evaluates(resnet50, name):
    torch.manual_seed(0)
    options = {"stat_batch_size": 2} if kalmannorm.norm_spec(name).batch_statistics else {}
    model = kalmannorm.convert_norm(copy.deepcopy(resnet50), name, **options)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # InstanceNorm needs more than one position per channel: layer4 is 1x1 at 32x32 inputs.
    size = 64 if name == "in" else 32
    for _ in range(2 if name == "cbn" else 1):  # cbn's second step uses its window
        model.zero_grad()
        loss = model(torch.randn(4, 3, size, size)).logsumexp(-1).mean()
        assert torch.isfinite(loss)
        loss.backward()
    assert model.conv1.weight.grad.abs().sum() > 0
    assert model.layer4[2].conv3.weight.grad.abs().sum() > 0
    if name == "cbn":
        stats = model.layer2[0].bn1.last_statistics
        assert int(model.layer2[0].bn1.window_count) == 2
        assert not torch.allclose(stats.mean, stats.batch_mean)
        assert model.layer2[0].downsample[1].conv is model.layer2[0].downsample[0]
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


def test_bench_rows_cover_every_registered_norm(monkeypatch):
    from kalmannorm.lab import bench_norms

    tiny = {"batch": 4, "channels": 4, "size": 4, "warmup": 1, "repeats": 1, "iters": 1}
    monkeypatch.setattr(bench_norms, "_QUICK", tiny)
    rows = bench_norms.norm_layer_rows(quick=True)
    assert [row["norm"] for row in rows] == ["torch_bn", *kalmannorm.available_norms()]
    for row in rows:
        assert row["ms"] > 0 and row["ratio_to_bn"] > 0
    by_name = {row["norm"]: row for row in rows}
    assert by_name["cbn"]["setup"] == "conv+norm" and by_name["bn"]["setup"] == "norm"
    assert "evonorm_s0" in bench_norms.format_rows(rows)
    with_conv = bench_norms.norm_layer_rows(quick=True, with_conv=True)
    assert all(row["conv_ratio_to_bn"] > 0 for row in with_conv)
    assert "x conv+BN" in bench_norms.format_rows(with_conv)


def test_ghost_bn_auto_eval_is_instance_statistics_with_one_sample_groups():
    """Ghost BN's default ``eval_statistics="auto"`` at s = 1 normalises each test sample over
    its own positions (instance norm with BN's affine), at s = 2 with the moving statistics."""
    x = torch.randn(3, 4, 5, 5)
    one = kalmannorm.convert_norm(nn.Sequential(nn.BatchNorm2d(4)), "bn", stat_batch_size=1)
    two = kalmannorm.convert_norm(nn.Sequential(nn.BatchNorm2d(4)), "bn", stat_batch_size=2)
    for model in (one, two):
        model(torch.randn(6, 4, 5, 5))
        with torch.no_grad():
            model[0].weight.uniform_(0.5, 1.5)
            model[0].bias.uniform_(-1, 1)
        model.eval()
    layer = one[0]
    ref = torch.nn.functional.instance_norm(x, weight=layer.weight, bias=layer.bias, eps=layer.eps)
    with torch.no_grad():
        torch.testing.assert_close(one(x), ref, rtol=1e-4, atol=1e-5)
        moving = torch.nn.functional.batch_norm(
            x, two[0].running_mean, two[0].running_var, two[0].weight, two[0].bias, False,
            eps=two[0].eps,
        )  # fmt: skip
        torch.testing.assert_close(two(x), moving)


@pytest.mark.parametrize("name", ["bn", "brn", "cbn"])
def test_eval_with_batch_statistics_normalises_each_test_group(name):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    kalmannorm.convert_norm(model, name, stat_batch_size=2)
    x = torch.randn(6, 3, 5, 5)
    model(torch.randn(6, 3, 5, 5))  # moving statistics move away from the test batch
    model.eval()
    kalmannorm.set_eval_statistics(model, "batch")
    before = model[1].running_mean.clone()
    with torch.no_grad():
        out = model(x)
        features = model[0](x)
    for g in range(3):
        part = slice(2 * g, 2 * g + 2)
        ref = torch.nn.functional.batch_norm(
            features[part], None, None, model[1].weight, model[1].bias, True, 0.0, model[1].eps
        )
        torch.testing.assert_close(out[part], ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[1].running_mean, before)
    kalmannorm.set_eval_statistics(model, "moving")
    with torch.no_grad():
        assert not torch.allclose(model(x), out)
