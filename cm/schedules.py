"""Noise-level grids and the consistency-training schedules (pure functions).

The Karras et al. (2022, eq. 5) ρ-schedule is defined once, in `karras_sigma`;
everything else (sampler grids, loss discretisations, multistep indices) calls it.
"""

import numpy as np
import torch

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0


def karras_sigma(u, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
    """σ at fraction u ∈ [0, 1] of the way from σ_max to σ_min (Karras eq. 5).

    σ(u) = (σ_max^{1/ρ} + u·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ.  `u` may be a float,
    a NumPy array or a tensor; the result has the same kind.
    """
    max_inv_rho = sigma_max ** (1 / rho)
    min_inv_rho = sigma_min ** (1 / rho)
    return (max_inv_rho + u * (min_inv_rho - max_inv_rho)) ** rho


def karras_ramp_position(sigma, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
    """Where σ lies on the ρ-ramp: (σ^{1/ρ} − σ_min^{1/ρ})/(σ_max^{1/ρ} − σ_min^{1/ρ}), 0 at σ_min, 1 at σ_max.

    The inverse of `karras_sigma` read from the other end: karras_sigma(1 − p) = σ.
    """
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (sigma ** (1 / rho) - lo) / (hi - lo)


def sigma_at(i, n, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
    """σ_i of an n-point ρ-schedule (i = 0 gives σ_max, i = n−1 gives σ_min)."""
    return karras_sigma(i / (n - 1), sigma_min, sigma_max, rho)


def get_sigmas_karras(n, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO, device="cpu"):
    """The n-point ρ-schedule from σ_max down to σ_min, with a trailing 0 (n+1 values)."""
    ramp = torch.linspace(0, 1, n)
    sigmas = karras_sigma(ramp, sigma_min, sigma_max, rho)
    return torch.cat([sigmas, sigmas.new_zeros([1])]).to(device)


def progressive_scales(step, total_steps, start_scales, end_scales):
    """N(k) − 1 of the progressive schedule (CM paper, App. C), at least 1."""
    n = np.ceil(
        np.sqrt(
            (step / total_steps) * ((end_scales + 1) ** 2 - start_scales**2)
            + start_scales**2
        )
        - 1
    ).astype(np.int32)
    return np.maximum(n, 1)


def progdist_scales(step, start_scales, distill_steps_per_iter):
    """Number of steps of the progressive-distillation stage at `step`.

    Halves every `distill_steps_per_iter` steps down to 2; the 2-step stage then
    lasts two periods and is followed by a final 1-step stage.
    """
    stage = step // distill_steps_per_iter
    scales = np.maximum(start_scales // (2**stage), 2)
    sub_stage = np.maximum(step - distill_steps_per_iter * (np.log2(start_scales) - 1), 0)
    sub_stage = sub_stage // (distill_steps_per_iter * 2)
    sub_scales = np.maximum(2 // (2**sub_stage), 1)
    return np.where(scales == 2, sub_scales, scales)


def create_ema_and_scales_fn(
    target_ema_mode,
    start_ema,
    scale_mode,
    start_scales,
    end_scales,
    total_steps,
    distill_steps_per_iter,
):
    """Return step ↦ (target EMA rate μ, number of discretisation steps N)."""
    modes = (target_ema_mode, scale_mode)
    supported = {
        ("fixed", "fixed"),
        ("fixed", "progressive"),
        ("adaptive", "progressive"),
        ("fixed", "progdist"),
    }
    if modes not in supported:
        raise ValueError(
            f"unsupported (target_ema_mode, scale_mode) = {modes}; "
            f"choose one of {sorted(supported)}"
        )

    def ema_and_scales_fn(step):
        if modes == ("fixed", "fixed"):
            target_ema, scales = start_ema, start_scales
        elif modes == ("fixed", "progressive"):
            target_ema = start_ema
            scales = progressive_scales(step, total_steps, start_scales, end_scales) + 1
        elif modes == ("adaptive", "progressive"):
            n = progressive_scales(step, total_steps, start_scales, end_scales)
            # μ(k) = exp(s0·ln μ0 / N(k)), CM paper App. C
            target_ema = np.exp(np.log(start_ema) * start_scales / n)
            scales = n + 1
        else:
            target_ema = 1.0
            scales = progdist_scales(step, start_scales, distill_steps_per_iter)
        return float(target_ema), int(scales)

    return ema_and_scales_fn
