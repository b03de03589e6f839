"""sCM closed forms: Gaussian data has an exact denoiser and an exact consistency function."""

import math

import pytest
import torch

from cm.scm import ScmVariant, scm_draw_sigma, scm_loss, tangent_warmup
from cm.trigflow import trigflow_F, trigflow_fd, trigflow_jvp, trigflow_point

S = 0.7  # data standard deviation (≠ σ_d, so nothing cancels by accident)
SIGMA_D = 0.5


def _sigma(timesteps):
    return torch.exp(timesteps.double() / 250)  # the networks' time input is 250·ln σ


class ExactDenoiserNet(torch.nn.Module):
    """The raw EDM network of the exact denoiser D(x; σ) = s²/(s² + σ²)·x of N(0, s²I) data."""

    def forward(self, x_in, timesteps):
        sigma = _sigma(timesteps)[:, None, None, None]
        x = x_in * (sigma**2 + SIGMA_D**2).sqrt()  # c_in·x = x_in
        c_skip = SIGMA_D**2 / (sigma**2 + SIGMA_D**2)
        c_out = sigma * SIGMA_D / (sigma**2 + SIGMA_D**2).sqrt()
        return (S**2 / (S**2 + sigma**2) * x - c_skip * x) / c_out


class ExactConsistencyNet(torch.nn.Module):
    """The raw network whose F gives the exact consistency function f(x̂, t̂) = x̂·s/√(s²cos²t̂ + σ_d²sin²t̂)."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale  # ≠ 1: a perturbed consistency function

    def forward(self, x_in, timesteps):
        t_hat = torch.atan(_sigma(timesteps) / SIGMA_D)[:, None, None, None]
        x_hat = SIGMA_D * x_in
        f = x_hat * S / (S**2 * torch.cos(t_hat) ** 2 + SIGMA_D**2 * torch.sin(t_hat) ** 2).sqrt()
        F = (torch.cos(t_hat) * x_hat - f) / (SIGMA_D * torch.sin(t_hat))
        return -self.scale * F


def _gaussian_batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = S * torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    z = SIGMA_D * torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    t_hat = torch.linspace(0.05, 1.5, n, dtype=torch.float64)
    return x0, z, t_hat


def _scd_loss(student_net, teacher_net, x0, z, t_hat, fd=False, variant=ScmVariant()):
    def student(x_hat, t):
        return trigflow_F(student_net, x_hat, t), torch.zeros(len(t), dtype=torch.float64)  # logvar 0

    def tangent(x_hat, t, dxdt, path, rng):
        if fd:
            return trigflow_fd(student_net, path, t, rng=rng)
        return trigflow_jvp(student_net, x_hat, t, dxdt, rng=rng)[1]

    return scm_loss(student, tangent, x0, z, t_hat, r=1.0, teacher=lambda x, t: trigflow_F(teacher_net, x, t),
                    variant=variant)


@pytest.mark.parametrize("variant", [ScmVariant(), ScmVariant.fastgen()])
def test_exact_consistency_function_has_zero_tangent_and_loss(variant):
    """sCD with the exact teacher: the exact consistency function is constant along the ODE, so g = 0, L = 0."""
    x0, z, t_hat = _gaussian_batch()
    out = _scd_loss(ExactConsistencyNet(), ExactDenoiserNet(), x0, z, t_hat, variant=variant)
    assert out["g_norm"].max() < 1e-10 * out["jvp_norm"].max()
    assert out["loss"].abs().max() < 1e-20


def test_perturbed_consistency_function_has_a_tangent_and_a_loss():
    x0, z, t_hat = _gaussian_batch()
    out = _scd_loss(ExactConsistencyNet(scale=1.05), ExactDenoiserNet(), x0, z, t_hat)
    assert out["g_norm"].min() > 1e-3
    assert out["loss"].min() > 1e-4


def test_scd_finite_differences_follow_the_teacher_direction():
    """--jvp fd in sCD differences along x̂ + (s − t̂)·dx̂/dt̂: with the exact pair it also gives g ≈ 0."""
    x0, z, t_hat = _gaussian_batch()
    exact = _scd_loss(ExactConsistencyNet(), ExactDenoiserNet(), x0, z, t_hat)
    fd = _scd_loss(ExactConsistencyNet(), ExactDenoiserNet(), x0, z, t_hat, fd=True)
    assert (fd["jvp_norm"] - exact["jvp_norm"]).abs().max() < 1e-5 * exact["jvp_norm"].max()
    assert fd["g_norm"].max() < 1e-5 * exact["jvp_norm"].max()


def test_sct_direction_is_the_conditional_velocity():
    """sCT's dx̂/dt̂ = cos t̂·z − sin t̂·x₀ is the derivative of the conditional path x̂(t̂)."""
    from cm.scm import sct_direction

    x0, z, t_hat = _gaussian_batch()
    eps = 1e-6
    fd = (trigflow_point(x0, z, t_hat + eps) - trigflow_point(x0, z, t_hat - eps)) / (2 * eps)
    assert torch.allclose(sct_direction(x0, z, t_hat), fd, atol=1e-8)


def test_time_distribution_is_the_truncated_log_normal():
    g = torch.Generator().manual_seed(0)
    sigma = scm_draw_sigma(200_000, -1.0, 1.4, 0.002, 80.0, generator=g)
    assert sigma.dtype == torch.float64 and sigma.min() >= 0.002 and sigma.max() <= 80.0
    # mean of a truncated normal: μ + s·(φ(a) − φ(b))/(Φ(b) − Φ(a))
    a, b = ((math.log(v) + 1.0) / 1.4 for v in (0.002, 80.0))
    phi = lambda v: math.exp(-v * v / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    Phi = lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2)))  # noqa: E731
    mean = -1.0 + 1.4 * (phi(a) - phi(b)) / (Phi(b) - Phi(a))
    assert abs(float(sigma.log().mean()) - mean) < 0.01
    again = scm_draw_sigma(5, -1.0, 1.4, 0.002, 80.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, scm_draw_sigma(5, -1.0, 1.4, 0.002, 80.0, generator=torch.Generator().manual_seed(3)))


def test_tangent_warmup():
    assert tangent_warmup(0, 10000) == 0.0
    assert tangent_warmup(2500, 10000) == 0.25
    assert tangent_warmup(10000, 10000) == 1.0 and tangent_warmup(20000, 10000) == 1.0
    assert tangent_warmup(5, 0) == 1.0
