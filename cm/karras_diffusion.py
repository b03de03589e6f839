"""The Karras/EDM denoiser and `karras_sample`: thin wiring over the pure modules.

`KarrasDenoiser` holds the noise-schedule constants and the loss configuration,
and delegates the math to `cm.precond`, `cm.losses`, `cm.schedules` and
`cm.samplers`. Names of the original module are re-exported here.
"""

import torch

from . import losses, recipes
from .losses import check_loss_norm
from .nn import append_dims, append_zero, mean_flat  # noqa: F401  (re-exported)
from .precond import (
    WEIGHT_SCHEDULES,
    boundary_condition_scalings,
    c_noise,
    SCALINGS,
    edm_scalings,
    get_weightings,
    scalings,
    snr,
)
from .random_util import get_generator
from .samplers import (  # noqa: F401  (re-exported)
    FEWSTEP,
    SAMPLERS,
    get_ancestral_step,
    sample_dpm,
    sample_euler,
    sample_ect_fewstep,
    sample_euler_ancestral,
    sample_heun,
    sample_multistep_sigmas,
    sample_onestep,
    sample_progdist,
    stochastic_iterative_sampler,
    to_d,
)
from .editing import iterative_colorization, iterative_inpainting, iterative_superres  # noqa: F401
from .schedules import get_sigmas_karras, karras_sigma


def _given_or_default(x_start, model_kwargs, noise):
    """The losses' defaults: no conditioning, and fresh Gaussian noise shaped like ``x_start``."""
    return model_kwargs or {}, torch.randn_like(x_start) if noise is None else noise


class KarrasDenoiser:
    """EDM / consistency-model denoiser with its training losses.

    :param distillation: use the boundary-condition scalings (c_skip(σ_min) = 1,
        c_out(σ_min) = 0: every consistency model, also CT, iCT and ECT,
        which distil nothing) instead of EDM's, in sampling, and in training
        unless ``train_scalings`` says otherwise; the original's name, read as
        `boundary_scalings`.
    :param train_scalings: "edm" or "boundary" for the training losses; None:
        the same as sampling. ECT trains with "edm" and samples with the
        boundary condition (its ``ECMPrecond`` switches in eval mode).
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
        train_scalings=None,
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
        if train_scalings not in (None,) + SCALINGS:
            raise ValueError(f"unknown train_scalings {train_scalings!r}; choose one of {', '.join(SCALINGS)}")
        self.train_scalings = train_scalings
        self.loss_norm = loss_norm
        self.lpips_path = lpips_path
        self.num_timesteps = 40  # size of the index grid of the discrete schedule samplers
        self._lpips = None

    # --- scalings ---------------------------------------------------------
    @property
    def boundary_scalings(self):
        """True: the consistency models' boundary-condition scalings; False: EDM's."""
        return self.distillation

    def get_snr(self, sigmas):
        return snr(sigmas)

    def get_sigmas(self, sigmas):
        return sigmas

    def get_scalings(self, sigma):
        return edm_scalings(sigma, self.sigma_data)

    def get_scalings_for_boundary_condition(self, sigma):
        return boundary_condition_scalings(sigma, self.sigma_data, self.sigma_min)

    @property
    def sample_scalings(self):
        """"boundary" (consistency models) or "edm": the scalings of `denoise`."""
        return "boundary" if self.boundary_scalings else "edm"

    @property
    def training_scalings(self):
        """The scalings the training losses call the network with."""
        return self.train_scalings or self.sample_scalings

    def denoise(self, model, x_t, sigmas, **model_kwargs):
        """Return (raw network output F, D = c_skip·x_t + c_out·F) with the sampling scalings."""
        return self.denoise_with(self.sample_scalings, model, x_t, sigmas, **model_kwargs)

    def denoise_with(self, kind, model, x_t, sigmas, **model_kwargs):
        """(F, D) with the scalings ``kind`` ("edm" or "boundary" at this denoiser's σ_min)."""
        c = scalings(kind, sigmas, self.sigma_data, self.sigma_min)
        c_skip, c_out, c_in = [append_dims(v, x_t.ndim) for v in c]
        model_output = model(c_in * x_t, c_noise(sigmas), **model_kwargs)
        return model_output, c_out * model_output + c_skip * x_t

    def train_denoiser(self, model, model_kwargs=None):
        """``(x, σ) -> D(x, σ)`` as the training losses call ``model`` (training scalings)."""
        model_kwargs = model_kwargs or {}
        if self.training_scalings == self.sample_scalings:
            return lambda x, t: self.denoise(model, x, t, **model_kwargs)[1]
        return lambda x, t: self.denoise_with(self.training_scalings, model, x, t, **model_kwargs)[1]

    def weightings(self, sigmas):
        """Loss weight λ(σ) per sample."""
        return get_weightings(self.weight_schedule, self.get_snr(sigmas), self.sigma_data)

    # --- distances --------------------------------------------------------
    @property
    def lpips_loss(self):
        """The LPIPS network, loaded from local weights on first use."""
        if self._lpips is None:
            from .metrics.lpips import load_lpips

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
        return (diffusion or self).train_denoiser(model, model_kwargs)

    @staticmethod
    def _check_teacher(name, teacher_model, teacher_diffusion):
        # the teacher's scalings are EDM's, not the student's boundary condition
        if teacher_model is not None and teacher_diffusion is None:
            raise ValueError(f"{name} got a teacher_model without its teacher_diffusion")

    def training_losses(self, model, x_start, sigmas, model_kwargs=None, noise=None):
        """EDM denoising loss terms ("loss", "mse", "xs_mse") at the given σ per sample."""
        model_kwargs, noise = _given_or_default(x_start, model_kwargs, noise)
        denoise = self.denoise if self.training_scalings == self.sample_scalings else (
            lambda m, x, t, **kw: self.denoise_with(self.training_scalings, m, x, t, **kw))
        return losses.denoising_loss(
            lambda x, t: denoise(model, x, t, **model_kwargs),
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
        model_kwargs, noise = _given_or_default(x_start, model_kwargs, noise)
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
        model_kwargs, noise = _given_or_default(x_start, model_kwargs, noise)
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

    def ict_losses(
        self, model, x_start, num_scales, model_kwargs=None, target_model=None, huber_c=None, noise=None,
        p_mean=recipes.P_MEAN, p_std=recipes.P_STD,
    ):
        """iCT loss terms: adjacent levels of the N-point grid drawn from the discretised log-normal.

        No teacher and no EMA target: θ⁻ = stopgrad θ (``target_model`` is the
        same network, unwrapped). Weight 1/(σ_{i+1} − σ_i), pseudo-Huber distance
        with c = 0.00054·√d unless ``huber_c`` is given.
        """
        model_kwargs, noise = _given_or_default(x_start, model_kwargs, noise)
        if huber_c is None:
            huber_c = recipes.pseudo_huber_c(x_start[0].numel())
        lo, hi, weights = recipes.ict_draw(
            num_scales, x_start.shape[0], self.sigma_min, self.sigma_max, self.rho, device=x_start.device,
            p_mean=p_mean, p_std=p_std,
        )
        loss = losses.consistency_loss(
            self._denoiser(model, model_kwargs),
            self._denoiser(target_model if target_model is not None else model, model_kwargs),
            x_start,
            hi,
            lo,
            noise,
            lambda a, b: losses.pseudo_huber(a, b, huber_c),
            weights,
        )
        return {"loss": loss, "sigmas": hi, "r": lo}

    def ect_losses(
        self, model, x_start, stage, model_kwargs=None, target_model=None, q=2.0, huber_c=0.0, noise=None,
        p_mean=recipes.P_MEAN, p_std=recipes.P_STD,
    ):
        """ECT loss terms: t ~ log-normal, r = r(t, stage), one ε, the online weights for both calls."""
        model_kwargs, noise = _given_or_default(x_start, model_kwargs, noise)
        t = recipes.ect_draw_t(x_start.shape[0], p_mean, p_std, device=x_start.device)
        r = recipes.ect_r(t, stage, q=q)
        target = self._denoiser(target_model, model_kwargs) if target_model is not None else None
        loss = losses.ect_loss(self._denoiser(model, model_kwargs), x_start, t, r, noise, huber_c, target)
        return {"loss": loss, "sigmas": t, "r": r}

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
    sigmas=None,
    fewstep="cm",
):
    """Draw samples of `shape` from `model` with the named sampler; returns x in [−1, 1].

    ``sampler="multistep"`` takes either ``ts`` (indices into the ``steps``-point
    schedule) or ``sigmas`` (the descending noise levels to denoise at, e.g.
    (80, 0.821); x_T then has noise level sigmas[0]). ``fewstep`` picks what
    ``sigmas`` run: "cm" (CM's Alg. 1, as the original) or "ect" (ECT's
    generator: no clamp in between, x + σ·z; the model row's choice).
    """
    if fewstep not in FEWSTEP:
        raise ValueError(f"unknown fewstep {fewstep!r}; choose one of {', '.join(FEWSTEP)}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    has_sigmas = sigmas is not None and len(sigmas) > 0
    if sampler == "multistep" and not ts and not has_sigmas:
        raise ValueError("sampler 'multistep' needs ts (indices into the steps-point schedule) or sigmas")
    if has_sigmas and sampler != "multistep":
        raise ValueError(f"sigmas is only used by the multistep sampler, not {sampler!r}")
    model_kwargs = model_kwargs or {}
    if generator is None:
        generator = get_generator("dummy")
    device = device if device is not None else "cpu"

    # progdist integrates over steps+1 levels without the trailing 0
    n_sigmas = steps + 1 if sampler == "progdist" else steps
    grid = get_sigmas_karras(n_sigmas, sigma_min, sigma_max, rho, device=device)
    x_T = generator.randn(*shape, device=device) * (float(sigmas[0]) if has_sigmas else sigma_max)

    if sampler in ("heun", "dpm"):
        sampler_args = dict(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    elif sampler == "multistep":
        sampler_args = dict(ts=ts, t_min=sigma_min, t_max=sigma_max, rho=diffusion.rho, steps=steps)
    else:
        sampler_args = {}

    def denoiser(x_t, sigma):
        _, denoised = diffusion.denoise(model, x_t, sigma, **model_kwargs)
        return denoised.clamp(-1, 1) if clip_denoised else denoised

    if has_sigmas and fewstep == "ect":
        raw = lambda x_t, sigma: diffusion.denoise(model, x_t, sigma, **model_kwargs)[1]  # noqa: E731
        return sample_ect_fewstep(raw, x_T, [float(s) for s in sigmas], generator, progress, callback).clamp(-1, 1)
    if has_sigmas:
        x_0 = sample_multistep_sigmas(
            denoiser, x_T, [float(s) for s in sigmas], generator, progress=progress, callback=callback, t_min=sigma_min
        )
        return x_0.clamp(-1, 1)
    x_0 = SAMPLERS[sampler](denoiser, x_T, grid, generator, progress=progress, callback=callback, **sampler_args)
    return x_0.clamp(-1, 1)
