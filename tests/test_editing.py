"""Zero-shot editing loops keep exactly what the observation fixes."""

import torch

from cm.editing import iterative_colorization, iterative_inpainting, iterative_superres
from cm.random_util import get_generator

TS = [0, 20, 39]


def distiller(x, sigma):
    """Some consistency-like map: a bounded function of the noisy input."""
    return torch.tanh(x / (1 + sigma.view(-1, 1, 1, 1)))


def inputs(n=2, size=16):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    x = torch.randn(n, 3, size, size, generator=g) * 80
    return images, x


def test_inpainting_keeps_the_known_pixels():
    images, x = inputs()
    mask = torch.zeros(3, 16, 16)
    mask[:, :, :8] = 1
    out, reference = iterative_inpainting(distiller, images, x, TS, mask, generator=get_generator("dummy"))
    # the last level is σ_min, so only float rounding of σ_min is re-noised
    torch.testing.assert_close(out[..., :8], images[..., :8], atol=1e-6, rtol=0)
    assert torch.equal(reference[..., 8:], -torch.ones_like(reference[..., 8:]))
    assert not torch.allclose(out[..., 8:], images[..., 8:])


def test_colorization_keeps_the_luminance():
    images, x = inputs()
    out, reference = iterative_colorization(distiller, images, x, TS, generator=get_generator("dummy"))
    w = torch.tensor([0.2989, 0.5870, 0.1140]).view(1, 3, 1, 1)
    luma = lambda t: (t * w).sum(1)  # noqa: E731
    torch.testing.assert_close(luma(out), luma(images), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(luma(reference), luma(images), atol=1e-5, rtol=1e-5)
    # the reference keeps the luminance direction only: it is luma·w/|w|²
    torch.testing.assert_close(reference, luma(images)[:, None] * w / w.square().sum(), atol=1e-5, rtol=1e-5)


def test_superres_keeps_the_patch_means():
    images, x = inputs()
    out, reference = iterative_superres(distiller, images, x, TS, generator=get_generator("dummy"), patch_size=4)
    pool = lambda t: torch.nn.functional.avg_pool2d(t, 4)  # noqa: E731
    torch.testing.assert_close(pool(out), pool(images), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference, torch.nn.functional.interpolate(pool(images), scale_factor=4), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------
# Closed form: data ~ N(0, Σ) with Σ = v·vᵀ + ε²·I, whose consistency function is exact:
# in Σ's eigenbasis (eigenvalues λ) the probability-flow ODE scales each coordinate by
# √(λ+σ'²)/√(λ+σ²), so f(x, σ) = U·diag(√(λ+σ_min²)/√(λ+σ²))·Uᵀ·x.

import math  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cm.edit_util import build_plan, run_plan, start_schedule  # noqa: E402
from cm.editing import (  # noqa: E402
    colorize_observation,
    edit_with_sigmas,
    inpaint_observation,
    schedule_sigmas,
    slerp,
    superres_observation,
)

SHAPE = (3, 4, 4)
EPS = 0.01
SIGMA_MIN = 0.002
SIGMAS_80 = schedule_sigmas(range(80), 80)


def gaussian(seed=0):
    """(Σ, its eigenvalues λ, eigenvectors U, the direction v): a rank-one signal plus ε² white noise."""
    d = math.prod(SHAPE)
    # a mostly grey, mostly flat direction: the luma and the block means see most of it
    v = 1 + 0.5 * torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    v = 1.5 * v / v.norm()  # entries ≲ 0.8 for the draws below: the loop's clamp to [−1, 1] never bites
    cov = torch.outer(v, v) + EPS**2 * torch.eye(d, dtype=torch.float64)
    lam, u = torch.linalg.eigh(cov)
    return cov, lam.clamp(min=0), u, v


def exact_f(lam, u):
    def f(x, sigma):
        s = sigma.double()[:, None]
        gain = torch.sqrt(lam + SIGMA_MIN**2) / torch.sqrt(lam + s**2)  # [n, d]
        coords = x.double().flatten(1) @ u
        return ((coords * gain) @ u.T).reshape(x.shape).to(x.dtype)

    return f


def draw(cov, n, seed):
    chol = torch.linalg.cholesky(cov)
    z = torch.randn(n, cov.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (z @ chol.T).reshape(n, *SHAPE)


def kept_projection(replacement):
    """The matrix P of the observation: replacement(e_i, 0) for every basis vector e_i."""
    d = math.prod(SHAPE)
    eye = torch.eye(d, dtype=torch.float64).reshape(d, *SHAPE)
    return replacement(eye, torch.zeros_like(eye)).reshape(d, d).T


OBSERVATIONS = {
    "inpaint": lambda x: inpaint_observation(x, (torch.arange(4) < 2).double().expand(1, 4, 4)),
    "colorize": lambda x: colorize_observation(x),
    "superres": lambda x: superres_observation(x, 2),
}


@pytest.mark.parametrize("task", list(OBSERVATIONS))
def test_edits_keep_the_observation_and_reach_the_conditional_mean(task):
    """Kept coordinates equal the observation; the rest is E[x | observation] up to the ε-sized spread."""
    cov, lam, u, _ = gaussian()
    truth = draw(cov, 4, seed=1)
    reference, replacement = OBSERVATIONS[task](truth)
    x_T = torch.randn(truth.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 80
    out = edit_with_sigmas(
        exact_f(lam, u), x_T, SIGMAS_80, lambda x0: replacement(reference, x0), get_generator("determ", 4, 3)
    )
    p = kept_projection(replacement)
    flat = out.flatten(1)
    # kept coordinates: exactly the observation (up to the float rounding of the basis change)
    torch.testing.assert_close(flat @ p.T, truth.flatten(1) @ p.T, atol=1e-12, rtol=0)
    if task == "inpaint":
        assert torch.equal(out[..., :2], truth[..., :2])
    # edited coordinates: the Gaussian conditional mean Σ·P·(P·Σ·P)⁺·P·y
    cond = (cov @ p @ torch.linalg.pinv(p @ cov @ p, hermitian=True) @ p @ truth.flatten(1).T).T
    free = torch.eye(len(p), dtype=torch.float64) - p
    err = (flat - cond) @ free.T
    # the conditional law leaves white ε-noise on the free coordinates: the error is that size, no more
    rms = err.square().sum(1).div(free.trace()).sqrt()
    assert ((rms > 0.5 * EPS) & (rms < 2 * EPS)).all(), rms
    assert err.abs().max() < 6 * EPS, err.abs().max()
    # and the observation really leaves something to fill in
    assert ((truth.flatten(1) - reference.flatten(1)) @ free.T).abs().max() > 10 * EPS


def test_the_schedule_is_the_one_asked_for():
    """The consistency function sees exactly the listed σ's, all but the last; the last is only re-noising."""
    seen = []

    def f(x, sigma):
        seen.append(sigma.tolist())
        return torch.zeros_like(x)

    edit_with_sigmas(f, torch.zeros(2, *SHAPE), [80.0, 5.0, 0.5, 0.002], generator=get_generator("dummy"))
    assert seen == [[80.0, 80.0], [5.0, 5.0], [0.5, 0.5]]
    torch.testing.assert_close(torch.tensor(schedule_sigmas([0, 39], 40)), torch.tensor([80.0, 0.002]))
    assert start_schedule(20.0, [80.0, 5.0, 0.5, 0.002], 0.002) == [20.0, 5.0, 0.5, 0.002]
    assert start_schedule(0.2, [80.0, 5.0], 0.002) == [0.2, 0.002]


def plan_args(task, **kw):
    base = dict(task=task, sigma_max=80.0, sigma_min=0.002, image_size=4, generator="determ", seed=3,
                class_cond=False, mask="right", factor=2, strength=2.0, noise_sigma=0.3, num_images=2, num_points=3)  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def one_step(task, images=None, **kw):
    """run_plan with one denoise (σ list [start, σ_min]) and the exact f; returns (plan, uint8 results, seen σ)."""
    cov, lam, u, _ = gaussian()
    f, seen = exact_f(lam, u), []

    def distiller(x, sigma, y):
        seen.append(float(sigma[0]))
        return f(x.double(), sigma).float()

    plan = build_plan(plan_args(task, **kw), [80.0, 0.002], None, images)
    out = run_plan(distiller, plan, batch_size=2, shape=SHAPE, seed=3, device="cpu", progress=False)
    return plan, out, seen, f


def to_u8(x):
    return ((x.clamp(-1, 1) + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_denoise_is_the_consistency_function_at_the_noise_level():
    images = draw(gaussian()[0], 3, seed=4).float().clamp(-1, 1)
    plan, out, seen, f = one_step("denoise", images)
    noisy = plan.reference
    assert seen == pytest.approx([0.3, 0.3]) and plan.sigmas == [0.3, 0.002]
    assert 0.2 < (noisy - images).std() < 0.4  # the degradation is noise of the asked size
    expected = f(noisy.double(), torch.full((3,), 0.3)).float()
    assert np.abs(out.astype(int) - to_u8(expected).astype(int)).max() <= 1


def test_stroke_starts_from_the_input_at_its_strength():
    images = draw(gaussian()[0], 2, seed=5).float().clamp(-1, 1)
    plan, out, seen, f = one_step("stroke", images)
    assert seen == [2.0] and plan.sigmas == [2.0, 0.002]
    z = get_generator("determ", 2, 3).randn(2, *SHAPE)
    expected = f((images + 2.0 * z).double(), torch.full((2,), 2.0)).float()
    assert np.abs(out.astype(int) - to_u8(expected).astype(int)).max() <= 1


def test_interpolation_walks_the_great_circle_between_two_seeds():
    plan, out, seen, f = one_step("interpolate")
    z = get_generator("determ", 4, 3).randn(4, *SHAPE)  # image_sample.py's x_T of samples 0..3
    assert plan.n == 6 and plan.extra["pairs"].tolist() == [0, 0, 0, 1, 1, 1]
    ends = f(z.double() * 80, torch.full((4,), 80.0)).float()
    assert np.abs(out[[0, 2, 3, 5]].astype(int) - to_u8(ends).astype(int)).max() <= 1
    mid = slerp(z[0:1].double(), z[1:2].double(), 0.5)
    torch.testing.assert_close(mid.norm(), (z[0].double().norm() + z[1].double().norm()) / 2, rtol=0.05, atol=0)
    torch.testing.assert_close(slerp(z[0:1], z[1:2], torch.tensor([0.0])), z[0:1])
