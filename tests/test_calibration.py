"""The prior-variance calibration of BKN (``calibrate_prior``): kappa = EMA(S) / EMA(prior var)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kalmannorm
from kalmannorm import functional as kf

DOUBLE = torch.float64


def _net(calibrate: bool) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        kalmannorm.BatchKalmanNorm2d(8, stat_batch_size=2, prior="propagate"),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        kalmannorm.BatchKalmanNorm2d(
            8, stat_batch_size=2, prior="propagate", calibrate_prior=calibrate
        ),
    ).to(DOUBLE)
    with torch.no_grad():  # smoothing filters, as trained networks have: correlated taps add up
        net[3].weight.abs_()
    return net


def _smooth_images(count: int, seed: int) -> torch.Tensor:
    """Spatially correlated inputs (a blurred field): the independence assumption is wrong."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 3, 12, 12, generator=g, dtype=DOUBLE)
    return nn.functional.avg_pool2d(x, 3, stride=1, padding=1) * 3.0 + 0.5


def _twins() -> tuple[nn.Sequential, nn.Sequential]:
    plain, calibrated = _net(False), _net(True)
    calibrated.load_state_dict(plain.state_dict(), strict=False)
    example = _smooth_images(4, 99)
    kalmannorm.link_chain(plain, example_input=example)
    kalmannorm.link_chain(calibrated, example_input=example)
    return plain, calibrated


def test_calibration_buffers_follow_the_moving_average_of_batch_and_prior_variance():
    """Against a Python EMA of the uncalibrated twin's statistics (same weights, no updates: the
    second layer's raw prior depends only on the first layer, identical in both)."""
    plain, calibrated = _twins()
    momentum = 0.1
    batch_avg = prior_avg = None
    with torch.no_grad():
        for step in range(6):
            x = _smooth_images(8, step)
            plain(x)
            calibrated(x)
            raw, seen = plain[4].last_statistics, calibrated[4].last_statistics
            torch.testing.assert_close(seen.batch_var, raw.batch_var)
            if batch_avg is None:
                expected_prior = raw.prior_var
            else:
                kappa = (batch_avg / prior_avg).clamp(*kf.CALIBRATION_RANGE)
                expected_prior = raw.prior_var * kappa
            torch.testing.assert_close(seen.prior_var, expected_prior)
            batch, prior = raw.batch_var.mean(0), raw.prior_var.mean(0)
            if batch_avg is None:
                batch_avg, prior_avg = batch, prior
            else:
                batch_avg = batch_avg + momentum * (batch - batch_avg)
                prior_avg = prior_avg + momentum * (prior - prior_avg)
            layer = calibrated[4]
            torch.testing.assert_close(layer.calibration_batch_var, batch_avg)
            torch.testing.assert_close(layer.calibration_prior_var, prior_avg)


def test_calibration_reduces_the_prior_variance_error_on_correlated_inputs():
    plain, calibrated = _twins()
    with torch.no_grad():
        for step in range(30):
            plain(_smooth_images(8, step))
            calibrated(_smooth_images(8, step))

    def log_var_error(model: nn.Sequential) -> float:
        stats = model[4].last_statistics
        return (stats.prior_var / stats.batch_var).log().abs().median().item()

    before, after = log_var_error(plain), log_var_error(calibrated)
    assert before > 0.2  # the independence assumption is visibly wrong here
    assert after < 0.6 * before  # measured 0.60 -> 0.29


def test_calibration_is_not_updated_in_eval_and_the_kappa_is_clamped():
    _, calibrated = _twins()
    layer = calibrated[4]
    calibrated.eval()
    layer.eval_statistics = "batch"
    with torch.no_grad():
        calibrated(_smooth_images(8, 0))
    assert torch.count_nonzero(layer.calibration_prior_var) == 0
    prior = torch.ones(2, 3, dtype=DOUBLE)
    scaled = kf.calibrate_prior_variance(
        prior, torch.tensor([1e6, 1e-6, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    )
    expected = torch.tensor([10.0, 0.1, 1.0], dtype=DOUBLE).expand(2, 3)
    torch.testing.assert_close(scaled, expected)


def test_calibration_state_round_trips_and_a_plain_checkpoint_still_loads():
    _, calibrated = _twins()
    with torch.no_grad():
        calibrated(_smooth_images(8, 1))
    fresh = copy.deepcopy(_twins()[1])
    fresh.load_state_dict(calibrated.state_dict())
    torch.testing.assert_close(fresh[4].calibration_prior_var, calibrated[4].calibration_prior_var)
    plain_bn = nn.BatchNorm2d(8).to(DOUBLE)
    layer = _twins()[1][4]
    layer.load_state_dict(plain_bn.state_dict())  # strict: filled from the initial values
    assert torch.count_nonzero(layer.calibration_prior_var) == 0


def test_calibration_rejects_full_covariance():
    with pytest.raises(ValueError, match="calibrate_prior"):
        kalmannorm.BatchKalmanNorm2d(4, covariance="full", calibrate_prior=True)
