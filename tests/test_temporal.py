"""The temporal prior: a Kalman filter over a layer's statistics across iterations."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as torch_f

import kalmannorm
from kalmannorm import temporal

DOUBLE = torch.float64


def _reference_filter(observations, count, warmup, momentum=temporal.ERROR_MOMENTUM):
    """The filter of kalmannorm.temporal written out per channel with Python floats."""
    m = v = me = ve = mn = vn = 0.0
    v = 1.0
    outputs = []
    for step, (means, variances) in enumerate(observations):
        g = len(means)
        mbar = sum(means) / g
        sbar = sum(variances) / g
        if g >= 2:
            noise_m = sum((x - mbar) ** 2 for x in means) / (g - 1)
            noise_v = sum((s - sbar) ** 2 for s in variances) / (g - 1)
        else:
            noise_m, noise_v = variances[0] / count, 2 * variances[0] ** 2 / (count - 1)
        # forward with the state before this step's update
        if step >= warmup:
            pm, pv = max(me - mn, 0.0), max(ve - vn, 0.0)
            k, kv = pm / (pm + mn), pv / (pv + vn)
        else:
            k = kv = 1.0
        outputs.append([(m + k * (x - m), v + kv * (s - v) + k * (1 - k) * (x - m) ** 2)
                        for x, s in zip(means, variances)])  # fmt: skip
        f = 1.0 if step == 0 else momentum
        if step > 0:
            me += f * (sum((x - m) ** 2 for x in means) / g - me)
            ve += f * (sum((s - v) ** 2 for s in variances) / g - ve)
        mn += f * (noise_m - mn)
        vn += f * (noise_v - vn)
        if step < warmup:
            km = kvs = max(1.0 / (step + 1), momentum)
        else:
            pm, pv = max(me - mn / g, 0.0), max(ve - vn / g, 0.0)
            km, kvs = pm / (pm + mn / g), pv / (pv + vn / g)
        m += km * (mbar - m)
        v += kvs * (sbar - v)
    return outputs


def test_filter_matches_an_independent_recomputation():
    g = torch.Generator().manual_seed(0)
    steps, groups, warmup = 12, 3, 4
    drift = torch.linspace(0, 1, steps, dtype=DOUBLE)
    means = drift[:, None] + 0.3 * torch.randn(steps, groups, generator=g, dtype=DOUBLE)
    variances = 1 + drift[:, None] + 0.2 * torch.rand(steps, groups, generator=g, dtype=DOUBLE)
    state = {name: torch.zeros(1, dtype=DOUBLE) for name in
             ("mean", "mean_error", "var_error", "mean_noise", "var_noise")}  # fmt: skip
    state["var"] = torch.ones(1, dtype=DOUBLE)
    state["steps"] = torch.zeros((), dtype=torch.long)
    expected = _reference_filter(
        [(means[t].tolist(), variances[t].tolist()) for t in range(steps)], count=50, warmup=warmup
    )
    for t in range(steps):
        if t >= warmup:
            gain = temporal.gains(state["mean_error"], state["var_error"], state["mean_noise"],
                                  state["var_noise"])  # fmt: skip
        else:
            gain = temporal.TemporalGains(torch.ones(1, dtype=DOUBLE), torch.ones(1, dtype=DOUBLE))
        mean, var = temporal.fuse(means[t, :, None], variances[t, :, None], state["mean"],
                                  state["var"], gain)  # fmt: skip
        torch.testing.assert_close(mean[:, 0], torch.tensor([e[0] for e in expected[t]],
                                                            dtype=DOUBLE))  # fmt: skip
        torch.testing.assert_close(var[:, 0], torch.tensor([e[1] for e in expected[t]],
                                                           dtype=DOUBLE))  # fmt: skip
        state64 = {k: v for k, v in state.items()}
        temporal.update(state64, means[t, :, None], variances[t, :, None], 50, warmup, t)
        state = {k: (v.double() if v.is_floating_point() else v) for k, v in state64.items()}


def _drifting_batches(n: int, steps: int, seed: int = 0):
    """Inputs whose statistics drift, as activations do while weights train."""
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        shift = torch.tensor([0.2 * t, -0.1 * t, 0.05 * t], dtype=DOUBLE).view(1, 3, 1, 1)
        yield torch.randn(n, 3, 8, 8, generator=g, dtype=DOUBLE) * (1 + 0.05 * t) + shift


def test_a_large_statistics_group_is_batch_norm_and_one_sample_leans_on_history():
    large = kalmannorm.BatchKalmanNorm2d(3, temporal_prior=True, temporal_warmup=3).double()
    single = kalmannorm.BatchKalmanNorm2d(
        3, stat_batch_size=1, temporal_prior=True, temporal_warmup=3
    ).double()
    for x in _drifting_batches(64, 12):
        out_large, out_single = large(x), single(x)
    bn = torch_f.batch_norm(x, None, None, training=True, eps=large.eps)
    # one group of 64 x 8 x 8 values: the statistics' sampling error is ~1/64 of a std
    torch.testing.assert_close(out_large, bn, atol=0.05, rtol=0.0)
    per_sample = torch_f.instance_norm(x, eps=single.eps)
    assert (out_single - per_sample).abs().mean() > 0.1  # not per-sample normalisation
    gain_single, gain_large = (
        temporal.gains(layer.temporal_mean_error, layer.temporal_var_error,
                       layer.temporal_mean_noise, layer.temporal_var_noise)
        for layer in (single, large)
    )  # fmt: skip
    assert float(gain_large.mean.min()) > 0.85  # sampling noise ~ 0: mostly the batch
    # single samples: the gain follows the drift against the samples' spread; history weighs
    assert bool((gain_single.mean < gain_large.mean).all())
    assert float(gain_single.var.max()) < 0.5


def test_gradcheck_and_state_round_trip_with_the_temporal_prior():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
        torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3),
    ).double()  # fmt: skip
    x = torch.randn(4, 2, 4, 4, dtype=DOUBLE)
    model = kalmannorm.convert_norm(
        model, "bkn", stat_batch_size=2, temporal_prior=True, temporal_warmup=2, example_input=x
    )
    for _ in range(5):
        model(x + 0.1 * torch.randn_like(x))
    assert int(model[4].temporal_steps) == 5
    clone = copy.deepcopy(model)
    restored = kalmannorm.convert_norm(
        torch.nn.Sequential(
            torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
            torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3),
        ).double(), "bkn", stat_batch_size=2, temporal_prior=True, temporal_warmup=2,
        example_input=x,
    )  # fmt: skip
    restored.load_state_dict(model.state_dict())
    torch.testing.assert_close(restored(x), clone(x))

    def run(inp):
        frozen = copy.deepcopy(model)  # the state moves each call: fix it
        return frozen(inp)

    assert torch.autograd.gradcheck(run, (x.clone().requires_grad_(),))


def test_temporal_prior_refuses_full_covariance():
    with pytest.raises(ValueError, match="temporal_prior tracks variances only"):
        kalmannorm.BatchKalmanNorm2d(3, covariance="full", temporal_prior=True)
