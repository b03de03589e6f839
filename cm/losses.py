"""Training losses: EDM denoising, consistency distillation/training, progressive distillation.

Each loss takes denoisers as plain functions ``(x, σ) -> D(x, σ)`` and returns
per-sample values; the training loop reduces them.
"""

import torch
import torch.nn.functional as F

from .nn import append_dims, mean_flat

LOSS_NORMS = ("l1", "l2", "l2-32", "lpips")


def check_loss_norm(loss_norm):
    """Raise a one-line error for an unknown distance name."""
    if loss_norm not in LOSS_NORMS:
        raise ValueError(f"unknown loss_norm {loss_norm!r}; choose one of {', '.join(LOSS_NORMS)}")


def distance(loss_norm, x, y, lpips=None):
    """Per-sample distance between two image batches in [−1, 1].

    l1 / l2: mean absolute / squared difference; l2-32: l2 after bilinear resize
    to 32×32; lpips: LPIPS on [0, 1] images, resized bilinearly to 224 when
    smaller than 256 (``lpips`` is the loaded LPIPS module).
    """
    check_loss_norm(loss_norm)
    if loss_norm == "l1":
        return mean_flat((x - y).abs())
    if loss_norm == "l2":
        return mean_flat((x - y) ** 2)
    if loss_norm == "l2-32":
        x = F.interpolate(x, size=32, mode="bilinear")
        y = F.interpolate(y, size=32, mode="bilinear")
        return mean_flat((x - y) ** 2)
    if lpips is None:
        raise ValueError("loss_norm 'lpips' needs the LPIPS network")
    if x.shape[-1] < 256:
        x = F.interpolate(x, size=224, mode="bilinear")
        y = F.interpolate(y, size=224, mode="bilinear")
    return lpips((x + 1) / 2.0, (y + 1) / 2.0)


def denoising_loss(denoise, x_start, sigmas, noise, weights):
    """EDM loss terms: x_t = x_0 + σ·n, loss = λ(σ)·‖D(x_t, σ) − x_0‖² (mean over C,H,W).

    ``denoise(x_t, σ)`` returns (raw output, denoised); ``weights`` is λ(σ), shape [N].
    """
    x_t = x_start + noise * append_dims(sigmas, x_start.ndim)
    _, denoised = denoise(x_t, sigmas)
    err = (denoised - x_start) ** 2
    mse = mean_flat(append_dims(weights, x_start.ndim) * err)
    return {"xs_mse": mean_flat(err), "mse": mse, "loss": mse}


def _fork_rng_state(device):
    """Snapshot of the RNG streams dropout draws from on `device`."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def ode_euler_step(x, t, t_next, denoised):
    """One Euler step of the probability-flow ODE dx/dσ = (x − D)/σ from t to t_next."""
    d = (x - denoised) / append_dims(t, x.ndim)
    return x + d * append_dims(t_next - t, x.ndim)


@torch.no_grad()
def heun_step(denoise, x, t, t_next):
    """One Heun step of the probability-flow ODE (Karras Alg. 1, without churn)."""
    dims = x.ndim
    d = (x - denoise(x, t)) / append_dims(t, dims)
    x_euler = x + d * append_dims(t_next - t, dims)
    d_next = (x_euler - denoise(x_euler, t_next)) / append_dims(t_next, dims)
    return x + (d + d_next) * append_dims((t_next - t) / 2, dims)


def consistency_loss(student, target, x_start, t, t_next, noise, dist, weights, teacher=None):
    """Consistency distillation (teacher given) or training (teacher None) loss per sample.

    CM paper Alg. 2/3: x_t = x_0 + t·n; x_{t'} is one Heun step of the teacher's
    ODE (distillation) or one Euler step that uses x_0 as the denoiser (training).
    loss = λ(t)·d(f_θ(x_t, t), f_θ⁻(x_{t'}, t')), where the target network sees
    the same dropout randomness as the student.
    """
    x_t = x_start + noise * append_dims(t, x_start.ndim)
    rng = _fork_rng_state(x_start.device)
    f_student = student(x_t, t)
    with torch.no_grad():
        if teacher is None:
            x_next = ode_euler_step(x_t, t, t_next, x_start)
        else:
            x_next = heun_step(teacher, x_t, t, t_next)
        _restore_rng_state(rng, x_start.device)
        f_target = target(x_next.detach(), t_next).detach()
    return dist(f_student, f_target) * weights


def progdist_loss(student, teacher, x_start, t, t_mid, t_next, noise, dist, weights):
    """Progressive distillation (Salimans & Ho 2022) loss per sample.

    Two teacher Euler steps t → t_mid → t_next; the target is the denoised value
    that makes one Euler step from t land on the same point.
    """
    dims = x_start.ndim
    x_t = x_start + noise * append_dims(t, dims)
    denoised = student(x_t, t)
    with torch.no_grad():
        x_mid = ode_euler_step(x_t, t, t_mid, teacher(x_t, t))
        x_next = ode_euler_step(x_mid, t_mid, t_next, teacher(x_mid, t_mid))
        target = x_t - append_dims(t, dims) * (x_next - x_t) / append_dims(t_next - t, dims)
    return dist(denoised, target.detach()) * weights


def pseudo_huber(x, y, c):
    """√(‖x − y‖² + c²) − c per sample, ‖·‖ over all values (iCT §3.3; c = 0: the L2 norm)."""
    sq = ((x - y) ** 2).flatten(1).sum(dim=1)
    # 1e-30 keeps the gradient finite at Δ = 0 when c = 0 (d√s/ds is infinite at 0)
    return torch.sqrt(sq + c**2 + 1e-30) - c


def ect_loss(denoise, x_start, t, r, noise, c=0.0, target=None):
    """Consistency-tuning loss per sample (ECT, Geng et al. 2024; its `ECMLoss`).

    One noise draw n for both points: D(x + t·n, t) with gradients, D(x + r·n, r)
    under no_grad with the same online weights and the same dropout mask; a
    non-finite r-call output is made finite (`nan_to_num`, as ECT), and where
    r = 0 the target is x itself (when every r is 0 the r-call is skipped, as
    ECT). loss = (√(‖Δ‖² + c²) − c)/(t − r), ‖·‖ summed over all values.
    ``target`` is the same network unwrapped (e.g. without DDP); default ``denoise``.
    """
    target = target or denoise
    dims = x_start.ndim
    rng = _fork_rng_state(x_start.device)
    d_t = denoise(x_start + noise * append_dims(t, dims), t)
    with torch.no_grad():
        d_r = x_start
        if bool((r > 0).any()):
            _restore_rng_state(rng, x_start.device)
            d_r = torch.nan_to_num(target(x_start + noise * append_dims(r, dims), r))
            d_r = torch.where(append_dims(r > 0, dims), d_r, x_start)
        d_r = d_r.detach()
    return pseudo_huber(d_t, d_r, c) / (t - r)
