"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"): pure functions.

The linear flow path x_t = (1 − t)·x0 + t·e (t = 0 data, t = 1 noise) has the
instantaneous velocity v = e − x0. A two-time network (``--time_inputs 2``)
learns the average velocity u(x_t, t, r) = 1/(t − r)·∫_r^t v(x_τ, τ) dτ, which
obeys the MeanFlow identity (paper eq. 6)

    u(x_t, t, r) = v − (t − r)·du/dt,   du/dt = ∂_x u·v + ∂_t u   (r held fixed),

so the regression target v − (t − r)·du/dt needs only a forward-mode JVP of
the network with tangent (v, 1, 0). One step from noise: x_r = x_t − (t − r)·u.

Conventions follow NVIDIA FastGen's MeanFlow (../shared/golden/fastgen/README.md §2):
the network's raw output is u (no EDM scalings), t and r go in as they are
(here as ``TIME_SCALE``·t in the networks' ``timesteps`` units, which a SongUNet
divides back: c_noise = t), t ≥ r in [0, 0.999].
"""

import math

import torch

from . import jvp as tangents
from .losses import _restore_rng_state
from .nn import append_dims
from .samplers import sample_meanflow

T_MAX = 0.999  # largest time: FastGen's max_t (the latent is 0.999·e)
TIME_SCALE = 1000.0  # t ↦ the networks' timesteps input (SongUNet: c_noise = timesteps/1000 = t)

# (t, r) samplers: t and r each logit-normal, sorted so t ≥ r, r = t for a fraction of the batch.
TIME_PRESETS = {
    # MeanFlow paper's CIFAR-10 setting (the PyTorch port's cifar10_v0.sh: P_mean −2.0, P_std 2.0 for t and r)
    "paper": dict(t_mean=-2.0, t_std=2.0, r_mean=-2.0, r_std=2.0, equal_fraction=0.25),
    # NVIDIA FastGen config_mf_cifar10.py: t ~ logit-normal(−0.6, 1.6), r ~ logit-normal(−4.0, 1.6)
    "fastgen": dict(t_mean=-0.6, t_std=1.6, r_mean=-4.0, r_std=1.6, equal_fraction=0.25),
}
ADAPTIVE_P, ADAPTIVE_C = 0.75, 1e-3  # w = (‖Δ‖² + c)^(−p) (paper §4.3, CIFAR-10 p = 0.75)


def velocity(model, **model_kwargs):
    """u(x, t, r) of a two-time ``model`` (called ``model(x, timesteps, r_timesteps=, **kw)``); t, r [N]."""

    def u(x, t, r):
        return model(x, TIME_SCALE * t, r_timesteps=TIME_SCALE * r, **model_kwargs)

    return u


def flow_path(x0, e, t):
    """(x_t, v): x_t = (1 − t)·x0 + t·e and v = e − x0, in float64 arithmetic, returned in x0's dtype."""
    tt = append_dims(t.double(), x0.ndim)
    x0d, ed = x0.double(), e.double()
    return ((1 - tt) * x0d + tt * ed).to(x0.dtype), (ed - x0d).to(x0.dtype)


def logit_normal(n, mean, std, generator=None, device="cpu"):
    """σ(mean + std·n), n ~ N(0, 1): n values in (0, 1), float64."""
    z = torch.randn(n, generator=generator, dtype=torch.float64)
    return torch.sigmoid(mean + std * z).to(device)


def sample_t_r(
    n, t_mean, t_std, r_mean, r_std, equal_fraction, t_max=T_MAX, generator=None, device="cpu"
):
    """(t, r) per sample, float64, t ≥ r in [0, t_max] (MeanFlow Alg. 1's time sampler).

    Two logit-normal draws scaled by ``t_max`` and sorted; each sample has r = t
    (plain flow matching) with probability ``equal_fraction``. FastGen sets r = t
    for the first k ~ Binomial(n, fraction) samples instead: the same law for an
    exchangeable batch, but a per-sample coin keeps sample i's times independent
    of the batch size.
    """
    a = logit_normal(n, t_mean, t_std, generator) * t_max
    b = logit_normal(n, r_mean, r_std, generator) * t_max
    equal = torch.rand(n, generator=generator, dtype=torch.float64) < equal_fraction
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    return t.to(device), torch.where(equal, t, r).to(device)


def check_times(t, r, t_max=T_MAX):
    """ValueError unless 0 ≤ r ≤ t ≤ t_max for every sample."""
    if bool((r > t).any()):
        raise ValueError(f"MeanFlow needs r <= t, got r > t at sample {int((r > t).nonzero()[0])}")
    if bool((r < 0).any()) or bool((t > t_max).any()):
        raise ValueError(f"MeanFlow times must lie in [0, {t_max}]")


def du_dt_jvp(u, x_t, t, r, v, rng=None, module=None):
    """(u, du/dt) at (x_t, t, r): forward-mode JVP of u with tangent (v, 1, 0), no gradient (`cm.jvp.jvp`).

    ``rng``: the dropout RNG state to run under; ``module``: the network, named if a layer has no forward rule.
    """
    return tangents.jvp(
        lambda x, tt: u(x, tt, r), (x_t, t), (v, torch.ones_like(t)), module=module, rng=rng, device=x_t.device
    )


def du_dt_fd(u, x_t, t, r, v, rng=None, module=None, eps=1e-4, t_max=T_MAX):
    """(None, du/dt) by a difference quotient along the path (FastGen's finite-difference variant).

    Central (t ± ε) where t + ε ≤ t_max and t − ε ≥ 0 and t − ε > r; forward
    (t, t + ε) where only the first holds; backward (t − ε, t) where only the
    second; 0 where neither. x± = x_t + (t± − t)·v, r fixed; quotient in float64;
    both calls under the dropout state ``rng``.
    """
    up, down = t + eps <= t_max, (t - eps >= 0) & (t - eps > r)
    t_plus = torch.where(up, t + eps, t)
    t_minus = torch.where(down, t - eps, t)
    dims = x_t.ndim

    def at(tt):
        if rng is not None:
            _restore_rng_state(rng, x_t.device)
        return u(x_t + append_dims((tt - t).to(x_t.dtype), dims) * v, tt, r).double()

    with torch.no_grad():
        diff = at(t_plus) - at(t_minus)
    span = append_dims((t_plus - t_minus).double(), dims)
    d = torch.where(span > 0, diff / span.clamp(min=eps), torch.zeros_like(diff))
    return None, d.to(x_t.dtype)


TANGENTS = {"ad": du_dt_jvp, "fd": du_dt_fd}  # --jvp (cm.jvp.JVP_METHODS)


def adaptive_weight(sq_err, p=ADAPTIVE_P, c=ADAPTIVE_C):
    """w = (‖Δ‖² + c)^(−p), stop-gradient (paper eq. 11; p = 0 is plain L2)."""
    return (sq_err.detach() + c) ** (-p)


def meanflow_loss(u, x0, e, t, r, u_jvp=None, warmup=1.0, jvp="ad", p=ADAPTIVE_P, c=ADAPTIVE_C, module=None):
    """MeanFlow loss per sample (paper Alg. 1, FastGen's ``l2`` loss) and its monitors.

    ``u(x, t, r)`` is the network with gradients (e.g. DDP-wrapped); ``u_jvp`` the
    same network unwrapped (default ``u``), run first in its own no-grad pass for
    du/dt (``jvp`` "ad": forward-mode JVP; "fd": finite differences) under the
    same dropout mask as the gradient pass, so gradients flow through ``u`` only.
    target = v − warmup·clip(t − r, 0, 0.999)·du/dt; loss = sg(w)·‖u − sg(target)‖²
    (sum over C·H·W), w = (‖u − target‖² + c)^(−p); float64 arithmetic.
    Returns a dict of [N] tensors: loss, weight, v_loss = mean (u − v)², du_dt_norm
    = ‖du/dt‖₂, and the tensors u, du_dt, target, x_t, v. ``module``: the
    network of ``u_jvp``, named in the error when a layer has no forward-mode rule.
    """
    check_times(t, r)
    x_t, v = flow_path(x0, e, t)
    rng = tangents.fork_rng(x0.device)
    _, du_dt = TANGENTS[jvp](u_jvp or u, x_t, t, r, v, rng=rng, module=module)
    _restore_rng_state(rng, x0.device)
    u_out = u(x_t, t, r)
    dims = x0.ndim
    dt = append_dims((t - r).clamp(0, T_MAX).double(), dims)
    target = (v.double() - warmup * dt * du_dt.double()).detach()
    sq_err = ((u_out.double() - target) ** 2).flatten(1).sum(dim=1)
    weight = adaptive_weight(sq_err, p, c)
    return dict(
        loss=weight * sq_err,
        weight=weight,
        v_loss=((u_out.detach().double() - v.double()) ** 2).flatten(1).mean(dim=1),
        du_dt_norm=du_dt.double().flatten(1).norm(dim=1),
        u=u_out,
        du_dt=du_dt,
        target=target,
        x_t=x_t,
        v=v,
    )


def tangent_warmup(step, warmup_steps):
    """w_warm = min(1, step / warmup_steps); 1 when warmup_steps is 0 (FastGen's CIFAR-10 setting)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def parse_flow_times(text, t_max=T_MAX):
    """``--flow_times`` "0.999,0.5,0" → [0.999, 0.5, 0.0]: strictly decreasing in [0, t_max], ≥ 2 values."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--flow_times must be a comma list of numbers, got {text!r}") from None
    if len(values) < 2:
        raise ValueError(f"--flow_times needs at least two times (one step from the first to the second), got {text!r}")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"--flow_times must be strictly decreasing, got {text!r}")
    if not all(0 <= v <= t_max and math.isfinite(v) for v in values):
        raise ValueError(f"--flow_times must lie in [0, {t_max}], got {text!r}")
    return values


def meanflow_sample(model, shape, flow_times, generator, model_kwargs=None, device="cpu", progress=False):
    """Samples of a two-time ``model``: e from ``generator``, x = times[0]·e, then `sample_meanflow`."""
    e = generator.randn(*shape, device=device)
    u = velocity(model, **(model_kwargs or {}))
    return sample_meanflow(u, float(flow_times[0]) * e, flow_times, progress=progress)


# ----------------------------------------------------------------------------
# The training recipe (a row of `cm.recipes.RECIPES`: cm_train.py --training_mode meanflow)

MEANFLOW_FLAG_DEFAULTS = dict(mf_times="fastgen")  # --tangent_warmup_steps and --jvp: cm.recipe_flags
MEANFLOW_FLAG_HELP = {
    "mf_times": "meanflow: the (t, r) sampler, one of " + ", ".join(TIME_PRESETS)
    + " (fastgen: t ~ logit-normal(-0.6, 1.6), r ~ logit-normal(-4, 1.6); paper: both logit-normal(-2, 2); "
    "sorted, r = t for 25 %)",
}

# CIFAR-10 (the PyTorch port's cifar10_v1 and FastGen's config_mf_cifar10): Adam 6e-4, betas (0.9, 0.999),
# batch 1024, dropout 0.2, EMA 0.9999, DDPM++ with channel_mult 2,2,2 and attention at 16; 800k steps
# (the port: 16000 epochs of 50k images at batch 1024).
MEANFLOW_PRESETS = dict(
    lr=6e-4, global_batch_size=1024, dropout=0.2, ema_rate="0.9999", total_training_steps=800000,
    arch="ddpmpp", time_inputs=2, num_channels=128, channel_mult="2,2,2", num_res_blocks=4,
    attention_resolutions="16", tangent_warmup_steps=0,
)  # fmt: skip
MEANFLOW_FLAG_CHECKS = {
    "mf_times": (lambda v: v in TIME_PRESETS, "must be one of " + ", ".join(TIME_PRESETS)),
}


def meanflow_optimizer(params, lr, weight_decay):
    """Adam with betas (0.9, 0.999), as FastGen and the port (the loop's default is RAdam)."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))


def draw_meanflow_inputs(x_start, mf_times="fastgen"):
    """(e, t, r) for a batch: unit noise and the preset's (t, r), from the global (per-step seeded) RNG."""
    t, r = sample_t_r(x_start.shape[0], **TIME_PRESETS[mf_times], device=x_start.device)
    return torch.randn_like(x_start), t, r


def meanflow_step_loss(student, jvp_net, x_start, warmup, model_kwargs, options):
    """The recipe's loss terms of a micro-batch: `meanflow_loss` on fresh (e, t, r).

    ``student`` is the network with gradients (DDP, autocast), ``jvp_net`` the
    same network unwrapped and in float32 (autocast does not carry forward-mode
    tangents), ``warmup`` the tangent warm-up weight of this step. Returns the
    loop's dict: per-sample "loss", "sigmas" (t) and "r", and the row's monitors
    v_loss = mean (u − v)², adaptive_weight and du_dt_norm = ‖du/dt‖₂.
    """
    e, t, r = draw_meanflow_inputs(x_start, options.get("mf_times", "fastgen"))
    out = meanflow_loss(
        velocity(student, **model_kwargs), x_start, e, t, r, u_jvp=velocity(jvp_net, **model_kwargs),
        warmup=warmup, jvp=options.get("jvp", "ad"), module=jvp_net,
    )  # fmt: skip
    return dict(
        loss=out["loss"], sigmas=t, r=r, v_loss=out["v_loss"], adaptive_weight=out["weight"],
        du_dt_norm=out["du_dt_norm"],
    )


def meanflow_schedule(tangent_warmup_steps):
    """step ↦ (target EMA μ = 0: no target network, tangent warm-up weight)."""
    return lambda step: (0.0, tangent_warmup(step, tangent_warmup_steps))
