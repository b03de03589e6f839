"""Samplers: pure functions ``sample_*(denoiser, x, sigmas, generator, ...) -> x``.

``denoiser(x, σ)`` returns D(x, σ) for a batch σ of shape [N]; ``sigmas`` is the
grid from σ_max down (ending in 0 where the sampler integrates to 0);
``generator`` supplies ``randn_like``. Noise draws happen in the same order as
in the original code, so seeded runs reproduce its samples.
"""

import numpy as np
import torch
from tqdm.auto import tqdm

from .nn import append_dims
from .schedules import sigma_at


def to_d(x, sigma, denoised):
    """ODE derivative dx/dσ = (x − D(x, σ))/σ."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def get_ancestral_step(sigma_from, sigma_to):
    """(σ_down, σ_up) for an ancestral step from σ_from to σ_to."""
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _steps(n, progress):
    return tqdm(range(n), desc="sampling", leave=False) if progress else range(n)


# Karras Alg. 2's S_churn, S_tmin, S_tmax, S_noise of heun and dpm; these values: no churn
CHURN_DEFAULTS = dict(s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0)


def churn_kwargs(args):
    """The four churn keywords from an argparse namespace (or any object with those attributes)."""
    return {name: getattr(args, name) for name in CHURN_DEFAULTS}


def _churn(sigma, n_steps, s_churn, s_tmin, s_tmax):
    """γ of Karras Alg. 2: min(S_churn/n, √2−1) inside [S_tmin, S_tmax], else 0."""
    return min(s_churn / n_steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0


def _churned_slope(denoiser, x, sigmas, i, generator, callback, s_churn, s_tmin, s_tmax, s_noise):
    """(x̂, σ̂, dx/dσ at x̂) of Karras Alg. 2 lines 4–7, shared by heun and dpm.

    Raise σ_i to σ̂ = (1+γ)σ_i by adding noise (ε is drawn every step, also
    when γ = 0, as the original does), then evaluate the ODE's slope there.
    """
    gamma = _churn(sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax)
    eps = generator.randn_like(x) * s_noise
    sigma_hat = sigmas[i] * (gamma + 1)
    if gamma > 0:
        x = x + eps * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
    denoised = denoiser(x, sigma_hat * x.new_ones([x.shape[0]]))
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
    return x, sigma_hat, to_d(x, sigma_hat, denoised)


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, generator, progress=False, callback=None):
    """Euler's method on the probability-flow ODE (Karras Alg. 1 without the correction)."""
    s_in = x.new_ones([x.shape[0]])
    for i in _steps(len(sigmas) - 1, progress):
        sigma = sigmas[i]
        denoised = denoiser(x, sigma * s_in)
        d = to_d(x, sigma, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "denoised": denoised})
        x = x + d * (sigmas[i + 1] - sigma)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, generator, progress=False, callback=None):
    """Ancestral sampling with Euler steps."""
    s_in = x.new_ones([x.shape[0]])
    for i in _steps(len(sigmas) - 1, progress):
        denoised = denoiser(x, sigmas[i] * s_in)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1])
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        x = x + generator.randn_like(x) * sigma_up
    return x


@torch.no_grad()
def sample_heun(
    denoiser,
    x,
    sigmas,
    generator,
    progress=False,
    callback=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
):
    """Karras et al. (2022) Alg. 2: Heun's method with stochastic churn."""
    s_in = x.new_ones([x.shape[0]])
    churn = (s_churn, s_tmin, s_tmax, s_noise)
    for i in _steps(len(sigmas) - 1, progress):
        x, sigma_hat, d = _churned_slope(denoiser, x, sigmas, i, generator, callback, *churn)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt  # Euler step to σ = 0
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], denoiser(x_2, sigmas[i + 1] * s_in))
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm(
    denoiser,
    x,
    sigmas,
    generator,
    progress=False,
    callback=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
):
    """DPM-Solver-2 style midpoint sampler (Karras et al. 2022, with churn)."""
    s_in = x.new_ones([x.shape[0]])
    churn = (s_churn, s_tmin, s_tmax, s_noise)
    for i in _steps(len(sigmas) - 1, progress):
        x, sigma_hat, d = _churned_slope(denoiser, x, sigmas, i, generator, callback, *churn)
        sigma_mid = ((sigma_hat ** (1 / 3) + sigmas[i + 1] ** (1 / 3)) / 2) ** 3  # midpoint in σ^{1/3}
        x_2 = x + d * (sigma_mid - sigma_hat)
        d_2 = to_d(x_2, sigma_mid, denoiser(x_2, sigma_mid * s_in))
        x = x + d_2 * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_onestep(distiller, x, sigmas, generator=None, progress=False, callback=None):
    """One-step consistency sampling: f(x_T, σ_max)."""
    s_in = x.new_ones([x.shape[0]])
    return distiller(x, sigmas[0] * s_in)


@torch.no_grad()
def stochastic_iterative_sampler(
    distiller,
    x,
    sigmas,
    generator,
    ts,
    progress=False,
    callback=None,
    t_min=0.002,
    t_max=80.0,
    rho=7.0,
    steps=40,
):
    """Multistep consistency sampling (CM paper Alg. 1) at indices `ts` of a `steps`-point grid.

    Denoise at each index but the last, then re-noise to the next index's level:
    x = f(x, t_i) + √(t_{i+1}² − σ_min²)·z.
    """
    s_in = x.new_ones([x.shape[0]])
    for i in _steps(len(ts) - 1, progress):
        t = sigma_at(ts[i], steps, t_min, t_max, rho)
        x0 = distiller(x, t * s_in)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": t, "denoised": x0})
        next_t = np.clip(sigma_at(ts[i + 1], steps, t_min, t_max, rho), t_min, t_max)
        x = x0 + generator.randn_like(x) * np.sqrt(next_t**2 - t_min**2)
    return x


@torch.no_grad()
def sample_multistep_sigmas(distiller, x, sigmas, generator, progress=False, callback=None, t_min=0.002):
    """Multistep consistency sampling (CM paper Alg. 1) at the given descending noise levels.

    Denoise at every level (NFE = len(sigmas)), re-noising in between:
    x = f(x, σ_i) + √(σ_{i+1}² − σ_min²)·z. ECT/iCT two-step: sigmas = (80, 0.821).
    """
    s_in = x.new_ones([x.shape[0]])
    for i in _steps(len(sigmas), progress):
        x0 = distiller(x, sigmas[i] * s_in)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": x0})
        if i + 1 < len(sigmas):
            x = x0 + generator.randn_like(x) * np.sqrt(sigmas[i + 1] ** 2 - t_min**2)
    return x0


@torch.no_grad()
def sample_ect_fewstep(distiller, x, sigmas, generator, progress=False, callback=None):
    """ECT's few-step generator at the given descending noise levels (NFE = len(sigmas)).

    x = f(x, σ_i), then x = x + σ_{i+1}·z: unlike CM's Alg. 1 the re-noising is
    not shrunk by σ_min and ``distiller`` is called unclamped (ECT clamps nothing).
    Two steps: f(f(x_T, 80) + 0.821·z, 0.821).
    """
    s_in = x.new_ones([x.shape[0]])
    for i in _steps(len(sigmas), progress):
        x0 = distiller(x, sigmas[i] * s_in)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": x0})
        x = x0
        if i + 1 < len(sigmas):
            x = x0 + generator.randn_like(x0) * sigmas[i + 1]
    return x


FEWSTEP = ("cm", "ect")  # CM's Alg. 1 (clamped f, √(σ² − σ_min²) re-noising) or ECT's generator


@torch.no_grad()
def sample_progdist(denoiser, x, sigmas, generator=None, progress=False, callback=None):
    """Euler sampling over the grid without its trailing 0 (progressive-distillation models)."""
    s_in = x.new_ones([x.shape[0]])
    sigmas = sigmas[:-1]
    for i in _steps(len(sigmas) - 1, progress):
        sigma = sigmas[i]
        denoised = denoiser(x, sigma * s_in)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "denoised": denoised})
        x = x + to_d(x, sigma, denoised) * (sigmas[i + 1] - sigma)
    return x


@torch.no_grad()
def sample_meanflow(velocity, x, times, generator=None, progress=False, callback=None):
    """MeanFlow few-step sampling (Geng et al. 2025, Alg. 2): x ← x − (t − s)·u(x, t, s) per consecutive (t, s).

    ``velocity(x, t, r)`` is the average velocity u with t, r of shape [N]; ``x``
    the start at times[0] (FastGen's latent times[0]·e); ``times`` descending.
    """
    s_in = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
    for i in _steps(len(times) - 1, progress):
        t, s = float(times[i]), float(times[i + 1])
        u = velocity(x, t * s_in, s * s_in)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "u": u})
        x = x - (t - s) * u
    return x


# samplers of a two-time flow network u(x, t, r) (the time grid is theirs, not the Karras σ grid)
FLOW_SAMPLERS = {"meanflow": sample_meanflow}

SAMPLERS = {
    "heun": sample_heun,
    "dpm": sample_dpm,
    "ancestral": sample_euler_ancestral,
    "onestep": sample_onestep,
    "progdist": sample_progdist,
    "euler": sample_euler,
    "multistep": stochastic_iterative_sampler,
}
