"""Closed-form checks with data ~ N(0, s²), whose denoiser and ODE are exact.

D(x, σ) = s²/(s²+σ²)·x; the probability-flow ODE keeps x/√(s²+σ²) constant;
the consistency function is f(x, σ) = x·√(s²+σ_min²)/√(s²+σ²).
"""

import math

import torch

from cm import losses
from cm.karras_diffusion import KarrasDenoiser, karras_sample
from cm.random_util import get_generator
from cm.samplers import SAMPLERS, sample_dpm, sample_euler, sample_heun
from cm.schedules import get_sigmas_karras

S = 0.5  # data std
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def exact_denoiser(x, sigma):
    s2 = sigma.double() ** 2
    return (S**2 / (S**2 + s2)).view(-1, *[1] * (x.ndim - 1)).to(x.dtype) * x


def exact_consistency(x, sigma):
    scale = math.sqrt(S**2 + SIGMA_MIN**2) / torch.sqrt(S**2 + sigma.double() ** 2)
    return scale.view(-1, *[1] * (x.ndim - 1)).to(x.dtype) * x


def ode_solution(x_T):
    """x at σ = 0 of the exact probability-flow ODE started at σ_max."""
    return x_T * S / math.sqrt(S**2 + SIGMA_MAX**2)


def x_T(n=64):
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * SIGMA_MAX


def relative_error(sampler, steps):
    x = x_T()
    out = sampler(exact_denoiser, x, get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX).double(), get_generator("dummy"))
    exact = ode_solution(x)
    return ((out - exact).norm() / exact.norm()).item()


def test_heun_lands_on_the_exact_ode_solution():
    errors = [relative_error(sample_heun, n) for n in (10, 20, 40, 80, 160)]
    assert errors[2] < 1.5e-2 and errors[-1] < 1e-3, errors
    # second order: halving the step size divides the error by ~4
    for coarse, fine in zip(errors[1:], errors[2:]):
        assert coarse / fine > 2.5 and coarse / fine < 6, errors


def test_euler_converges_at_first_order():
    errors = [relative_error(sample_euler, n) for n in (20, 40, 80)]
    assert errors[-1] < 0.05
    for coarse, fine in zip(errors, errors[1:]):
        assert coarse / fine > 1.5 and coarse / fine < 2.6, errors


def test_dpm_solver_lands_on_the_exact_ode_solution():
    errors = [relative_error(sample_dpm, n) for n in (40, 80)]
    assert errors[0] < 5e-3 and 3 < errors[0] / errors[1] < 5, errors


def test_karras_sample_with_an_exact_model_through_the_denoiser():
    """A network that makes the EDM parameterisation exact: F = (D − c_skip·x)/c_out."""
    diffusion = KarrasDenoiser(sigma_data=S)

    def model(x_in, t):
        sigma = torch.exp(t / 250.0)  # invert c_noise (1e-44 is negligible here)
        c_skip, c_out, c_in = [c.view(-1, 1, 1, 1) for c in diffusion.get_scalings(sigma)]
        x = x_in / c_in
        return (exact_denoiser(x, sigma) - c_skip * x) / c_out

    shape = (8, 1, 4, 4)
    gen = get_generator("determ", 8, 7)
    out = karras_sample(diffusion, model, shape, steps=40, clip_denoised=False, generator=gen, sampler="heun")
    noise = get_generator("determ", 8, 7).randn(*shape).double() * SIGMA_MAX
    reference = sample_heun(exact_denoiser, noise, get_sigmas_karras(40).double(), get_generator("dummy"))
    torch.testing.assert_close(out.double(), reference.clamp(-1, 1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.double(), ode_solution(noise).clamp(-1, 1), rtol=2e-2, atol=1e-3)


def test_boundary_condition_denoiser_returns_its_input_at_sigma_min():
    diffusion = KarrasDenoiser(distillation=True)

    def model(x, t):  # an arbitrary network output
        return torch.sin(x * 3) + t.view(-1, 1, 1, 1)

    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    sigma = torch.full((3,), SIGMA_MIN, dtype=torch.float64)
    _, denoised = diffusion.denoise(model, x, sigma)
    assert torch.equal(denoised, x)
    # and not elsewhere
    _, denoised = diffusion.denoise(model, x, sigma * 10)
    assert not torch.allclose(denoised, x)


def cd_loss(n_scales):
    """Consistency-distillation loss of the exact consistency function with the exact teacher."""
    torch.manual_seed(0)
    x0 = torch.randn(512, 1, 4, 4, dtype=torch.float64) * S
    diffusion = KarrasDenoiser(sigma_data=S, loss_norm="l2")
    indices = torch.randint(0, n_scales - 1, (x0.shape[0],))
    t = diffusion._grid(indices.double() / (n_scales - 1))
    t_next = diffusion._grid((indices + 1).double() / (n_scales - 1))
    per_sample = losses.consistency_loss(
        exact_consistency,
        exact_consistency,
        x0,
        t,
        t_next,
        torch.randn_like(x0),
        lambda a, b: losses.distance("l2", a, b),
        torch.ones_like(t),
        teacher=exact_denoiser,
    )
    return per_sample.mean().item()


def test_consistency_loss_of_the_exact_solution_vanishes_as_n_grows():
    values = [cd_loss(n) for n in (10, 20, 40, 80)]
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[-1] < 1e-3 * values[0], values
    assert values[-1] < 1e-8


def test_a_wrong_consistency_function_does_not_have_a_vanishing_loss():
    torch.manual_seed(0)
    x0 = torch.randn(256, 1, 4, 4, dtype=torch.float64) * S
    t = torch.full((256,), 1.0, dtype=torch.float64)
    per_sample = losses.consistency_loss(
        lambda x, s: x * 0.9,  # not a consistency function
        lambda x, s: x * 0.9,
        x0,
        t,
        t * 0.9,
        torch.randn_like(x0),
        lambda a, b: losses.distance("l2", a, b),
        torch.ones_like(t),
        teacher=exact_denoiser,
    )
    assert per_sample.mean() > 1e-3


def test_progdist_target_is_exact_for_point_mass_data():
    """Data = δ₀: D ≡ 0, the ODE is x ∝ σ and Euler steps are exact, so the target is 0."""
    zero = lambda x, s: torch.zeros_like(x)  # noqa: E731
    x0 = torch.zeros(16, 1, 4, 4, dtype=torch.float64)
    t = torch.linspace(1, 50, 16, dtype=torch.float64)
    per_sample = losses.progdist_loss(
        zero, zero, x0, t, t * 0.8, t * 0.6, torch.randn_like(x0),
        lambda a, b: losses.distance("l2", a, b), torch.ones_like(t),
    )
    assert per_sample.abs().max() < 1e-20


def test_every_sampler_is_registered():
    assert set(SAMPLERS) == {"heun", "dpm", "ancestral", "onestep", "progdist", "euler", "multistep"}
