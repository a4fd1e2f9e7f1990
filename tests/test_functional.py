"""The pure math against direct formulas."""

import math

import pytest
import torch

from kalmannorm import functional as kf


def test_group_moments_match_per_group_formula():
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64)
    mean, var, count = kf.group_moments(x, stat_batch_size=2)
    assert mean.shape == (3, 3) and count == 2 * 4 * 5
    for g in range(3):
        chunk = x[2 * g : 2 * g + 2]
        torch.testing.assert_close(mean[g], chunk.mean(dim=(0, 2, 3)))
        torch.testing.assert_close(var[g], chunk.var(dim=(0, 2, 3), unbiased=False))


def test_group_moments_channels_last_and_half_accumulate_in_float32():
    x = torch.randn(4, 8, 6, 6).to(memory_format=torch.channels_last)
    mean, var, _ = kf.group_moments(x, 2)
    ref_mean, ref_var, _ = kf.group_moments(x.contiguous(), 2)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)
    half_mean, half_var, _ = kf.group_moments(x.to(torch.bfloat16), 2)
    assert half_mean.dtype == torch.float32 and half_var.dtype == torch.float32


def test_group_covariance_diagonal_is_group_variance():
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    mean, cov, count = kf.group_covariance(x, 2)
    _, var, _ = kf.group_moments(x, 2)
    assert cov.shape == (2, 5, 5) and count == 18
    torch.testing.assert_close(cov.diagonal(dim1=-2, dim2=-1), var)
    rows = x[:2].transpose(0, 1).reshape(5, -1)
    torch.testing.assert_close(cov[0], torch.cov(rows, correction=0))
    torch.testing.assert_close(mean[0], rows.mean(1))


@pytest.mark.parametrize("batch, size", [(5, 2), (4, 3)])
def test_indivisible_batch_is_a_value_error(batch, size):
    with pytest.raises(ValueError, match="not divisible by stat_batch_size"):
        kf.num_stat_groups(batch, size)


def test_kalman_update_is_mixture_moments():
    """Eq. (5) equals the moments of the two-component mixture p N(prior) + q N(batch)."""
    prior_mean, prior_var = torch.tensor([0.3]), torch.tensor([2.0])
    batch_mean, batch_var = torch.tensor([-1.0]), torch.tensor([0.5])
    q = torch.tensor([0.25])
    mean, var = kf.kalman_update(batch_mean, batch_var, prior_mean, prior_var, q)
    p = 1 - q
    second = p * (prior_var + prior_mean**2) + q * (batch_var + batch_mean**2)
    torch.testing.assert_close(mean, p * prior_mean + q * batch_mean)
    torch.testing.assert_close(var, second - mean**2)


def test_full_update_diagonal_equals_diag_update_and_stays_psd():
    torch.manual_seed(0)
    c = 4
    a, b = torch.randn(2, c, c, dtype=torch.float64), torch.randn(2, c, c, dtype=torch.float64)
    prior_cov, batch_cov = a @ a.mT, b @ b.mT
    prior_mean, batch_mean = (
        torch.randn(2, c, dtype=torch.float64),
        torch.randn(2, c, dtype=torch.float64),
    )
    q = torch.rand(c, dtype=torch.float64)
    mean, cov = kf.kalman_update_full(batch_mean, batch_cov, prior_mean, prior_cov, q)
    diag_mean, diag_var = kf.kalman_update(
        batch_mean,
        batch_cov.diagonal(dim1=-2, dim2=-1),
        prior_mean,
        prior_cov.diagonal(dim1=-2, dim2=-1),
        q,
    )
    torch.testing.assert_close(mean, diag_mean)
    torch.testing.assert_close(cov.diagonal(dim1=-2, dim2=-1), diag_var)
    assert torch.linalg.eigvalsh(cov).min() > -1e-10
    # A scalar gain reproduces the printed matrix equation exactly.
    qs = torch.full((c,), 0.3, dtype=torch.float64)
    _, cov_s = kf.kalman_update_full(batch_mean, batch_cov, prior_mean, prior_cov, qs)
    d = (batch_mean - prior_mean).unsqueeze(-1)
    printed = 0.7 * prior_cov + 0.3 * batch_cov + 0.21 * d @ d.mT
    torch.testing.assert_close(cov_s, printed)


def test_predict_prior_diag_equals_diag_of_full():
    torch.manual_seed(1)
    transition = torch.randn(3, 5, dtype=torch.float64)
    up_mean, up_var = torch.randn(2, 5, dtype=torch.float64), torch.rand(2, 5, dtype=torch.float64)
    noise = torch.rand(3, dtype=torch.float64)
    mean, var = kf.predict_prior(up_mean, up_var, transition, noise)
    full_mean, full_cov = kf.predict_prior_full(up_mean, up_var, transition, noise)
    torch.testing.assert_close(mean, full_mean)
    torch.testing.assert_close(var, full_cov.diagonal(dim1=-2, dim2=-1))
    # An upstream full covariance through the diagonal predictor.
    b = torch.randn(2, 5, 5, dtype=torch.float64)
    up_cov = b @ b.mT
    _, var_from_full = kf.predict_prior(up_mean, up_cov, transition, noise)
    _, cov_from_full = kf.predict_prior_full(up_mean, up_cov, transition, noise)
    torch.testing.assert_close(var_from_full, cov_from_full.diagonal(dim1=-2, dim2=-1))


def test_relu_moments_match_monte_carlo():
    torch.manual_seed(0)
    mean = torch.tensor([-1.0, 0.0, 0.7, 3.0], dtype=torch.float64)
    var = torch.tensor([0.5, 1.0, 2.0, 0.1], dtype=torch.float64)
    samples = torch.relu(mean + var.sqrt() * torch.randn(400_000, 4, dtype=torch.float64))
    m, v = kf.relu_moments(mean, var)
    torch.testing.assert_close(m, samples.mean(0), atol=6e-3, rtol=0)
    torch.testing.assert_close(v, samples.var(0), atol=1e-2, rtol=0)


def _composite_relu_moments(mean, var):
    """The closed form written out, for autograd to differentiate (independent of the
    analytic backward)."""
    u = var.clamp_min(0.0) + 1e-6 * mean.square() + torch.finfo(var.dtype).eps ** 2
    std = u.sqrt()
    cdf = 0.5 * (1.0 + torch.erf(mean / std / 2**0.5))
    pdf = torch.exp(-0.5 * (mean / std).square()) / (2 * torch.pi) ** 0.5
    first = mean * cdf + std * pdf
    return first, ((mean.square() + u) * cdf + mean * std * pdf - first.square()).clamp_min(0.0)


def test_relu_moments_backward_is_autograds_of_the_closed_form():
    torch.manual_seed(0)
    mean = (3 * torch.randn(64, dtype=torch.float64)).requires_grad_()
    var = (torch.rand(64, dtype=torch.float64) * 4).requires_grad_()
    grads = torch.randn(64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    for fn in (kf.relu_moments, _composite_relu_moments):
        outputs = fn(mean, var)
        for got, want in zip(outputs, _composite_relu_moments(mean, var)):
            torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    analytic = torch.autograd.grad(kf.relu_moments(mean, var), (mean, var), grads)
    reference = torch.autograd.grad(_composite_relu_moments(mean, var), (mean, var), grads)
    for got, want in zip(analytic, reference):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    point = (mean[:6].detach().requires_grad_(), var[:6].detach().requires_grad_())
    assert torch.autograd.gradcheck(kf.relu_moments, point)
    assert torch.autograd.gradgradcheck(kf.relu_moments, point)


def _composite_clipped_moments(mean, var, low, high):
    """E clamp(z, low, high) and its variance written uncentred (E f^2 - (E f)^2 over the three
    pieces below, inside and above the interval), for autograd to differentiate."""
    u = var.clamp_min(0.0) + 1e-6 * mean.square() + torch.finfo(var.dtype).eps ** 2
    std = u.sqrt()
    a, b = (low - mean) / std, (high - mean) / std
    cdf_a, cdf_b = (0.5 * (1.0 + torch.erf(t / 2**0.5)) for t in (a, b))
    pdf_a, pdf_b = (torch.exp(-0.5 * t.square()) / (2 * torch.pi) ** 0.5 for t in (a, b))
    inside = cdf_b - cdf_a
    first = low * cdf_a + high * (1 - cdf_b) + mean * inside + std * (pdf_a - pdf_b)
    second = (
        low**2 * cdf_a + high**2 * (1 - cdf_b) + (mean.square() + u) * inside
        + 2 * mean * std * (pdf_a - pdf_b) + u * (a * pdf_a - b * pdf_b)
    )  # fmt: skip
    return first, (second - first.square()).clamp_min(0.0)


def test_clipped_moments_equal_the_integral_over_the_density():
    """ReLU6 moments against the expectation integrated numerically over the normal density."""
    mean = torch.tensor([-2.0, 0.0, 0.5, 3.0, 5.5, 9.0], dtype=torch.float64)
    var = torch.tensor([0.5, 1.0, 4.0, 0.01, 2.0, 1.0], dtype=torch.float64)
    z = torch.linspace(-12, 12, 400_001, dtype=torch.float64)
    density = torch.exp(-0.5 * z.square()) / (2 * torch.pi) ** 0.5
    std = (var + 1e-6 * mean.square()).sqrt()  # the library's floor on the variance
    values = (mean[:, None] + std[:, None] * z).clamp(0.0, 6.0)
    first = torch.trapezoid(values * density, z)
    second = torch.trapezoid(values.square() * density, z)
    m, v = kf.clipped_moments(mean, var, 0.0, 6.0)
    torch.testing.assert_close(m, first, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(v, second - first.square(), rtol=1e-5, atol=1e-8)


def test_clipped_moments_backward_is_autograds_of_the_closed_form():
    torch.manual_seed(0)
    mean = (4 * torch.randn(64, dtype=torch.float64) + 3).requires_grad_()
    var = (torch.rand(64, dtype=torch.float64) * 4).requires_grad_()
    grads = torch.randn(64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    outputs = kf.clipped_moments(mean, var, 0.0, 6.0)
    for got, want in zip(outputs, _composite_clipped_moments(mean, var, 0.0, 6.0)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    analytic = torch.autograd.grad(outputs, (mean, var), grads)
    reference = torch.autograd.grad(
        _composite_clipped_moments(mean, var, 0.0, 6.0), (mean, var), grads
    )
    for got, want in zip(analytic, reference):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    point = (mean[:6].detach().requires_grad_(), var[:6].detach().requires_grad_())

    def relu6_moments(m, v):
        return kf.clipped_moments(m, v, 0.0, 6.0)

    assert torch.autograd.gradcheck(relu6_moments, point)
    assert torch.autograd.gradgradcheck(relu6_moments, point)


def test_linear_moments_match_sampled_convolution():
    """The analytic moments equal what the authors' Gaussian-sample-through-conv estimates."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, padding=0, groups=2).double()
    mean = torch.tensor([0.5, -0.2, 1.0, 0.0], dtype=torch.float64)
    var = torch.tensor([1.0, 0.3, 2.0, 0.5], dtype=torch.float64)
    samples = mean.view(1, 4, 1, 1) + var.sqrt().view(1, 4, 1, 1) * torch.randn(
        2000, 4, 12, 12, dtype=torch.float64
    )
    with torch.no_grad():
        out = conv(samples)
    m, v = kf.linear_moments(mean, var, conv.weight, conv.bias, groups=2)
    torch.testing.assert_close(m, out.mean(dim=(0, 2, 3)), atol=5e-3, rtol=0)
    torch.testing.assert_close(v, out.var(dim=(0, 2, 3)), rtol=2e-2, atol=0)


def test_normalize_groups_and_eval_forms():
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    mean, var, _ = kf.group_moments(x, 2)
    w, b = torch.rand(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    y = kf.normalize(x, mean, var, w, b, 1e-5)
    for g in range(2):
        ref = torch.nn.functional.batch_norm(
            x[2 * g : 2 * g + 2], None, None, w, b, True, 0.0, 1e-5
        )
        torch.testing.assert_close(y[2 * g : 2 * g + 2], ref)
    y_eval = kf.normalize(x, mean[0], var[0], w, b, 1e-5)
    ref = torch.nn.functional.batch_norm(x, mean[0], var[0], w, b, False, 0.0, 1e-5)
    torch.testing.assert_close(y_eval, ref)


def test_exponential_average_is_convex_combination():
    running = torch.tensor([1.0, 2.0])
    kf.exponential_average(running, torch.tensor([3.0, 0.0]), 0.25)
    torch.testing.assert_close(running, torch.tensor([1.5, 1.5]))
    assert math.isclose(float(running.sum()), 3.0)
