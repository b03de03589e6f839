"""The Karras/EDM denoiser and `karras_sample`: thin wiring over the pure modules.

`KarrasDenoiser` holds the noise-schedule constants and the loss configuration,
and delegates the math to `cm.precond`, `cm.losses`, `cm.schedules` and
`cm.samplers`. Names of the original module are re-exported here.
"""

import torch

from . import losses
from .losses import check_loss_norm
from .nn import append_dims, append_zero, mean_flat  # noqa: F401  (re-exported)
from .precond import (
    WEIGHT_SCHEDULES,
    boundary_condition_scalings,
    c_noise,
    edm_scalings,
    get_weightings,
    snr,
)
from .random_util import get_generator
from .samplers import (  # noqa: F401  (re-exported)
    SAMPLERS,
    get_ancestral_step,
    sample_dpm,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_onestep,
    sample_progdist,
    stochastic_iterative_sampler,
    to_d,
)
from .editing import iterative_colorization, iterative_inpainting, iterative_superres  # noqa: F401
from .schedules import get_sigmas_karras, karras_sigma


class KarrasDenoiser:
    """EDM / consistency-model denoiser with its training losses.

    :param distillation: use the consistency-model (boundary-condition)
        scalings instead of EDM's.
    :param loss_norm: distance of the consistency and progdist losses
        ("l1", "l2", "l2-32", "lpips").
    :param lpips_path: LPIPS weights file for ``loss_norm="lpips"`` (else the
        ``CM_LPIPS_PATH`` environment variable); loaded on first use.
    """

    def __init__(
        self,
        sigma_data: float = 0.5,
        sigma_max=80.0,
        sigma_min=0.002,
        rho=7.0,
        weight_schedule="karras",
        distillation=False,
        loss_norm="lpips",
        lpips_path=None,
    ):
        if weight_schedule not in WEIGHT_SCHEDULES:
            raise ValueError(
                f"unknown weight_schedule {weight_schedule!r}; choose one of {', '.join(WEIGHT_SCHEDULES)}"
            )
        check_loss_norm(loss_norm)
        self.sigma_data = sigma_data
        self.sigma_max = sigma_max
        self.sigma_min = sigma_min
        self.rho = rho
        self.weight_schedule = weight_schedule
        self.distillation = distillation
        self.loss_norm = loss_norm
        self.lpips_path = lpips_path
        self.num_timesteps = 40  # size of the index grid of the discrete schedule samplers
        self._lpips = None

    # --- scalings ---------------------------------------------------------
    def get_snr(self, sigmas):
        return snr(sigmas)

    def get_sigmas(self, sigmas):
        return sigmas

    def get_scalings(self, sigma):
        return edm_scalings(sigma, self.sigma_data)

    def get_scalings_for_boundary_condition(self, sigma):
        return boundary_condition_scalings(sigma, self.sigma_data, self.sigma_min)

    def denoise(self, model, x_t, sigmas, **model_kwargs):
        """Return (raw network output F, D = c_skip·x_t + c_out·F)."""
        scalings = self.get_scalings_for_boundary_condition if self.distillation else self.get_scalings
        c_skip, c_out, c_in = [append_dims(c, x_t.ndim) for c in scalings(sigmas)]
        model_output = model(c_in * x_t, c_noise(sigmas), **model_kwargs)
        return model_output, c_out * model_output + c_skip * x_t

    def weightings(self, sigmas):
        """Loss weight λ(σ) per sample."""
        return get_weightings(self.weight_schedule, self.get_snr(sigmas), self.sigma_data)

    # --- distances --------------------------------------------------------
    @property
    def lpips_loss(self):
        """The LPIPS network, loaded from local weights on first use."""
        if self._lpips is None:
            from .lpips import load_lpips

            self._lpips = load_lpips(self.lpips_path)
        return self._lpips

    def distance(self, x, y):
        """Per-sample distance of the configured ``loss_norm``."""
        lpips = None
        if self.loss_norm == "lpips":
            lpips = self.lpips_loss.to(x.device)
        return losses.distance(self.loss_norm, x, y, lpips)

    # --- losses -----------------------------------------------------------
    def _denoiser(self, model, model_kwargs, diffusion=None):
        diffusion = diffusion or self
        return lambda x, t: diffusion.denoise(model, x, t, **model_kwargs)[1]

    @staticmethod
    def _check_teacher(name, teacher_model, teacher_diffusion):
        # the teacher's scalings are EDM's, not the student's boundary condition
        if teacher_model is not None and teacher_diffusion is None:
            raise ValueError(f"{name} got a teacher_model without its teacher_diffusion")

    def training_losses(self, model, x_start, sigmas, model_kwargs=None, noise=None):
        """EDM denoising loss terms ("loss", "mse", "xs_mse") at the given σ per sample."""
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = torch.randn_like(x_start)
        return losses.denoising_loss(
            lambda x, t: self.denoise(model, x, t, **model_kwargs),
            x_start,
            sigmas,
            noise,
            self.weightings(sigmas),
        )

    def consistency_losses(
        self,
        model,
        x_start,
        num_scales,
        model_kwargs=None,
        target_model=None,
        teacher_model=None,
        teacher_diffusion=None,
        noise=None,
    ):
        """Consistency distillation (with a teacher) or training (without) loss terms.

        Adjacent levels t > t' of an N-point ρ-schedule are drawn per sample.
        """
        if target_model is None:
            raise ValueError("consistency_losses needs a target_model")
        self._check_teacher("consistency_losses", teacher_model, teacher_diffusion)
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = torch.randn_like(x_start)
        indices = torch.randint(0, num_scales - 1, (x_start.shape[0],), device=x_start.device)
        t = self._grid(indices / (num_scales - 1))
        t_next = self._grid((indices + 1) / (num_scales - 1))
        teacher = None
        if teacher_model is not None:
            teacher = self._denoiser(teacher_model, model_kwargs, teacher_diffusion)
        loss = losses.consistency_loss(
            self._denoiser(model, model_kwargs),
            self._denoiser(target_model, model_kwargs),
            x_start,
            t,
            t_next,
            noise,
            self.distance,
            self.weightings(t),
            teacher=teacher,
        )
        return {"loss": loss, "sigmas": t}

    def progdist_losses(
        self,
        model,
        x_start,
        num_scales,
        model_kwargs=None,
        teacher_model=None,
        teacher_diffusion=None,
        noise=None,
    ):
        """Progressive distillation loss terms: one student step matches two teacher steps."""
        if teacher_model is None:
            raise ValueError("progdist_losses needs a teacher_model")
        self._check_teacher("progdist_losses", teacher_model, teacher_diffusion)
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = torch.randn_like(x_start)
        indices = torch.randint(0, num_scales, (x_start.shape[0],), device=x_start.device)
        t = self._grid(indices / num_scales)
        t_mid = self._grid((indices + 0.5) / num_scales)
        t_next = self._grid((indices + 1) / num_scales)
        loss = losses.progdist_loss(
            self._denoiser(model, model_kwargs),
            self._denoiser(teacher_model, model_kwargs, teacher_diffusion),
            x_start,
            t,
            t_mid,
            t_next,
            noise,
            self.distance,
            self.weightings(t),
        )
        return {"loss": loss, "sigmas": t}

    def _grid(self, u):
        return karras_sigma(u, self.sigma_min, self.sigma_max, self.rho)


def karras_sample(
    diffusion,
    model,
    shape,
    steps,
    clip_denoised=True,
    progress=False,
    callback=None,
    model_kwargs=None,
    device=None,
    sigma_min=0.002,
    sigma_max=80,
    rho=7.0,
    sampler="heun",
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
    generator=None,
    ts=None,
):
    """Draw samples of `shape` from `model` with the named sampler; returns x in [−1, 1]."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if sampler == "multistep" and not ts:
        raise ValueError("sampler 'multistep' needs ts, a list of indices into the steps-point schedule")
    model_kwargs = model_kwargs or {}
    if generator is None:
        generator = get_generator("dummy")
    device = device if device is not None else "cpu"

    # progdist integrates over steps+1 levels without the trailing 0
    n_sigmas = steps + 1 if sampler == "progdist" else steps
    sigmas = get_sigmas_karras(n_sigmas, sigma_min, sigma_max, rho, device=device)
    x_T = generator.randn(*shape, device=device) * sigma_max

    if sampler in ("heun", "dpm"):
        sampler_args = dict(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    elif sampler == "multistep":
        sampler_args = dict(ts=ts, t_min=sigma_min, t_max=sigma_max, rho=diffusion.rho, steps=steps)
    else:
        sampler_args = {}

    def denoiser(x_t, sigma):
        _, denoised = diffusion.denoise(model, x_t, sigma, **model_kwargs)
        return denoised.clamp(-1, 1) if clip_denoised else denoised

    x_0 = SAMPLERS[sampler](denoiser, x_T, sigmas, generator, progress=progress, callback=callback, **sampler_args)
    return x_0.clamp(-1, 1)
