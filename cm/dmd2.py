"""DMD2: improved distribution matching distillation (Yin et al. 2024), pure losses.

A one-step generator G is trained so that its images' distribution matches the
data's: the frozen EDM teacher is the real score, a trainable copy of it (the
fake score) tracks the generator's distribution, and an optional GAN head
separates real from generated images. Facts: ../shared/spec/DMD2.md (the seed
project's code) and ../shared/golden/fastgen/README.md §3 (NVIDIA FastGen).

Scores and generators are called as ``score(x, σ, y) -> D(x, σ)`` (or with
``features=True``: ``(D, raw F, encoder features)``), built by `scorer` from a
network and a preconditioning. Losses return per-sample values; the loop
reduces them by the batch mean, which gives the references' means over B·C·H·W.
"""

import torch
import torch.nn.functional as F

from .nn import append_dims, mean_flat
from .precond import SIGMA_DATA, boundary_condition_scalings, c_noise, edm_scalings
from .schedules import RHO, SIGMA_MAX, SIGMA_MIN, karras_sigma

PRECONDS = ("edm", "cm")
FAKE_WEIGHTINGS = ("karras", "uniform")
FAKE_SIGMAS = ("grid", "dm", "lognormal")
VSD_EPS = 1e-6  # FastGen's normaliser: 1/(mean|x − D_real| + 1e-6)
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2  # EDM's training log-normal of σ


# ----------------------------------------------------------------------------
# noise grid and draws


def dmd_sigmas(num_steps=40, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
    """The Karras ρ-grid of `num_steps` points in **ascending** order, computed in float32.

    Index 0 is σ_min, index N−1 is σ_max (the seed's `karras_sigmas`).
    """
    u = torch.linspace(0, 1, num_steps, dtype=torch.float32)
    return karras_sigma(u, sigma_min, sigma_max, rho).flip(0)


def step_range(num_steps, min_step_pct=2.0, max_step_pct=98.0):
    """[lo, hi) of the DM loss's grid indices: lo = ⌊p_min·N⌋, hi = min(⌊p_max·N⌋ + 1, N).

    Percent bounds (DMD2's min/max_step_percent ×100); N = 40 gives all 40 indices,
    N = 1000 with 0.2 / 99.8 gives FastGen's {2, …, 998}.
    """
    lo = int(min_step_pct / 100 * num_steps + 1e-9)
    hi = min(int(max_step_pct / 100 * num_steps + 1e-9) + 1, num_steps)
    if not 0 <= lo < hi:
        raise ValueError(
            f"--dmd_min_step {min_step_pct} / --dmd_max_step {max_step_pct} leave no noise level "
            f"of the {num_steps}-point grid"
        )
    return lo, hi


def _randn(like, generator):
    """N(0, 1) shaped like ``like``; ``generator`` one for the batch, or a list with one per sample."""
    if isinstance(generator, (list, tuple)):
        rows = [torch.randn(like.shape[1:], generator=g, dtype=like.dtype) for g in generator]
        return torch.stack(rows).to(like.device)
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def _randint(lo, hi, n, generator, device):
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.randint(lo, hi, (1,), generator=g) for g in generator]).to(device)
    return torch.randint(lo, hi, (n,), generator=generator, device=device)


def draw_dm(x, sigmas, lo, hi, generator=None):
    """(σ, ε) of the DM loss, in the seed's order: index t ~ U{lo..hi−1} first, then ε."""
    t = _randint(lo, hi, x.shape[0], generator, sigmas.device)
    return sigmas[t], _randn(x, generator)


def draw_fake(x, sigmas, kind="grid", lo=0, hi=None, generator=None):
    """(σ, ε) of the fake-score loss.

    ``grid``: ε first, then t ~ U{0..N−1} (the seed's order and range); ``dm``: as
    the DM loss (FastGen draws the critic's t like the generator's); ``lognormal``:
    ε, then σ = exp(P_mean + P_std·n), EDM's training distribution.
    """
    if kind == "dm":
        return draw_dm(x, sigmas, lo, hi, generator)
    eps = _randn(x, generator)
    if kind == "grid":
        t = _randint(0, len(sigmas), x.shape[0], generator, sigmas.device)
        return sigmas[t], eps
    if kind == "lognormal":
        n = _randn(x.new_empty(x.shape[0]), generator)
        return torch.exp(EDM_P_MEAN + EDM_P_STD * n), eps
    raise ValueError(f"--dmd_fake_sigma must be one of {', '.join(FAKE_SIGMAS)}, got {kind!r}")


def draw_gan(x, sigmas, max_step, generator=None):
    """(σ, ε) of a GAN input: t ~ U{0..max_step−1} then ε (diffusion GAN), or σ_min and no noise."""
    if max_step <= 0:
        return sigmas[:1].expand(x.shape[0]), None
    t = _randint(0, max_step, x.shape[0], generator, sigmas.device)
    return sigmas[t], _randn(x, generator)


# ----------------------------------------------------------------------------
# preconditioned networks


def scorer(net, kind="edm", sigma_data=SIGMA_DATA, sigma_min=SIGMA_MIN):
    """``score(x, σ, y, features=False)``: D = c_skip·x + c_out·F(c_in·x, 250·ln σ, y).

    ``kind`` ``edm``: EDM scalings (real and fake scores, a generator started from
    the teacher); ``cm``: the consistency boundary condition (a CM generator).
    The scalings are computed in σ's dtype and cast to x's. With ``features``
    the call returns ``(D, F, encoder features)``.
    """
    if kind not in PRECONDS:
        raise ValueError(f"preconditioning must be one of {', '.join(PRECONDS)}, got {kind!r}")

    def score(x, sigma, y=None, features=False):
        if kind == "edm":
            scalings = edm_scalings(sigma, sigma_data)
        else:
            scalings = boundary_condition_scalings(sigma, sigma_data, sigma_min)
        c_skip, c_out, c_in = (append_dims(c.to(x.dtype), x.ndim) for c in scalings)
        t_in = c_noise(sigma).to(torch.float32)
        if features:
            raw, feats = net(c_in * x, t_in, y, return_features=True)
            return c_skip * x + c_out * raw, raw, feats
        return c_skip * x + c_out * net(c_in * x, t_in, y)

    return score


def generate(generator, z, y=None, sigma_max=SIGMA_MAX):
    """One-step generation x_g = G(σ_max·z, σ_max, y)."""
    sigma = torch.full((z.shape[0],), float(sigma_max), device=z.device)
    return generator(sigma_max * z, sigma, y)


# ----------------------------------------------------------------------------
# losses (per sample)


def dm_loss(real, fake, x_g, sigma, eps, y=None, vsd_eps=0.0, real_features=False):
    """Distribution-matching generator loss (DMD2 eq. 2; seed `compute_distribution_matching_loss`).

    x_t = x_g + σ·ε; D_r, D_f the two scores at x_t; w = mean_{CHW}|x_g − D_r| (+ vsd_eps)
    per sample; grad = nan_to_num((D_f − D_r)/w); loss = ½·mean_{CHW}(x_g − sg(x_g − grad))²,
    so ∂loss/∂x_g = grad / (C·H·W) per sample. With ``real_features`` the real score
    runs with gradient and returns its encoder features (FastGen's GAN reads them);
    its denoised output is detached either way.
    """
    dims = x_g.ndim
    x_t = x_g + append_dims(sigma.to(x_g.dtype), dims) * eps
    feats = None
    if real_features:
        d_real, _, feats = real(x_t, sigma, y, features=True)
        d_real = d_real.detach()
    with torch.no_grad():
        x_t_sg = x_t.detach()
        if not real_features:
            d_real = real(x_t_sg, sigma, y)
        d_fake = fake(x_t_sg, sigma, y)
        p_real, p_fake = x_g - d_real, x_g - d_fake
        weight = mean_flat(p_real.abs()) + vsd_eps
        grad = torch.nan_to_num((p_real - p_fake) / append_dims(weight, dims))
    loss = 0.5 * mean_flat((x_g - (x_g - grad).detach()) ** 2)
    return {
        "loss": loss, "grad": grad, "D_real": d_real, "D_fake": d_fake, "weight": weight,
        "x_t": x_t, "features": feats, "sigma": sigma,
    }


def fake_score_loss(fake, x_g, sigma, eps, y=None, weighting="karras", sigma_data=SIGMA_DATA):
    """Denoising loss of the fake score on sg(x_g): λ(σ)·mean_{CHW}(D_fake(x + σε) − x)².

    λ = σ⁻² + σ_d⁻² (``karras``, the seed) or 1 (``uniform``, FastGen's x0 MSE).
    """
    if weighting not in FAKE_WEIGHTINGS:
        raise ValueError(f"--dmd_fake_weighting must be karras or uniform, got {weighting!r}")
    x = x_g.detach()
    denoised = fake(x + append_dims(sigma.to(x.dtype), x.ndim) * eps, sigma, y)
    err = mean_flat((denoised - x) ** 2)
    if weighting == "karras":
        err = (sigma.to(x.dtype) ** -2 + sigma_data**-2) * err
    return {"loss": err, "D_fake": denoised}


def noised(img, sigma, eps):
    """img + σ·ε, or img itself when ε is None."""
    return img if eps is None else img + append_dims(sigma.to(img.dtype), img.ndim) * eps


def gan_generator_loss(logits_fake):
    """Non-saturating generator term softplus(−D(fake)), mean over heads: [B]."""
    return F.softplus(-logits_fake).reshape(logits_fake.shape[0], -1).mean(dim=1)


def gan_discriminator_loss(logits_fake, logits_real):
    """softplus(D(fake)) + softplus(−D(real)), each a mean over heads: [B]."""
    b = logits_fake.shape[0]
    fake = F.softplus(logits_fake).reshape(b, -1).mean(dim=1)
    real = F.softplus(-logits_real).reshape(logits_real.shape[0], -1).mean(dim=1)
    return fake + real


def realism(logits):
    """sigmoid(D) averaged over heads and batch (the logged D(real)/D(fake) means)."""
    return float(torch.sigmoid(logits.detach().float()).mean())


# ----------------------------------------------------------------------------
# the two turns of a DMD2 iteration


def _draw(draws, name, fn, *args):
    """(σ, ε) from ``draws[name]`` when given (replaying stored draws), else ``fn(*args)``."""
    if draws is not None and name in draws:
        return draws[name]
    return fn(*args)


def generator_turn(gen, real, fake, z, y, opts, disc=None, generator=None, draws=None):
    """The generator's per-sample loss loss_dm + w_g·GAN term, and its diagnostics.

    ``gen``/``real``/``fake`` are scorers; ``disc`` the discriminator (None: no GAN):
    placement ``teacher`` reads the real score's features of the DM's x_t (one pass,
    FastGen), ``bottleneck`` the fake score's features of the (optionally noised)
    x_g. Random draws, in order: the DM's (t, ε), then the GAN's.
    """
    sigmas = opts.sigmas(z.device)
    x_g = generate(gen, z, y, opts.sigma_max)
    sigma, eps = _draw(draws, "dm", draw_dm, x_g, sigmas, *opts.dm_range(), generator)
    on_teacher = disc is not None and opts.gan_placement == "teacher"
    dm = dm_loss(real, fake, x_g, sigma, eps, y, opts.vsd_eps, real_features=on_teacher)
    out = {"loss_dm": dm["loss"], "x_g": x_g, "dm": dm}
    total = dm["loss"]
    if disc is not None:
        if on_teacher:
            logits = disc(dm["features"])
        else:
            s, e = _draw(draws, "gan", draw_gan, x_g, sigmas, opts.gan_max_step, generator)
            logits = disc(fake(noised(x_g, s, e), s, y, features=True)[2])
        out["gan_gen"] = gan_generator_loss(logits)
        out["logits_fake"] = logits
        total = total + opts.gan_gen_weight * out["gan_gen"]
    out["loss"] = total
    return out


def critic_turn(real, fake, x_g, y, opts, disc=None, real_images=None, real_labels=None,
                generator=None, draws=None):
    """The fake score's (and discriminator's) per-sample loss on sg(x_g).

    loss_fake + w_d·(softplus(D(fake)) + softplus(−D(real))). Draws, in order: the
    fake loss's, then the real images' GAN noise, then the fake images' (``bottleneck``;
    with ``teacher`` the fake logits read the fake loss's x_t, as FastGen).
    """
    sigmas = opts.sigmas(x_g.device)
    x = x_g.detach()
    sigma, eps = _draw(draws, "fake", draw_fake, x, sigmas, opts.fake_sigma, *opts.dm_range(), generator)
    fk = fake_score_loss(fake, x, sigma, eps, y, opts.fake_weighting)
    out = {"loss_fake": fk["loss"]}
    total = fk["loss"]
    if disc is not None:
        if opts.gan_placement == "teacher":
            s_r, e_r = _draw(draws, "gan_real", draw_dm, real_images, sigmas, *opts.dm_range(), generator)
            logits_real = disc(real(noised(real_images, s_r, e_r), s_r, real_labels, features=True)[2])
            logits_fake = disc(real(noised(x, sigma, eps), sigma, y, features=True)[2])
        else:
            s_r, e_r = _draw(draws, "gan_real", draw_gan, real_images, sigmas, opts.gan_max_step, generator)
            logits_real = disc(fake(noised(real_images, s_r, e_r), s_r, real_labels, features=True)[2])
            s_f, e_f = _draw(draws, "gan_fake", draw_gan, x, sigmas, opts.gan_max_step, generator)
            logits_fake = disc(fake(noised(x, s_f, e_f), s_f, y, features=True)[2])
        out["gan_disc"] = gan_discriminator_loss(logits_fake, logits_real)
        out["logits_real"], out["logits_fake"] = logits_real, logits_fake
        total = total + opts.gan_disc_weight * out["gan_disc"]
    out["loss"] = total
    return out


class DMD2Options:
    """The knobs of a DMD2 run (cm_train's --dmd_* and --gan_* flags); see `variant_defaults`."""

    def __init__(self, num_steps=40, min_step_pct=2.0, max_step_pct=98.0, sigma_max=SIGMA_MAX,
                 vsd_eps=0.0, fake_weighting="karras", fake_sigma="grid", gan_placement="bottleneck",
                 gan_gen_weight=3e-3, gan_disc_weight=1e-2, gan_max_step=0):
        self.num_steps = int(num_steps)
        self.min_step_pct, self.max_step_pct = float(min_step_pct), float(max_step_pct)
        self.sigma_max = float(sigma_max)
        self.vsd_eps = float(vsd_eps)
        self.fake_weighting, self.fake_sigma = fake_weighting, fake_sigma
        self.gan_placement = gan_placement
        self.gan_gen_weight, self.gan_disc_weight = float(gan_gen_weight), float(gan_disc_weight)
        self.gan_max_step = int(gan_max_step)
        if self.num_steps < 2:
            raise ValueError(f"--dmd_num_steps must be at least 2, got {num_steps}")
        if not 0 <= self.gan_max_step <= self.num_steps:
            raise ValueError(f"--gan_max_step must be in [0, --dmd_num_steps], got {gan_max_step}")
        if fake_weighting not in FAKE_WEIGHTINGS:
            raise ValueError(f"--dmd_fake_weighting must be karras or uniform, got {fake_weighting!r}")
        if fake_sigma not in FAKE_SIGMAS:
            raise ValueError(f"--dmd_fake_sigma must be one of {', '.join(FAKE_SIGMAS)}, got {fake_sigma!r}")
        if gan_placement not in ("bottleneck", "teacher"):
            raise ValueError(f"--gan_placement must be bottleneck or teacher, got {gan_placement!r}")
        step_range(self.num_steps, self.min_step_pct, self.max_step_pct)
        self._sigmas = dmd_sigmas(self.num_steps, SIGMA_MIN, SIGMA_MAX, RHO)

    def sigmas(self, device):
        if self._sigmas.device != torch.device(device):
            self._sigmas = self._sigmas.to(device)
        return self._sigmas

    def dm_range(self):
        return step_range(self.num_steps, self.min_step_pct, self.max_step_pct)


# --dmd_variant: the differences between the seed (official DMD2 losses) and FastGen
VARIANTS = {
    "seed": dict(vsd_eps=0.0, fake_weighting="karras", fake_sigma="grid", gan_placement="bottleneck",
                 gan_gen_weight=3e-3, gan_disc_weight=1e-2),
    "fastgen": dict(vsd_eps=VSD_EPS, fake_weighting="uniform", fake_sigma="dm", gan_placement="teacher",
                    gan_gen_weight=1e-3, gan_disc_weight=1.0),
}


def variant_defaults(variant):
    """The option values a --dmd_variant stands for (explicit flags override them)."""
    if variant not in VARIANTS:
        raise ValueError(f"--dmd_variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    return dict(VARIANTS[variant])


def lr_warmup(step, warmup_steps):
    """diffusers' constant_with_warmup factor: step/warmup (0 at step 0), then 1."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def grad_norm(params):
    """‖∇‖₂ over the gradients of `params` (float64)."""
    norms = [p.grad.detach().double().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0

