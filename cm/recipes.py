"""Schedules of the later consistency recipes, iCT and ECT (pure functions).

iCT: Song & Dhariwal 2023, "Improved techniques for training consistency models".
ECT: Geng et al. 2024, "Consistency models made easy" (consistency tuning).
Both train the same network with the same loop as CD/CT; only the noise levels
drawn per sample, the loss weights and the distance differ (see `cm.losses`).
"""

import math

import torch

from .schedules import RHO, SIGMA_MAX, SIGMA_MIN, karras_sigma

P_MEAN, P_STD = -1.1, 2.0  # log-normal of both recipes
RECIPE_MODES = ("ect", "ict")  # training modes of cm_train.py that use these schedules


# ----------------------------------------------------------------------------
# How each training mode's network is called: scalings in training and in
# sampling, σ_min of a new run, the few-step sampler and the uint8 conversion.
# (These become columns of the recipe table's rows.)

ECT_SIGMA_MIN = 0.003  # ECT's ECMPrecond default; its networks' boundary condition sits there

_CM = dict(train_scalings="boundary", sample_scalings="boundary", sigma_min=SIGMA_MIN, fewstep="cm",
           quantize="truncate")
_EDM = dict(_CM, train_scalings="edm", sample_scalings="edm")
PRECOND_ROWS = {
    "edm": _EDM,
    "progdist": _EDM,
    "consistency_distillation": _CM,
    "consistency_training": _CM,
    "ict": _CM,
    # ECT: ECMPrecond trains with EDM's scalings and evaluates with the boundary condition at
    # σ_min 0.003; its few-step generator neither clamps nor shrinks the re-noising; its FID rounds
    "ect": dict(train_scalings="edm", sample_scalings="boundary", sigma_min=ECT_SIGMA_MIN, fewstep="ect",
                quantize="round"),
}


def precond_row(training_mode):
    """The scalings/sampler/uint8 row of ``training_mode`` (one of `PRECOND_ROWS`)."""
    if training_mode not in PRECOND_ROWS:
        raise ValueError(f"unknown training_mode {training_mode!r}; choose one of {', '.join(PRECOND_ROWS)}")
    return PRECOND_ROWS[training_mode]


# ----------------------------------------------------------------------------
# iCT


def ict_num_scales(step, total_steps, s0=10, s1=1280):
    """N(k) = min(s0·2^⌊k/K′⌋, s1) + 1 with K′ = ⌊K/(log2⌊s1/s0⌋ + 1)⌋ (iCT eq. 6).

    K′ is at least 1, so runs shorter than the number of doublings still work.
    """
    k_prime = max(1, math.floor(total_steps / (math.log2(s1 // s0) + 1)))
    return int(min(s0 * 2 ** (step // k_prime), s1) + 1)


def ict_sigmas(num_points, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
    """The ascending Karras grid σ_1 < ... < σ_N (float64 tensor)."""
    u = torch.linspace(1, 0, num_points, dtype=torch.float64)
    return karras_sigma(u, sigma_min, sigma_max, rho)


def ict_index_probs(sigmas, p_mean=P_MEAN, p_std=P_STD):
    """p(i) ∝ erf((ln σ_{i+1} − P_mean)/(√2 P_std)) − erf((ln σ_i − P_mean)/(√2 P_std)) (iCT §3.5).

    ``sigmas`` ascending; one probability per adjacent pair (i, i+1).
    """
    cdf = torch.erf((torch.log(sigmas.double()) - p_mean) / (math.sqrt(2) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


def ict_weights(sigmas):
    """λ(σ_i) = 1/(σ_{i+1} − σ_i) per adjacent pair of the ascending grid (iCT §3.4)."""
    return 1.0 / (sigmas[1:] - sigmas[:-1])


def pseudo_huber_c(dim):
    """iCT's pseudo-Huber constant c = 0.00054·√d for d = C·H·W values per sample."""
    return 0.00054 * math.sqrt(dim)


def ict_draw(
    num_points, n, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO, device="cpu", generator=None,
    p_mean=P_MEAN, p_std=P_STD,
):
    """(σ_i, σ_{i+1}, weight) for n samples: i from the discretised log-normal on the N-point grid."""
    sigmas = ict_sigmas(num_points, sigma_min, sigma_max, rho)
    i = torch.multinomial(ict_index_probs(sigmas, p_mean, p_std), n, replacement=True, generator=generator)
    weights = ict_weights(sigmas)[i]
    return tuple(v.float().to(device) for v in (sigmas[i], sigmas[i + 1], weights))


def ict_ema_and_scales_fn(total_steps, s0=10, s1=1280):
    """step ↦ (target EMA μ, N): iCT has no EMA target (μ = 0, θ⁻ = stopgrad θ)."""
    return lambda step: (0.0, ict_num_scales(step, total_steps, s0, s1))


# ----------------------------------------------------------------------------
# ECT


def ect_stage(step, double):
    """The stage ⌊step / double⌋ of ECT's halving of t − r."""
    return int(step // double)


ECT_MIN_SHRINK = 1e-6  # (t − r)/t never below this: float32 would round r to t and t − r to 0


def ect_r(t, stage, q=2.0, k=8.0, b=1.0):
    """r = max(0, t·(1 − (1 + k·σ(−b·t))/q^(stage+1))) (ECT, 'sigmoid' mapping); t a tensor.

    (t − r)/t is kept at least `ECT_MIN_SHRINK`, which only late stages of a
    large q (e.g. the 1-hour preset's 256 from stage 2 on) ever reach.
    """
    shrink = (1 + k * torch.sigmoid(-b * t)) * q ** -(stage + 1)
    return torch.clamp(t * (1 - shrink.clamp(min=ECT_MIN_SHRINK)), min=0.0)


def ect_draw_t(n, p_mean=P_MEAN, p_std=P_STD, device="cpu", generator=None):
    """t = exp(P_mean + P_std·n), n ~ N(0, 1), per sample."""
    return torch.exp(p_mean + p_std * torch.randn(n, generator=generator)).to(device)


def ect_ema_and_scales_fn(double):
    """step ↦ (target EMA μ, stage): ECT has no EMA target either (μ = 0)."""
    return lambda step: (0.0, ect_stage(step, double))


def recipe_ema_and_scales_fn(training_mode, total_steps, start_scales, end_scales, ect_double):
    """The (μ, N-or-stage) schedule of an ``ict`` or ``ect`` run."""
    if training_mode == "ict":
        return ict_ema_and_scales_fn(total_steps, start_scales, end_scales)
    return ect_ema_and_scales_fn(ect_double)


def stats(values):
    """(mean, min, max) of a tensor as floats, for logging."""
    v = values.detach().double()
    return float(v.mean()), float(v.min()), float(v.max())

