"""What the training loops log of a batch's loss terms (`cm.logger` means over the log interval).

Every term's batch mean and its mean per noise bin ``<term>_q0..q3`` (fixed
quarters of the ρ-ramp between σ_min and σ_max, `cm.schedules.noise_bins`);
for a recipe row, its ``monitors`` (per-sample values, their means) and, for a
loss of pairs (t, r), t_mean, r_over_t (mean r/t) and r_zero (share of r = 0).
"""

from . import logger
from .schedules import noise_bins


def log_loss_dict(diffusion, sigmas, losses):
    """Log the batch mean of every loss term and its mean per noise bin (``_q0``..``_q3``)."""
    bins = noise_bins(sigmas, diffusion.sigma_min, diffusion.sigma_max, diffusion.rho).cpu().numpy()
    for key, values in losses.items():
        values = values.detach().float().cpu().numpy()
        logger.logkv_mean(key, values.mean())
        for b, v in zip(bins, values):
            logger.logkv_mean(f"{key}_q{b}", v)


def log_recipe_losses(diffusion, losses, monitors=()):
    """A recipe loss's dict (per-sample "loss", "sigmas", optionally "r"): the loss by bin, monitors, pairs."""
    log_loss_dict(diffusion, losses["sigmas"], {"loss": losses["loss"]})
    for key in monitors:
        logger.logkv_mean(key, losses[key].detach().float().mean().item())
    if "r" in losses:  # a pair of levels (t, r) per sample
        logger.logkv_mean("t_mean", losses["sigmas"].mean().item())
        logger.logkv_mean("r_over_t", (losses["r"] / losses["sigmas"]).mean().item())
        logger.logkv_mean("r_zero", (losses["r"] == 0).float().mean().item())
