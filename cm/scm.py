"""sCM: continuous-time consistency training and distillation (Lu & Song 2024, Algorithm 1).

In TrigFlow (`cm.trigflow`) the consistency function is f(x̂, t̂) = cos t̂·x̂ − σ_d sin t̂·F(x̂, t̂).
Its tangent along the trajectory gives the training target

    g = −cos²t̂·(σ_d F⁻ − dx̂/dt̂) − r·cos t̂ sin t̂·(x̂ + σ_d dF⁻/dt̂)

(F⁻ = stopgrad F, no EMA target), with dx̂/dt̂ = cos t̂·z − sin t̂·x₀ (sCT) or
σ_d·F_teacher(x̂, t̂) (sCD), J = cos t̂ sin t̂·dF⁻/dt̂ by forward-mode AD (`cm.jvp`),
the tangent warm-up r = min(1, step/warm-up steps), normalisation ĝ = g/(‖g‖ + c),
and the per-sample loss with the adaptive weight w = −ℓ(t̂)

    L = e^{−ℓ}/D·‖F − F⁻ − ĝ‖² + ℓ   (the paper: mean over C·H·W values).

`ScmVariant` holds FastGen's three deviations (its CIFAR-10 defaults), all off
by default: ‖g‖/√D in the normalisation, a second ÷D, and a prior weight 1/σ.
Time distribution: ln σ ~ N(−1.0, 1.4²) truncated to [σ_min, σ_max], t̂ = atan2(σ, σ_d).
"""

import math
from dataclasses import dataclass

import torch

from .jvp import fork_rng
from .nn import append_dims
from .precond import SIGMA_DATA
from .trigflow import logvar, trigflow_F, trigflow_fd, trigflow_jvp, trigflow_point, trigflow_time

P_MEAN, P_STD = -1.0, 1.4  # sCM's log-normal proposal of σ
SIGMA_MIN = 0.002
SCT_SIGMA_MAX = 800.0  # FastGen's sCT config raises the truncation to 800; sCD keeps EDM's 80
SCD_SIGMA_MAX = 80.0
TANGENT_WARMUP_STEPS = 10000
TANGENT_NORM_CONST = 0.1  # c in ĝ = g/(‖g‖ + c)


@dataclass(frozen=True)
class ScmVariant:
    """FastGen's departures from Algorithm 1 (each False: the paper's form)."""

    g_norm_spatial_invariance: bool = False  # ĝ = g/(‖g‖/√D + c)
    divide_x_0_spatial_dim: bool = False  # e^{−ℓ}/D·mean(·)² instead of e^{−ℓ}·mean(·)²
    prior_weighting: bool = False  # × 1/σ = 1/(σ_d tan t̂)

    @classmethod
    def fastgen(cls):
        return cls(True, True, True)


def scm_draw_sigma(n, p_mean=P_MEAN, p_std=P_STD, sigma_min=SIGMA_MIN, sigma_max=SCT_SIGMA_MAX, generator=None):
    """σ with ln σ ~ N(p_mean, p_std²) truncated to [σ_min, σ_max] (inverse CDF, float64, [n])."""
    lo, hi = ((math.log(s) - p_mean) / p_std for s in (sigma_min, sigma_max))
    cdf = [0.5 * (1 + math.erf(v / math.sqrt(2))) for v in (lo, hi)]
    u = cdf[0] + (cdf[1] - cdf[0]) * torch.rand(n, generator=generator, dtype=torch.float64)
    sigma = torch.exp(p_mean + p_std * torch.special.ndtri(u))
    return sigma.clamp(sigma_min, sigma_max)


def tangent_warmup(step, warmup_steps=TANGENT_WARMUP_STEPS):
    """r = min(1, step/warm-up steps); no warm-up (1) when the steps are 0."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def sct_direction(x0, z, t_hat):
    """dx̂/dt̂ = cos t̂·z − sin t̂·x₀ of the conditional path (float64 arithmetic, in x₀'s dtype)."""
    c, s = (append_dims(f(t_hat.double()), x0.ndim) for f in (torch.cos, torch.sin))
    return (c * z.double() - s * x0.double()).to(x0.dtype)


def scm_target(F_minus, dxdt, x_hat, J, t_hat, r, sigma_data=SIGMA_DATA, variant=ScmVariant(),
               c=TANGENT_NORM_CONST):
    """(ĝ, ‖g‖) in float64: g = −cos²t̂·(σ_d F⁻ − dx̂/dt̂) − r·(cos t̂ sin t̂·x̂ + σ_d J), ĝ = g/(n + c)."""
    t = append_dims(t_hat.double(), x_hat.ndim)
    cos, sin = torch.cos(t), torch.sin(t)
    g = -(cos**2) * (sigma_data * F_minus.double() - dxdt.double())
    g = g - r * (cos * sin * x_hat.double() + sigma_data * J.double())
    norm = g.flatten(1).norm(dim=1)
    scaled = norm / math.sqrt(g[0].numel()) if variant.g_norm_spatial_invariance else norm
    return g / append_dims(scaled + c, g.ndim), norm


def scm_weighted_loss(F, F_minus, g_hat, logvar, t_hat, sigma_data=SIGMA_DATA, variant=ScmVariant()):
    """(L, mean ĝ²) per sample: L = w/(e^ℓ·D′)·mean_{CHW}(F − F⁻ − ĝ)² + ℓ (float64).

    w = 1/σ with the prior weight, else 1; D′ = D with the second ÷D, else 1.
    """
    dims = F[0].numel()
    diff = F.double() - F_minus.double() - g_hat
    weight = torch.ones_like(t_hat, dtype=torch.float64)
    if variant.prior_weighting:
        weight = 1.0 / (sigma_data * torch.tan(t_hat.double()))
    if variant.divide_x_0_spatial_dim:
        weight = weight / dims
    lv = logvar.double()
    loss = weight * torch.exp(-lv) * diff.pow(2).flatten(1).mean(dim=1) + lv
    return loss, g_hat.pow(2).flatten(1).mean(dim=1)


def scm_loss(student, tangent, x0, z, t_hat, r, teacher=None, sigma_data=SIGMA_DATA, variant=ScmVariant()):
    """sCT (``teacher`` None) or sCD loss per sample, and its monitors.

    ``student(x̂, t̂) -> (F, ℓ)``: the training pass, with gradients.
    ``tangent(x̂, t̂, dx̂/dt̂, path, rng) -> J``: no gradient, under the dropout
    state ``rng`` of the training pass; ``path(s)`` is x̂ at time s along the
    direction in use (for finite differences: the conditional path of sCT, the
    straight line along the teacher's direction for sCD).
    ``teacher(x̂, t̂) -> F_teacher``: the frozen teacher's TrigFlow output (sCD).
    """
    x_hat = trigflow_point(x0, z, t_hat)
    if teacher is None:
        dxdt = sct_direction(x0, z, t_hat)

        def path(s):
            return trigflow_point(x0, z, s)

    else:
        with torch.no_grad():
            dxdt = (sigma_data * teacher(x_hat, t_hat)).detach()

        def path(s):
            step = append_dims(s - t_hat.double(), x_hat.ndim)
            return (x_hat.double() + step * dxdt.double()).to(x_hat.dtype)

    rng = fork_rng(x0.device)
    F, logvar = student(x_hat, t_hat)
    J = tangent(x_hat, t_hat, dxdt, path, rng).detach()
    F_minus = F.detach()
    g_hat, g_norm = scm_target(F_minus, dxdt, x_hat, J, t_hat, r, sigma_data, variant)
    loss, unweighted = scm_weighted_loss(F, F_minus, g_hat, logvar, t_hat, sigma_data, variant)
    return {
        "loss": loss,
        "loss_unweighted": unweighted,
        "g_norm": g_norm,
        "logvar": logvar.detach().double(),
        "jvp_norm": J.double().flatten(1).norm(dim=1),
    }


def scm_time(n, sigma_max, p_mean=P_MEAN, p_std=P_STD, sigma_min=SIGMA_MIN, sigma_data=SIGMA_DATA, generator=None):
    """(σ, t̂) for n samples of the training time distribution."""
    sigma = scm_draw_sigma(n, p_mean, p_std, sigma_min, sigma_max, generator)
    return sigma, trigflow_time(sigma, sigma_data)


# ----------------------------------------------------------------------------
# The training step's loss (what the sct/scd rows of the recipe table call)


@dataclass(frozen=True)
class ScmSettings:
    """One sCM run's settings (cm_train.py flags)."""

    sigma_max: float = SCT_SIGMA_MAX  # --scm_sigma_max
    warmup_steps: int = TANGENT_WARMUP_STEPS  # --tangent_warmup_steps
    jvp: str = "ad"  # --jvp ad|fd
    variant: ScmVariant = ScmVariant()
    p_mean: float = P_MEAN
    p_std: float = P_STD
    sigma_min: float = SIGMA_MIN
    sigma_data: float = SIGMA_DATA


def _tangent_fn(module, method, sigma_data, model_kwargs):
    if method == "fd":
        return lambda x, t, d, path, rng: trigflow_fd(module, path, t, sigma_data, rng=rng, **model_kwargs)
    return lambda x, t, d, path, rng: trigflow_jvp(module, x, t, d, sigma_data, rng=rng, **model_kwargs)[1]


def scm_training_losses(model, module, x_start, r, settings, teacher=None, model_kwargs=None, sigma=None, z=None):
    """sCT/sCD loss terms of one (micro)batch at tangent warm-up ``r``.

    ``model``: the network as the training pass calls it (DDP, autocast);
    ``module``: the same network unwrapped (float32 weights), for the head and
    the JVP; ``teacher``: the frozen sCD teacher network (EDM-scaled), or None.
    σ and z are drawn from torch's (per-step seeded) RNG unless given.
    Returns per-sample "loss", "sigmas" and the monitors of `scm_loss`.
    """
    model_kwargs = model_kwargs or {}
    s = settings
    device = x_start.device
    if sigma is None:
        sigma = scm_draw_sigma(x_start.shape[0], s.p_mean, s.p_std, s.sigma_min, s.sigma_max)
    sigma = sigma.double().to(device)
    t_hat = trigflow_time(sigma, s.sigma_data)
    if z is None:
        z = s.sigma_data * torch.randn_like(x_start)

    def student(x_hat, t):
        return trigflow_F(model, x_hat, t, s.sigma_data, **model_kwargs), logvar(module, t, s.sigma_data)

    teacher_F = None
    if teacher is not None:
        teacher_F = lambda x_hat, t: trigflow_F(teacher, x_hat, t, s.sigma_data, **model_kwargs)  # noqa: E731
    out = scm_loss(
        student, _tangent_fn(module, s.jvp, s.sigma_data, model_kwargs), x_start, z, t_hat, r,
        teacher=teacher_F, sigma_data=s.sigma_data, variant=s.variant,
    )
    out["sigmas"] = sigma.float()
    return out


def probe_forward_ad(module, image_size, device, model_kwargs=None, channels=3):
    """Run one JVP of ``module`` on a 1-image batch: a `cm.jvp.ForwardADError` (one line) if it cannot."""
    model_kwargs = {k: v[:1] for k, v in (model_kwargs or {}).items()}
    x = torch.zeros(1, channels, image_size, image_size, device=device)
    t_hat = torch.full((1,), 0.7, dtype=torch.float64, device=device)
    trigflow_jvp(module, x, t_hat, torch.ones_like(x), **model_kwargs)
