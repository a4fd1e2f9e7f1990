"""The fused eager path equals the composite path (which torch.compile and channels_last use)."""

import copy

import pytest
import torch
from conftest import conv_bn_stack, randomize_kalman

import kalmannorm
from kalmannorm.fused import VarianceGuard, batch_moments, batch_sums


def fast_moments(grouped, guard=None):
    """A forward's statistics as the fused node takes them: the guard's choice of passes, the
    moments from the sums, the cancellation test sent to the guard."""
    guard = VarianceGuard() if guard is None else guard
    count = grouped.shape[1] * grouped.shape[3]
    mean, var, risky = batch_moments(batch_sums(grouped, guard), count)
    guard.record(risky)
    return mean, var


def _forward_backward(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    node = type(out.grad_fn).__name__
    out.backward(torch.ones_like(out) + out.detach())  # a non-trivial upstream gradient
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out.detach().contiguous(), x.grad.contiguous(), grads, node


@pytest.mark.parametrize("prior", ["learned", "propagate"])
def test_fused_path_equals_composite_path_forward_backward_running_stats(prior):
    model = kalmannorm.convert_norm(
        conv_bn_stack(), "bkn", stat_batch_size=2, prior=prior, guard=1e9
    )
    randomize_kalman(model, seed=11)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    out_fused, gx_fused, grads_fused, node = _forward_backward(model, x)
    assert "FusedGroupNorm" in node
    stats_fused = model[4].last_statistics
    running_fused = model[4].running_var.clone()
    # channels_last activations are not NCHW-contiguous: every layer takes the composite path.
    model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        model[4].running_var.copy_(torch.ones_like(running_fused))
        model[4].num_batches_tracked.zero_()
    out, gx, grads, node = _forward_backward(model, x.to(memory_format=torch.channels_last))
    assert "FusedGroupNorm" not in node
    torch.testing.assert_close(out_fused, out)
    torch.testing.assert_close(gx_fused, gx)
    assert grads_fused.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_fused[name], grads[name], msg=name)
    for a, b in zip(stats_fused, model[4].last_statistics):
        if a is not None:
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(running_fused, model[4].running_var)


def test_gradcheck_composite_path():
    model = kalmannorm.convert_norm(conv_bn_stack((2, 3, 2)), "bkn", stat_batch_size=2)
    randomize_kalman(model, seed=12)
    model.to(memory_format=torch.channels_last)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64).to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda inp: model(inp), (x,), eps=1e-6, atol=1e-5)


def test_the_variance_guard_takes_two_passes_a_forward_after_a_large_offset():
    """E[x^2] - xbar^2 is exact enough while mean^2 < 1e4 var; the guard's choice for a forward
    comes from the previous one's statistics (no host sync), except on its first forward."""
    from kalmannorm._dispatch_count import count_dispatch

    def exact(x):
        var, mean = torch.var_mean(x.double(), dim=(1, 3), correction=0)
        return mean, var

    guard = VarianceGuard()
    normal, offset = torch.randn(4, 2, 3, 50), 1e4 + torch.randn(4, 2, 3, 50)
    fast_moments(normal, guard)  # the first forward decides on itself (one host read)
    assert guard.two_pass is False
    with count_dispatch() as counts:
        fast_moments(normal, guard)
        _, var = fast_moments(offset, guard)  # one forward late: one pass, imprecise
    assert counts.host_syncs == 0
    assert guard.two_pass is False
    assert not torch.allclose(var.double(), exact(offset)[1], rtol=1e-3)
    with count_dispatch() as counts:
        mean, var = fast_moments(offset, guard)  # the next one takes two passes
    assert counts.host_syncs == 0 and guard.two_pass is True
    torch.testing.assert_close(var.double(), exact(offset)[1], rtol=1e-3, atol=0)
    torch.testing.assert_close(mean.double(), exact(offset)[0])
    fast_moments(normal, guard)
    fast_moments(normal, guard)  # back to one pass once the offset is gone
    assert guard.two_pass is False
    # copies keep the choice but not the host buffer
    twin = copy.deepcopy(guard)
    assert twin.two_pass is False and twin._host is None


def test_fast_moments_are_exact_even_with_a_large_mean():
    x = 1e4 + torch.randn(4, 2, 3, 50)  # float32, mean/std = 1e4: E[x^2] - mean^2 would fail
    mean, var = fast_moments(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(1, 3), correction=0)
    torch.testing.assert_close(mean.double(), ref_mean)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-3, atol=0)
    y = torch.randn(4, 2, 3, 50)
    mean, var = fast_moments(y)
    ref_var, ref_mean = torch.var_mean(y, dim=(1, 3), correction=0)
    torch.testing.assert_close(var, ref_var)


def test_fused_output_accepts_an_in_place_activation():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(inplace=True)
    )
    kalmannorm.convert_norm(model, "bkn", stat_batch_size=2)
    out = model(torch.randn(4, 3, 2, 2))
    out.sum().backward()
    assert (out >= 0).all() and model[0].weight.grad is not None


@pytest.mark.parametrize(
    ("shape", "dims"),
    [
        ((3, 2, 4, 10), (1, 3)),
        ((3, 1, 4, 10), (3,)),
        ((6, 4, 1, 10), (1, 3)),
        ((6, 4, 1, 10), (3,)),
        ((6, 4, 1, 10), (1,)),
        ((3, 2, 4, 1), (1, 3)),
    ],
)
def test_row_sums_of_a_and_of_a_times_b(shape, dims):
    from kalmannorm.fused import row_sums

    a, b = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    rows = row_sums(a, b, dims)
    assert set(rows.rest) <= set(dims) - {3}
    rest = rows.rest or None  # Tensor.sum(()) would sum everything
    sum_a = rows.total.sum(rest, keepdim=True) if rest else rows.total
    sum_ab = rows.product.sum(rest, keepdim=True) if rest else rows.product
    torch.testing.assert_close(sum_a, a.sum(dims, keepdim=True))
    torch.testing.assert_close(sum_ab, (a * b).sum(dims, keepdim=True))


def _two_layer_model(norm: str, dims: int, options: dict) -> torch.nn.Module:
    conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}.get(dims)
    batch_norm = {0: torch.nn.BatchNorm1d, 1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d}
    batch_norm.update({3: torch.nn.BatchNorm3d})
    if conv is None:  # (N, C) feature vectors
        layers = [torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU()]
        layers += [torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6)]
    else:
        layers = [conv(3, 4, 1), batch_norm[dims](4), torch.nn.ReLU()]
        layers += [conv(4, 6, 1), batch_norm[dims](6)]
    model = torch.nn.Sequential(*layers).double()
    kalmannorm.convert_norm(model, norm, **options)
    randomize_kalman(model, seed=dims)
    return model


_NORM_CASES = [
    ("bkn", {"stat_batch_size": 2}),
    ("bkn", {"stat_batch_size": 1}),  # one sample per group: (N, C) inputs are refused
    ("bkn", {"stat_batch_size": None, "prior": "propagate", "guard": 1e9}),
    ("gkn", {"num_groups": 2}),
    ("bn", {"stat_batch_size": 2}),  # ghost BN: the batch-statistics step, written out
]


@pytest.mark.parametrize(
    ("dims", "norm", "options"),
    [
        (dims, norm, options)
        for dims in (0, 1, 2, 3)
        for norm, options in _NORM_CASES
        if dims > 0 or options.get("stat_batch_size") != 1
    ],
)
def test_fused_and_composite_paths_agree_for_every_input_rank(monkeypatch, dims, norm, options):
    model = _two_layer_model(norm, dims, options)
    x = torch.randn(6, 3, *(3,) * dims, dtype=torch.float64)
    fused = _forward_backward(model, x)
    assert "FusedGroupNorm" in fused[3]
    statistics = getattr(model[4], "last_statistics", None)
    posterior = None if statistics is None else statistics.posterior_var
    for module in ("batch_kalman", "group_kalman", "ghost_batch"):
        monkeypatch.setattr(f"kalmannorm.layers.{module}.fused_applicable", lambda *a: False)
    composite = _forward_backward(model, x)
    assert "FusedGroupNorm" not in composite[3]
    torch.testing.assert_close(fused[0], composite[0])
    torch.testing.assert_close(fused[1], composite[1])
    assert fused[2].keys() == composite[2].keys()
    for name in fused[2]:
        torch.testing.assert_close(fused[2][name], composite[2][name], msg=name)
    if posterior is not None:
        torch.testing.assert_close(posterior, model[4].last_statistics.posterior_var)


def _step_outputs_and_gradients(step, x, weight, bias, *small):
    """The fused node's five outputs and the gradients of x, gamma, beta and the ``small``
    tensors that require them, under fixed weights."""
    from kalmannorm.fused import FusedGroupNorm, VarianceGuard

    x = x.clone().requires_grad_()
    outputs = FusedGroupNorm.apply(
        x, step.layout, VarianceGuard(), step, lambda *sums: None, weight, bias, *small
    )
    generator = torch.Generator().manual_seed(1)
    weights = [torch.randn(o.shape, generator=generator, dtype=o.dtype) for o in outputs]
    loss = sum((o * w).sum() for o, w in zip(outputs, weights))
    leaves = [t for t in (x, weight, bias, *small) if t is not None and t.requires_grad]
    return [o.detach() for o in outputs], torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("case", ["plain", "constant channel", "large offset", "no affine"])
def test_the_written_batch_statistics_step_equals_the_traced_one(case):
    """Ghost BN's written-out backward against autograd through the small step's formula, on the
    statistics handed on too: a channel constant within a group (S = 0: clamp_min's gradient
    passes), a large offset (the two-pass sums) and no gamma, beta."""
    from kalmannorm.fused import BatchStatisticsStep, SampleGroups, TracedStep, with_affine
    from kalmannorm.layers.ghost_batch import batch_statistics

    torch.manual_seed(0)
    x = torch.randn(8, 5, 3, 3, dtype=torch.float64)
    if case == "constant channel":
        x[:2, 2] = 1.5
    if case == "large offset":
        x = x * 0.01 + 100.0
    affine = case != "no affine"
    weight = torch.randn(5, dtype=torch.float64, requires_grad=True) if affine else None
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True) if affine else None
    layout = SampleGroups(4)
    traced = TracedStep(with_affine(batch_statistics, layout, 1e-5), layout)
    written = BatchStatisticsStep(layout, 1e-5)
    want = _step_outputs_and_gradients(traced, x, weight, bias)
    got = _step_outputs_and_gradients(written, x, weight, bias)
    for a, b in zip([*got[0], *got[1]], [*want[0], *want[1]]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _paper_kalman_estimate(guard):
    """Eq. (5) as the paper writes it, with the authors' guard: an estimate for TracedStep."""

    def estimate(batch_mean, batch_var, prior_mean, prior_var, gain):
        gain = gain.expand_as(batch_mean)
        if guard is not None:
            ratio = (prior_var / batch_var).mean(-1, keepdim=True)
            gain = torch.where(ratio < guard, gain, torch.ones_like(gain))
        keep = 1 - gain
        mean = keep * prior_mean + gain * batch_mean
        var = keep * prior_var + gain * batch_var + keep * gain * (batch_mean - prior_mean) ** 2
        return mean, var

    return estimate


@pytest.mark.parametrize("layout", ["bkn", "gkn"])
@pytest.mark.parametrize(
    "case",
    ["plain", "prior shared by the rows", "guard rejects a row", "constant statistic",
     "no affine", "fixed gain", "large offset"],
)  # fmt: skip
def test_the_written_kalman_step_equals_the_traced_one(case, layout):
    """The Kalman norms' written-out small step (Eq. 5, guard, affine) against autograd through
    the paper's formula, for BKN's statistics (4 groups of samples, per channel) and GKN's (per
    sample, 2 groups of channels): outputs and the gradients of x, gamma, beta, the prior and the
    gain, on the statistics handed on too."""
    from kalmannorm.fused import ChannelGroups, KalmanStep, SampleGroups, TracedStep, with_affine

    torch.manual_seed(0)
    channels = 6
    x = torch.randn(8, channels, 3, 3, dtype=torch.float64)
    if case == "constant statistic":  # one group's channel (bkn), one sample's group (gkn)
        x[:2, 2] = 1.5
        x[3, 3:] = -0.5
    if case == "large offset":
        x = x * 0.01 + 100.0
    layout = SampleGroups(4) if layout == "bkn" else ChannelGroups(2)
    rows, width = (4, channels) if isinstance(layout, SampleGroups) else (8, 2)
    rows = 1 if case == "prior shared by the rows" else rows
    prior_mean = torch.randn(rows, width, dtype=torch.float64) + (100.0 if "offset" in case else 0)
    prior_var = torch.rand(rows, width, dtype=torch.float64) + 0.5
    if case == "large offset":
        prior_var = prior_var * 1e-4
    if case == "guard rejects a row":
        prior_var[1] = 1e3
    prior_mean.requires_grad_(), prior_var.requires_grad_()
    gain = torch.rand(width, dtype=torch.float64).requires_grad_(case != "fixed gain")
    affine = case != "no affine"
    weight = torch.randn(channels, dtype=torch.float64, requires_grad=True) if affine else None
    bias = torch.randn(channels, dtype=torch.float64, requires_grad=True) if affine else None
    guard = 100.0
    traced = TracedStep(with_affine(_paper_kalman_estimate(guard), layout, 1e-5), layout)
    written = KalmanStep(layout, 1e-5, guard, None, None)
    small = (prior_mean, prior_var, gain)
    want = _step_outputs_and_gradients(traced, x, weight, bias, *small)
    got = _step_outputs_and_gradients(written, x, weight, bias, *small)
    assert len(got[1]) == len(want[1])
    for a, b in zip([*got[0], *got[1]], [*want[0], *want[1]]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    if case == "guard rejects a row":
        applied = written.extra[0]
        assert (applied[1] == 1).all() and (applied[0] == gain.detach()).all()


_HALF_NORMS = [
    ("bkn", {"stat_batch_size": 2}),
    ("bkn-flow", {"stat_batch_size": 2}),
    ("bkn", {"stat_batch_size": 2, "flow": "execution"}),
    ("gkn", {}),
    ("bn", {"stat_batch_size": 2}),
    ("brn", {"stat_batch_size": 2}),
    ("cbn", {"stat_batch_size": 2}),
]


def _half_step(model, x, weights, mode, memory_format=torch.contiguous_format):
    """Output, conv weight gradient and the last layer's statistics of one step in ``mode``."""
    x = x.to(memory_format=memory_format)  # channels_last: the convolutions keep it
    if mode in ("float16", "bfloat16"):
        dtype = getattr(torch, mode)
        model, x = model.to(dtype), x.to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        out = model(x)
    node = type(out.grad_fn).__name__
    (out.float() * weights).sum().backward()
    return out, node, model[0].weight.grad.float()


@pytest.mark.parametrize("mode", ["float16", "bfloat16", "autocast"])
@pytest.mark.parametrize(("norm", "options"), _HALF_NORMS, ids=lambda v: str(v))
def test_half_precision_takes_the_fused_path_with_float32_statistics(norm, options, mode):
    """fp16/bf16 activations (a half model, or bf16 autocast with float32 parameters) take the
    fused node; statistics accumulate in float32. Against the float32 model: the output within
    half-precision rounding, the gradient as close as the composite path's."""
    torch.manual_seed(0)
    reference = kalmannorm.convert_norm(conv_bn_stack((3, 8, 8, 8), torch.float32), norm, **options)
    x, weights = torch.randn(4, 3, 6, 6), torch.randn(4, 8, 6, 6)
    reference(x)  # links the chain (and CBN's window) in float32, as a user would
    fused, composite = copy.deepcopy(reference), copy.deepcopy(reference)
    expected = reference(x)
    (expected * weights).sum().backward()
    expected_grad = reference[0].weight.grad

    out, node, grad = _half_step(fused, x, weights, mode)
    assert node == "FusedGroupNormBackward" and out.dtype != torch.float32
    _, other, composite_grad = _half_step(composite, x, weights, mode, torch.channels_last)
    assert other != "FusedGroupNormBackward"
    rounding = 2e-3 if mode == "float16" else 1.5e-2
    assert (out.float() - expected).abs().max() <= rounding * expected.abs().max()

    def error(g):
        return ((g - expected_grad).norm() / expected_grad.norm()).item()

    # bf16 keeps 8 bits: through three norms of statistics groups of 2 the gradient is off by
    # up to ~15% on either path (torch's own BatchNorm: 3-4% with the whole batch as one group)
    floor = 5e-3 if mode == "float16" else 5e-2
    assert error(grad) <= max(1.5 * error(composite_grad), floor), (
        error(grad), error(composite_grad),
    )  # fmt: skip
    for stats in kalmannorm.kalman_statistics(fused).values():
        assert stats.batch_var.dtype == stats.posterior_var.dtype == torch.float32
