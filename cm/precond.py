"""Preconditioning of the network (Karras et al. 2022, Table 1; CM paper eq. 7).

D(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ)).
"""

import torch

SIGMA_DATA = 0.5


def edm_scalings(sigma, sigma_data=SIGMA_DATA):
    """(c_skip, c_out, c_in) of EDM."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    c_in = 1 / (sigma**2 + sigma_data**2) ** 0.5
    return c_skip, c_out, c_in


def boundary_condition_scalings(sigma, sigma_data=SIGMA_DATA, sigma_min=0.002):
    """(c_skip, c_out, c_in) of a consistency model: c_skip(σ_min)=1, c_out(σ_min)=0."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    c_in = 1 / (sigma**2 + sigma_data**2) ** 0.5
    return c_skip, c_out, c_in


# EDM's; the consistency model's boundary condition at σ_min; none: the network's raw output is the
# quantity (MeanFlow's average velocity u, read by a flow sampler: no denoiser)
SCALINGS = ("edm", "boundary", "none")


def scalings(kind, sigma, sigma_data=SIGMA_DATA, sigma_min=0.002):
    """(c_skip, c_out, c_in) of ``kind``: "edm" (σ_min unused) or "boundary"."""
    if kind == "edm":
        return edm_scalings(sigma, sigma_data)
    if kind == "boundary":
        return boundary_condition_scalings(sigma, sigma_data, sigma_min)
    if kind == "none":
        raise ValueError("a model of raw outputs (scalings 'none', MeanFlow) is no denoiser: use its flow sampler")
    raise ValueError(f"unknown scalings {kind!r}; choose one of {', '.join(SCALINGS)}")


def c_noise(sigma):
    """The network's time input: 250·ln σ (1e-44 keeps σ = 0 finite)."""
    return 1000 * 0.25 * torch.log(sigma + 1e-44)


def snr(sigma):
    """Signal-to-noise ratio σ⁻²."""
    return sigma**-2


def get_weightings(weight_schedule, snrs, sigma_data=SIGMA_DATA):
    """Loss weight λ(σ) from the SNR, by schedule name."""
    if weight_schedule == "snr":
        return snrs
    if weight_schedule == "snr+1":
        return snrs + 1
    if weight_schedule == "karras":
        return snrs + 1.0 / sigma_data**2
    if weight_schedule == "truncated-snr":
        return torch.clamp(snrs, min=1.0)
    if weight_schedule == "uniform":
        return torch.ones_like(snrs)
    raise ValueError(
        f"unknown weight_schedule {weight_schedule!r}; "
        "choose snr, snr+1, karras, truncated-snr or uniform"
    )


WEIGHT_SCHEDULES = ("snr", "snr+1", "karras", "truncated-snr", "uniform")
