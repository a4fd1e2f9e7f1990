"""The data-flow chain: moments of each operation, the traced producers, and the prior."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from conftest import conv_bn_stack
from torch import nn
from torch.nn import functional as torch_f

import kalmannorm
from kalmannorm import dataflow
from kalmannorm import moments as mo
from kalmannorm.chain import is_chain_member
from kalmannorm.diagnostics import prior_errors, summarize_by_category
from kalmannorm.functional import relu_moments
from kalmannorm.lab.models import preact_resnet20

DOUBLE = torch.float64


def _sample(mean: torch.Tensor, var: torch.Tensor, shape: tuple[int, ...], seed: int = 0):
    """Independent Gaussian values (N, C, *spatial) with per-channel mean and variance."""
    g = torch.Generator().manual_seed(seed)
    view = (1, -1) + (1,) * (len(shape) - 2)
    noise = torch.randn(shape, generator=g, dtype=DOUBLE)
    return mean.view(view) + var.sqrt().view(view) * noise


def _channel_moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [0, *range(2, y.dim())]
    return y.mean(dims), y.var(dims, unbiased=False)


# -- moments of single operations against Monte Carlo --------------------------------------------


@pytest.mark.parametrize("kind", ["relu", "relu6", "silu", "gelu", "hardswish", "sigmoid", "tanh"])
def test_activation_moments_match_monte_carlo(kind):
    mean = torch.tensor([-1.5, 0.0, 0.7, 3.0], dtype=DOUBLE)
    var = torch.tensor([0.3, 1.0, 2.0, 4.0], dtype=DOUBLE)
    x = _sample(mean, var, (400_000, 4))
    fn = {"relu": torch.relu, "relu6": torch_f.relu6, **mo.ACTIVATIONS}[kind]
    m, v = mo.activation(kind, mo.Moments(mean.unsqueeze(0), var.unsqueeze(0)))
    em, ev = _channel_moments(fn(x))
    torch.testing.assert_close(m[0], em, atol=0.01, rtol=0.01)
    torch.testing.assert_close(v[0], ev, atol=0.01, rtol=0.02)


@pytest.mark.parametrize("size", [4, 8, 16])
def test_padded_convolution_moments_equal_the_exact_expectation(size):
    """The exact mean and variance (over samples and positions) of a zero-padded convolution of
    independent inputs, computed independently by convolving constant maps."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1).double()
    mean = torch.tensor([0.5, -1.0, 2.0], dtype=DOUBLE)
    var = torch.tensor([1.0, 0.5, 2.0], dtype=DOUBLE)
    ones = torch.ones(1, 3, size, size, dtype=DOUBLE)
    with torch.no_grad():
        mean_map = torch_f.conv2d(ones * mean.view(1, -1, 1, 1), conv.weight, conv.bias, padding=1)
        var_map = torch_f.conv2d(ones * var.view(1, -1, 1, 1), conv.weight.square(), padding=1)
    exact_mean = mean_map.mean((0, 2, 3))
    exact_var = var_map.mean((0, 2, 3)) + mean_map.var((0, 2, 3), unbiased=False)
    geometry = mo.tap_geometry((size, size), (3, 3), (1, 1), (1, 1), (1, 1))
    m, v = mo.convolution(
        mo.Moments(mean.unsqueeze(0), var.unsqueeze(0)), conv.weight, conv.bias, 1, geometry
    )
    torch.testing.assert_close(m[0], exact_mean)
    torch.testing.assert_close(v[0], exact_var)
    # and ignoring the border (the authors' variant) is off by the border's share
    full = mo.convolution(
        mo.Moments(mean.unsqueeze(0), var.unsqueeze(0)), conv.weight, conv.bias, 1,
        mo.full_geometry(9),
    )  # fmt: skip
    assert not torch.allclose(full.mean[0], exact_mean, rtol=0.01)


def _composite_convolution_moments(mean, var, weight, geometry):
    """The convolution's moments written with plain autograd operations (an independent
    reference for the hand-written backward)."""
    taps = weight.reshape(*weight.shape[:2], -1)
    valid = geometry.valid.to(mean)
    out_mean = mean @ (taps @ valid).T
    out_var = var @ (taps.square() @ valid).T
    tap_means = torch.einsum("gi,oik->gok", mean, taps)
    out_var = out_var + ((tap_means @ geometry.spread.to(mean)) * tap_means).sum(-1)
    return out_mean, out_var.clamp_min(0.0)


@pytest.mark.parametrize(
    ("shape", "geometry"),
    [
        ((5, 3, 3, 3), mo.tap_geometry((4, 4), (3, 3), (1, 1), (1, 1), (1, 1))),
        ((5, 3, 3, 3), mo.tap_geometry((5, 5), (3, 3), (2, 2), (1, 1), (1, 1))),
        ((5, 3, 3, 3), mo.full_geometry(9)),
        ((5, 3, 1, 1), mo.full_geometry(1)),
        ((5, 3, 1, 1), mo.tap_geometry((3, 3), (1, 1), (1, 1), (1, 1), (1, 1))),
        ((5, 3, 2, 2), mo.tap_geometry((3, 3), (2, 2), (1, 1), (1, 1), (1, 1))),
    ],
    ids=["padded", "strided-padded", "no-border", "1x1", "1x1-padded", "2x2-padded"],
)
@pytest.mark.parametrize("stat_groups", [4, 12], ids=["G<K", "G>=K"])
def test_dense_convolution_moments_gradients_equal_autograds(shape, geometry, stat_groups):
    """The hand-written backward of a dense convolution's moments gives autograd's gradients
    of the composite formula, and a double backward works (gradgradcheck); the formula written
    for torch.compile gives the same values and gradients. Fewer statistics groups than taps
    and as many or more (the products take another form)."""
    torch.manual_seed(3)
    weight = torch.randn(*shape, dtype=DOUBLE, requires_grad=True)
    mean = torch.randn(stat_groups, 3, dtype=DOUBLE, requires_grad=True)
    var = torch.rand(stat_groups, 3, dtype=DOUBLE, requires_grad=True)
    grads = (torch.randn(stat_groups, 5, dtype=DOUBLE), torch.randn(stat_groups, 5, dtype=DOUBLE))
    got = mo.convolution(mo.Moments(mean, var), weight, None, 1, geometry)
    expected = _composite_convolution_moments(mean, var, weight, geometry)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)

    def pulled(outputs):
        loss = sum((o * g).sum() for o, g in zip(outputs, grads, strict=True))
        return torch.autograd.grad(loss, (mean, var, weight))

    expected_grads = pulled(expected)
    got_grads = pulled(got)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)
    # (G, C) moments and gradients as every other rule's (a transposed one leaks its layout into
    # the fused node's activation gradient); the weight's gradient a tensor of its own, not a
    # view, so that autograd adds the convolution's own gradient to it in place
    assert all(t.is_contiguous() for t in (*got, *got_grads))
    assert got_grads[2]._base is None
    # the formula torch.compile runs instead, called as written
    bordered = geometry.bordered
    valid, spread = (geometry.valid.to(mean), geometry.spread.to(mean)) if bordered else (None,) * 2
    taps = weight.reshape(*shape[:2], -1)
    for tap_sums in (False, True):
        written = mo._dense_moments(mean, var, taps, valid, spread, tap_sums=tap_sums)[:2]
        torch.testing.assert_close(written[0], expected[0])
        torch.testing.assert_close(written[1].clamp_min(0.0), expected[1])  # (clamped later)
        for g, e in zip(pulled(written), expected_grads, strict=True):
            torch.testing.assert_close(g, e)
    contracted = mo._contracted_moments(mean, var, taps, valid, spread)  # few groups, compiled
    torch.testing.assert_close(contracted[0], expected[0])
    torch.testing.assert_close(contracted[1].clamp_min(0.0), expected[1])
    for g, e in zip(pulled(contracted), expected_grads, strict=True):
        torch.testing.assert_close(g, e)
    if not bordered and shape[2:] == (1, 1):  # and its one batched product for a 1x1
        stacked = mo._stacked_linear_moments(mean, var, weight[..., 0, 0])
        for g, e in zip(stacked, expected, strict=True):
            torch.testing.assert_close(g, e)
        for g, e in zip(pulled(stacked), expected_grads, strict=True):
            torch.testing.assert_close(g, e)

    def moments(m, v, w):
        return tuple(mo.convolution(mo.Moments(m, v), w, None, 1, geometry))

    assert torch.autograd.gradgradcheck(moments, (mean, var, weight))


def _block_diagonal(weight, groups):
    """A grouped convolution's weight (C_out, C_in / groups, *kernel) as the dense convolution's
    that it equals (C_out, C_in, *kernel), zero across groups."""
    out_channels, per_group = weight.shape[:2]
    dense = weight.new_zeros(out_channels, per_group * groups, *weight.shape[2:])
    per_out = out_channels // groups
    for g in range(groups):
        rows, cols = (
            slice(g * per_out, (g + 1) * per_out),
            slice(g * per_group, (g + 1) * per_group),
        )
        dense[rows, cols] = weight[rows]
    return dense


@pytest.mark.parametrize(
    ("channels", "out_channels", "geometry"),
    [
        (3, 3, mo.tap_geometry((4, 4), (3, 3), (1, 1), (1, 1), (1, 1))),
        (3, 3, mo.tap_geometry((5, 5), (3, 3), (2, 2), (1, 1), (1, 1))),
        (3, 3, mo.full_geometry(9)),
        (3, 6, mo.tap_geometry((4, 4), (3, 3), (1, 1), (1, 1), (1, 1))),
    ],
    ids=["padded", "strided-padded", "no-border", "multiplier-2"],
)
def test_depthwise_convolution_moments_equal_the_dense_formula(channels, out_channels, geometry):
    """A depthwise convolution's moments (closed form, backward written out) equal the dense
    composite formula on the block-diagonal weight, in value and gradient; a double backward
    works (gradgradcheck)."""
    torch.manual_seed(4)
    weight = torch.randn(out_channels, 1, 3, 3, dtype=DOUBLE, requires_grad=True)
    mean = torch.randn(2, channels, dtype=DOUBLE, requires_grad=True)
    var = torch.rand(2, channels, dtype=DOUBLE, requires_grad=True)
    grads = torch.randn(2, out_channels, dtype=DOUBLE), torch.randn(2, out_channels, dtype=DOUBLE)
    got = mo.convolution(mo.Moments(mean, var), weight, None, channels, geometry)
    expected = _composite_convolution_moments(
        mean, var, _block_diagonal(weight, channels), geometry
    )

    def pulled(outputs):
        loss = sum((o * g).sum() for o, g in zip(outputs, grads, strict=True))
        return torch.autograd.grad(loss, (mean, var, weight))

    expected_grads = pulled(expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    for g, e in zip(pulled(got), expected_grads, strict=True):
        torch.testing.assert_close(g, e)
    taps = weight.reshape(out_channels, 1, -1)
    for tap_sums in (False, True):  # the grouped formula torch.compile runs, called as written
        written = mo._grouped(mean, var, taps, channels, geometry, tap_sums)
        torch.testing.assert_close(written[0], expected[0])
        torch.testing.assert_close(written[1].clamp_min(0.0), expected[1])
        for g, e in zip(pulled(written), expected_grads, strict=True):
            torch.testing.assert_close(g, e)

    def moments(m, v, w):
        return tuple(mo.convolution(mo.Moments(m, v), w, None, channels, geometry))

    assert torch.autograd.gradgradcheck(moments, (mean, var, weight))


def test_grouped_convolution_moments_equal_the_dense_formula_in_every_form():
    """A grouped convolution (two input channels per group) in the form eager mode
    differentiates, the compiled one and the compiled one that contracts channels by fused sums
    (a GPU's, few statistics groups) equal the dense composite formula on the block-diagonal
    weight, in value and gradient."""
    torch.manual_seed(5)
    groups, geometry = 2, mo.tap_geometry((4, 4), (3, 3), (1, 1), (1, 1), (1, 1))
    weight = torch.randn(6, 2, 3, 3, dtype=DOUBLE, requires_grad=True)
    mean = torch.randn(3, 4, dtype=DOUBLE, requires_grad=True)
    var = torch.rand(3, 4, dtype=DOUBLE, requires_grad=True)
    grads = torch.randn(3, 6, dtype=DOUBLE), torch.randn(3, 6, dtype=DOUBLE)

    def pulled(outputs):
        loss = sum((o * g).sum() for o, g in zip(outputs, grads, strict=True))
        return torch.autograd.grad(loss, (mean, var, weight))

    expected = _composite_convolution_moments(mean, var, _block_diagonal(weight, groups), geometry)
    expected_grads = pulled(expected)
    taps = weight.reshape(6, 2, -1)
    for tap_sums, contract in ((False, False), (True, False), (True, True)):
        got = mo._grouped(mean, var, taps, groups, geometry, tap_sums, contract)
        torch.testing.assert_close(got[0], expected[0])
        torch.testing.assert_close(got[1].clamp_min(0.0), expected[1])
        for g, e in zip(pulled(got), expected_grads, strict=True):
            torch.testing.assert_close(g, e)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        nn.Conv2d(4, 6, 5, padding=2, dilation=1, groups=2),
        nn.Conv1d(4, 6, 3, padding="same"),
        nn.Conv3d(4, 2, 3, padding=1),
    ],
    ids=["strided", "depthwise", "grouped", "1d-same", "3d"],
)
def test_convolution_moments_match_monte_carlo(conv):
    torch.manual_seed(1)
    conv = conv.double()
    mean = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=DOUBLE)
    var = torch.tensor([1.0, 0.5, 2.0, 0.1], dtype=DOUBLE)
    spatial = {1: (9,), 2: (7, 7), 3: (5, 5, 5)}[conv.weight.dim() - 2]
    x = _sample(mean, var, (4000 if len(spatial) < 3 else 800, 4, *spatial))
    with torch.no_grad():
        em, ev = _channel_moments(conv(x))
    record = dataflow.TensorRecord("conv", [], {"module": conv, "sizes": spatial})
    info = {**record.info, **dataflow._constants("conv", record.info)}
    m, v = dataflow._conv_moments(conv, info["geometry"], mo.Moments(mean[None], var[None]))
    torch.testing.assert_close(m[0], em, atol=0.03, rtol=0.02)
    torch.testing.assert_close(v[0], ev, atol=0.03, rtol=0.03)


def test_pooling_dropout_sum_concatenation_moments_match_monte_carlo():
    mean = torch.tensor([0.5, -1.0], dtype=DOUBLE)
    var = torch.tensor([1.0, 0.25], dtype=DOUBLE)
    moments = mo.Moments(mean[None], var[None])
    x = _sample(mean, var, (20000, 2, 6, 6))
    y = _sample(-mean, 2 * var, (20000, 2, 6, 6), seed=1)
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(2), dtype=DOUBLE) >= 0.3
    cases = {
        "avg": (torch_f.avg_pool2d(x, 3, 1, 1), mo.average_pool(
            moments, mo.tap_geometry((6, 6), (3, 3), (1, 1), (1, 1), (1, 1)), True)),
        "avg-exclude": (torch_f.avg_pool2d(x, 3, 1, 1, count_include_pad=False), mo.average_pool(
            moments, mo.tap_geometry((6, 6), (3, 3), (1, 1), (1, 1), (1, 1)), False)),
        "global": (x.mean((2, 3)), mo.average_pool(
            moments, mo.tap_geometry((6, 6), (6, 6), (6, 6), (0, 0), (1, 1)), True)),
        "max": (torch_f.max_pool2d(x, 2), mo.max_pool(moments, 4)),
        "dropout": (x * keep / 0.7, mo.dropout(moments, 0.3)),
        "sum": (x - 0.5 * y, mo.add([moments, mo.Moments(-mean[None], 2 * var[None])],
                                    [1.0, -0.5])),
        "cat": (torch.cat([x, y], 1), mo.concatenate([moments, mo.Moments(-mean[None],
                                                                          2 * var[None])])),
    }  # fmt: skip
    for name, (sampled, predicted) in cases.items():
        em, ev = _channel_moments(sampled)
        torch.testing.assert_close(predicted.mean[0], em, atol=0.02, rtol=0.02, msg=name)
        torch.testing.assert_close(predicted.var[0], ev, atol=0.02, rtol=0.03, msg=name)


class _Given(dataflow.Node):
    """A program leaf with fixed moments."""

    def __init__(self, moments: mo.Moments) -> None:
        self.moments = moments

    def compute(self, ctx, reader):
        return self.moments


@pytest.mark.parametrize("kind", ["relu", "relu6", "sigmoid"])
def test_max_pool_after_a_monotone_activation_pools_the_pre_activation(kind):
    """max_K f(z) = f(max_K z): against Monte Carlo of MaxPool(f(z)) (3x3, stride 2, as after
    ResNet's stem), and more accurate than the maximum's approximation applied to f(z)."""
    mean = torch.tensor([-0.5, 0.0, 1.0], dtype=DOUBLE)
    var = torch.tensor([1.0, 2.0, 0.5], dtype=DOUBLE)
    fn = {"relu": torch.relu, "relu6": torch_f.relu6, **mo.ACTIVATIONS}[kind]
    z = _sample(mean, var, (4000, 3, 9, 9))
    em, ev = _channel_moments(torch_f.max_pool2d(fn(z), 3, 2))
    act = dataflow.Operation("activation", [_Given(mo.Moments(mean[None], var[None]))],
                             {"kind": kind})  # fmt: skip
    info = {"kind": "max", "taps": 9}
    pool = dataflow.Operation("pool", [act], {**info, **dataflow._constants("pool", info)})
    ctx = dataflow.Context([], [], raw=False, source="batch", training=True, memo={})
    m, v = pool.evaluate(ctx, "reader")
    torch.testing.assert_close(m[0], em, atol=0.03, rtol=0.03)
    torch.testing.assert_close(v[0], ev, atol=0.03, rtol=0.1)
    old = mo.max_pool(mo.activation(kind, mo.Moments(mean[None], var[None])), 9)
    assert (m[0] - em).abs().sum() < (old.mean[0] - em).abs().sum()


@pytest.mark.parametrize("rule", ["relu", "relu6", "silu", "max"])
def test_moment_rules_keep_float32_gradients_bounded_at_vanishing_variance(rule):
    """d/dvar of the standard deviation is bounded by the floor (it was 5e18 with the smallest
    normal number as the floor, which overflowed to inf through a few layers)."""
    mean = torch.tensor([0.0, 1e-3, 2.0], requires_grad=True)
    var = torch.full((3,), 1e-30, requires_grad=True)  # a vanishing variance (0 itself is clamped)
    if rule == "max":
        out = mo.max_pool(mo.Moments(mean, var), 9)
    else:
        out = mo.activation(rule, mo.Moments(mean, var))
    (out.mean.sum() + out.var.sum()).backward()
    for grad in (mean.grad, var.grad):
        assert torch.isfinite(grad).all() and grad.abs().max() < 1e8


def test_relu_moments_have_finite_gradients_at_the_extremes():
    for mean_value, var_value in [(100.0, 1e-37), (-100.0, 1e-37), (0.0, 0.0), (1e-10, 0.0),
                                  (3e4, 1e-30), (0.0, 1e8)]:  # fmt: skip
        for dtype in (torch.float32, DOUBLE):
            mean = torch.tensor([mean_value], dtype=dtype, requires_grad=True)
            var = torch.tensor([var_value], dtype=dtype, requires_grad=True)
            first, second = relu_moments(mean, var)
            (first + second).sum().backward()
            assert torch.isfinite(first).all() and torch.isfinite(second).all()
            assert torch.isfinite(mean.grad).all() and torch.isfinite(var.grad).all()
    first, second = relu_moments(torch.tensor([100.0]), torch.tensor([1e-37]))
    torch.testing.assert_close(first, torch.tensor([100.0]))


# -- the traced producers against an independent method ------------------------------------------


def _true_producers(model: nn.Module, x: torch.Tensor) -> dict[str, set[str]]:
    """For each Kalman layer, the Kalman layers whose outputs its input depends on, found by
    autograd: every Kalman layer's output is replaced by a fresh leaf, so a dependency stops at
    the first Kalman layer on each path."""
    leaves: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    names = {id(m): n for n, m in model.named_modules()}

    def pre(module, args):
        inputs[names[id(module)]] = args[0]

    def post(module, args, out):
        leaf = args[0].detach().clone().requires_grad_()
        leaves[names[id(module)]] = leaf
        return leaf.clone()  # (in-place activations may follow)

    for m in model.modules():
        if is_chain_member(m):
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    for layer in (m for m in model.modules() if is_chain_member(m)):
        layer.tracing = True
    try:
        with torch.enable_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for layer in (m for m in model.modules() if is_chain_member(m)):
            layer.tracing = False
    producers = {}
    order = list(leaves)
    for name, tensor in inputs.items():
        earlier = [n for n in order if n != name and tensor.grad_fn is not None]
        found = set()
        if earlier:
            grads = torch.autograd.grad(
                tensor.sum(), [leaves[n] for n in earlier], allow_unused=True, retain_graph=True
            )
            found = {n for n, g in zip(earlier, grads) if g is not None}
        producers[name] = found
    return producers


def _program_producers(chain) -> dict[str, set[str] | None]:
    """Each layer's producers per its program, inputs of earlier layers expanded to their own."""
    expanded: dict[int, set[str]] = {}

    def outputs_of(node) -> set[str]:
        if isinstance(node, dataflow.LayerOutput):
            return {chain.names[node.index]}
        if isinstance(node, dataflow.LayerInput):
            return expanded[node.index]
        return set().union(*(outputs_of(c) for c in node.children)) if node.children else set()

    result = {}
    for index, program in enumerate(chain.programs):
        expanded[index] = outputs_of(program) if program is not None else set()
        result[chain.names[index]] = None if program is None else expanded[index]
    return result


def _zoo():
    torchvision = pytest.importorskip("torchvision")
    m = torchvision.models
    return {
        "resnet18": (lambda: m.resnet18(weights=None), (2, 3, 64, 64)),
        "resnet50": (lambda: m.resnet50(weights=None), (2, 3, 64, 64)),
        "densenet121": (lambda: m.densenet121(weights=None), (2, 3, 64, 64)),
        "mobilenet_v3_small": (lambda: m.mobilenet_v3_small(weights=None), (2, 3, 64, 64)),
        "inception_v3": (
            lambda: m.inception_v3(weights=None, aux_logits=False, init_weights=False),
            (2, 3, 80, 80),
        ),
        "preact_resnet20": (lambda: preact_resnet20(10, 3), (2, 3, 32, 32)),
    }


@pytest.mark.parametrize(
    "name",
    ["resnet18", "resnet50", "densenet121", "mobilenet_v3_small", "inception_v3",
     "preact_resnet20"],
)  # fmt: skip
def test_every_layers_producers_are_the_true_ones(name):
    build, shape = _zoo()[name]
    torch.manual_seed(0)
    x = torch.randn(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = kalmannorm.convert_norm(build(), "bkn", stat_batch_size=2, example_input=x)
    chain = kalmannorm.find_chain(model)
    truth = _true_producers(model, x)
    predicted = _program_producers(chain)
    modelled = [n for n, p in predicted.items() if p is not None]
    assert len(modelled) >= (len(chain) // 3 if name.startswith("mobilenet") else len(chain) - 2)
    for layer_name, found in predicted.items():
        if found is not None:
            assert found == truth[layer_name], layer_name
        elif chain.names.index(layer_name) > 0 and truth[layer_name]:
            # a layer without a program has an operation the moments do not model
            index = chain.names.index(layer_name)
            assert chain.programs[index] is None


# -- the chain ----------------------------------------------------------------------------------


def test_default_chain_traces_the_data_flow_on_the_first_forward_call():
    torch.manual_seed(0)
    model = kalmannorm.convert_norm(preact_resnet20(10, 1), "bkn", stat_batch_size=2)
    chain = kalmannorm.find_chain(model)
    assert chain.order_source.startswith("registration")
    parameters = {n: p for n, p in model.named_parameters()}
    model(torch.randn(4, 1, 28, 28))
    traced = kalmannorm.find_chain(model)
    assert traced is not chain and traced.order_source == "traced" and traced.flow == "data"
    # the traced relinking kept every parameter the optimizer may already hold
    assert all(p is parameters[n] for n, p in model.named_parameters())
    assert "layer2.1.bn1 <- layer2.0.bn1, layer2.0.bn2" in traced.describe()
    copied = copy.deepcopy(kalmannorm.convert_norm(preact_resnet20(10, 1), "bkn"))
    copied(torch.randn(4, 1, 28, 28))
    assert kalmannorm.find_chain(copied).order_source == "traced"


def test_unmodelled_operations_warn_once_and_fall_back_to_batch_statistics():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
            self.conv = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            h = self.a(x)
            return self.bn(self.conv(h * torch.sigmoid(h)))

    x = torch.randn(4, 3, 5, 5)
    with pytest.warns(UserWarning, match=r"1 of 2 Kalman layers .*mul of two tensors.*bn"):
        model = kalmannorm.convert_norm(Gated(), "bkn", stat_batch_size=2, example_input=x)
    assert model.bn.gain is None  # BatchNorm, no unused Kalman parameters
    model(x).sum().backward()


def test_data_flow_prior_gradcheck_through_a_residual_block():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv0 = nn.Conv2d(2, 3, 3, padding=1)
            self.bn0 = nn.BatchNorm2d(3)
            self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(3)
            self.bn2 = nn.BatchNorm2d(3)

        def forward(self, x):
            h = torch.relu(self.bn0(self.conv0(x)))
            return self.bn2(h + self.conv1(torch.relu(self.bn1(h))))

    for prior, source in [("propagate", "batch"), ("learned", "batch"), ("learned", "posterior")]:
        torch.manual_seed(0)
        x = torch.randn(4, 2, 3, 3, dtype=DOUBLE)
        model = kalmannorm.convert_norm(
            Block().double(), "bkn", stat_batch_size=2, prior=prior, source=source,
            example_input=x, guard=1e9,
        )  # fmt: skip
        assert model.bn2.transition is None or model.bn2.transition.shape == (3,)
        params = [p for p in model.parameters()]

        def run(*values, model=model, x=x):
            with torch.nn.utils.stateless._reparametrize_module(
                model, {n: v for (n, _), v in zip(model.named_parameters(), values)}
            ):
                return model(x)

        assert torch.autograd.gradcheck(run, tuple(p.detach().requires_grad_() for p in params))


def test_prior_error_on_preact_resnet_is_within_a_tenth_of_a_batch_std():
    torch.manual_seed(0)
    model = kalmannorm.convert_norm(
        preact_resnet20(10, 1), "bkn", stat_batch_size=2, prior="propagate",
        example_input=torch.randn(4, 1, 28, 28),
    )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
        optimizer.zero_grad()
        torch_f.cross_entropy(model(x), y).backward()
        optimizer.step()
    rows = prior_errors(model, [torch.randn(32, 1, 28, 28, generator=g) for _ in range(2)])
    summary = summarize_by_category(rows)
    assert set(summary) == {"branch", "after addition", "after downsampling"}
    for category, (mean_error, var_error, *_) in summary.items():
        assert mean_error <= 0.15 and var_error <= 0.25, category
    old = kalmannorm.convert_norm(
        preact_resnet20(10, 1), "bkn", stat_batch_size=2, prior="propagate", flow="execution",
        example_input=torch.randn(4, 1, 28, 28),
    )  # fmt: skip
    old_summary = summarize_by_category(prior_errors(old, [torch.randn(32, 1, 28, 28)]))
    assert all(old_summary[c][0] > 3 * summary[c][0] for c in summary)
    assert not any(math.isnan(r.mean_vs_batch) for r in rows if r.category != "first")


def test_the_recommended_preset_links_with_its_own_chain_options():
    x = torch.randn(4, 1, 28, 28)
    model = kalmannorm.convert_norm(preact_resnet20(10, 1), "bkn-flow", stat_batch_size=2)
    model(x)  # traced on the first call, with the preset's options
    chain = kalmannorm.find_chain(model)
    assert (chain.flow, chain.source) == ("data", "posterior")
    assert all(layer.prior == "propagate" for layer in chain.layers)
    # the prior of a layer fed by a normalising layer is its beta / gamma^2 pushed through
    # ReLU and the convolution: the producer's batch statistics enter only through eps in
    # gamma^2 sigma^2 / (sigma^2 + eps)
    block = model.layer1[0]
    model.train()
    model(x)
    predicted = block.bn2.last_statistics.prior_mean
    model(x * 3.0 + 1.0)  # another batch: the stem's output changes, bn1 normalises it away
    torch.testing.assert_close(block.bn2.last_statistics.prior_mean, predicted, rtol=3e-3, atol=0)
    overridden = kalmannorm.convert_norm(
        preact_resnet20(10, 1), "bkn-flow", stat_batch_size=2, source="batch", example_input=x
    )
    assert kalmannorm.find_chain(overridden).source == "batch"


@pytest.mark.parametrize("affine", [True, False])
def test_posterior_output_is_normalized_output_of_the_posterior(affine):
    torch.manual_seed(0)
    mean = torch.randn(3, 5, dtype=DOUBLE, requires_grad=True)
    var = (torch.rand(3, 5, dtype=DOUBLE) + 0.1).requires_grad_()
    weight = torch.randn(5, dtype=DOUBLE, requires_grad=True) if affine else None
    bias = torch.randn(5, dtype=DOUBLE, requires_grad=True) if affine else None
    leaves = [t for t in (mean, var, weight, bias) if t is not None]
    grads = torch.randn(3, 5, dtype=DOUBLE), torch.randn(3, 5, dtype=DOUBLE)
    short = mo.posterior_output(mean, var, weight, bias, 1e-5)
    full = mo.normalized_output(mean, var, mean, var, weight, bias, 1e-5)
    for got, want in zip(short, full):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)

    def loss(outputs):  # a constant output (no bias: mean 0) carries no gradient
        return sum((o * g).sum() for o, g in zip(outputs, grads) if o.requires_grad)

    got = torch.autograd.grad(loss(short), leaves, allow_unused=True)
    want = torch.autograd.grad(loss(full), leaves, allow_unused=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(
            torch.zeros_like(b) if a is None else a, b, rtol=1e-12, atol=1e-14
        )
    # the hand-written backward, once and twice differentiated (create_graph: the formula's)
    inputs = (var, weight) if affine else (var,)

    def variance(var, weight=None):
        return mo._PosteriorOutputVariance.apply(var, weight, 1e-5)

    assert torch.autograd.gradcheck(variance, inputs)
    assert torch.autograd.gradgradcheck(variance, inputs)


@pytest.mark.parametrize(
    "options", [{"name": "bkn-flow"}, {"name": "bkn", "prior": "propagate", "flow": "execution"}],
    ids=["data-flow", "execution"],
)  # fmt: skip
def test_detach_prior_weights_drops_only_the_priors_gradient_into_the_weights(options):
    """With ``detach_prior_weights`` the forward is unchanged and every gradient equals that of
    a model whose priors read copies of the convolutions' weights (leaves of their own; the bias
    is shared): the weights get the convolutions' own gradient only, every other parameter
    (biases included) the full one."""
    torch.manual_seed(5)
    plain = conv_bn_stack((3, 4, 5, 5))  # convolutions 0, 3, 6; norms 1, 4, 7
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    options = dict(options)
    name = options.pop("name")

    def converted(**more) -> nn.Module:
        model = copy.deepcopy(plain)
        return kalmannorm.convert_norm(
            model, name, stat_batch_size=2, example_input=x, **options, **more
        )

    detached, reference = converted(detach_prior_weights=True), converted()
    copies = {}  # the reference's priors read copies of its convolutions' weights (bias shared)
    for conv in (reference[3], reference[6]):
        copies[conv] = copy.deepcopy(conv)
        copies[conv].bias = conv.bias
    chain = kalmannorm.convert.find_chain(reference)
    if chain.flow == "data":
        stack = [p for p in chain.programs if p is not None]
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if getattr(node, "info", {}).get("module") in copies:
                node.info["module"] = copies[node.info["module"]]
    else:
        for layer in (reference[4], reference[7]):
            prior_copy = copies[layer._propagation_source()]
            layer._propagation_source = lambda prior_copy=prior_copy: prior_copy
    assert "detach_prior_weights=True" in repr(detached[4])
    outputs = []
    for model in (detached, reference):
        y = model(x)
        y.square().sum().backward()
        outputs.append(y)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    full = converted()
    full(x).square().sum().backward()
    for (name_, got), want in zip(detached.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-14, msg=name_)
    for index in (3, 6):  # the prior's share of the weight's gradient is gone
        assert not torch.allclose(detached[index].weight.grad, full[index].weight.grad)
