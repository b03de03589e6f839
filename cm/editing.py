"""Zero-shot editing with a consistency model (CM paper §5, App. D).

Each routine is the multistep sampler with a replacement after every denoising
step: the part of the image that the observation fixes is taken from the
reference, the rest from the model. The observation is expressed as an
orthogonal change of basis Q and a mask of the kept coordinates in that basis.
"""

import numpy as np
import torch

from .schedules import sigma_at


def _orthogonal_completion(first):
    """An orthogonal matrix whose first column is `first` normalised (QR completion)."""
    first = np.asarray(first, dtype=np.float64)
    matrix = np.eye(len(first))
    matrix[:, 0] = first / np.linalg.norm(first)
    q = np.linalg.qr(matrix)[0]
    return -q if np.sum(q[:, 0]) < 0 else q


def schedule_sigmas(ts, steps, t_min=0.002, t_max=80.0, rho=7.0):
    """σ at each index of ``ts`` on the ``steps``-point ρ-schedule (Karras eq. 5)."""
    return [float(sigma_at(t, steps, t_min, t_max, rho)) for t in ts]


def renoise_std(next_sigma, t_min):
    """√(σ_next² − σ_min²) of CM Alg. 1, exactly 0 when σ_next is σ_min up to float rounding."""
    var = next_sigma**2 - t_min**2
    return float(np.sqrt(var)) if var > 1e-9 * t_min**2 else 0.0


@torch.no_grad()
def edit_with_sigmas(distiller, x, sigmas, replace=None, generator=None, t_min=0.002, callback=None):
    """Multistep consistency sampling (CM Alg. 1) with a replacement after each denoise (CM Alg. 4).

    Denoise at every σ of ``sigmas`` but the last, ``x0 = replace(clamp(f(x, σ_i)))``,
    then re-noise to the next level: ``x = x0 + √(σ_{i+1}² − σ_min²)·z``. A last
    level of σ_min leaves ``x0`` unchanged, so kept coordinates are exact.
    """
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x0 = distiller(x, sigmas[i] * s_in).clamp(-1.0, 1.0)
        if replace is not None:
            x0 = replace(x0)
        if callback is not None:
            callback({"i": i, "sigma": sigmas[i], "x": x, "denoised": x0})
        noise = generator.randn_like(x) if generator is not None else torch.randn_like(x)
        x = x0 + noise * renoise_std(max(float(sigmas[i + 1]), t_min), t_min)
    return x


def iterative_edit(distiller, x, ts, replace, t_min=0.002, t_max=80.0, rho=7.0, steps=40, generator=None):
    """Multistep sampling at indices ``ts`` with ``x0 = replace(clamp(f(x, t)))`` after each denoise."""
    sigmas = [min(s, t_max) for s in schedule_sigmas(ts, steps, t_min, t_max, rho)]
    return edit_with_sigmas(distiller, x, sigmas, replace, generator, t_min)


LUMA = (0.2989, 0.5870, 0.1140)


def inpaint_observation(images, mask):
    """(reference with −1 in the holes, replacement(known, generated)) for ``mask`` 1 = keep.

    ``mask`` broadcasts against the images (e.g. [C,H,W], [1,H,W] or [N,C,H,W]).
    """
    mask = mask.to(images)

    def replacement(known, generated):
        return known * mask + generated * (1.0 - mask)

    return replacement(images, -torch.ones_like(images)), replacement


def _basis_replacement(q, keep, to_coords, from_coords):
    """replace(known, generated): coordinates in basis q where `keep` is set come from `known`."""

    def replacement(known, generated):
        a, b = to_coords(known) @ q, to_coords(generated) @ q
        mixed = torch.where(keep, a, b)
        return from_coords(mixed @ q.T)

    return replacement


def colorize_observation(images, luma=LUMA):
    """(grey reference: the `luma` component only, replacement) keeping the luminance direction."""
    q = torch.as_tensor(_orthogonal_completion(luma), dtype=images.dtype, device=images.device)
    keep = torch.zeros(3, dtype=torch.bool, device=images.device)
    keep[0] = True
    # channels last so that the 3×3 basis acts on the colour axis
    replacement = _basis_replacement(q, keep, lambda t: t.permute(0, 2, 3, 1), lambda t: t.permute(0, 3, 1, 2))
    return replacement(images, torch.zeros_like(images)), replacement


def superres_observation(images, patch_size):
    """(blocky reference: each p×p patch's mean, replacement) keeping the patch means."""
    n, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch_size {p}")
    q = torch.as_tensor(_orthogonal_completion(np.ones(p * p)), dtype=images.dtype, device=images.device)
    keep = torch.zeros(p * p, dtype=torch.bool, device=images.device)
    keep[0] = True

    def to_patches(t):  # [N,C,H,W] -> [N,C,(H/p)(W/p),p*p]
        return t.reshape(-1, c, h // p, p, w // p, p).permute(0, 1, 2, 4, 3, 5).reshape(-1, c, (h // p) * (w // p), p * p)

    def from_patches(t):
        return t.reshape(-1, c, h // p, w // p, p, p).permute(0, 1, 2, 4, 3, 5).reshape(-1, c, h, w)

    replacement = _basis_replacement(q, keep, to_patches, from_patches)
    return replacement(images, torch.zeros_like(images)), replacement


def slerp(z0, z1, alpha):
    """Spherical interpolation between noises z0 and z1 (per sample), alpha ∈ [0, 1] per sample."""
    a = torch.as_tensor(alpha, dtype=z0.dtype, device=z0.device).reshape(-1, *[1] * (z0.ndim - 1))
    flat0, flat1 = z0.flatten(1), z1.flatten(1)
    cos = (flat0 * flat1).sum(1) / (flat0.norm(dim=1) * flat1.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1.0, 1.0)).reshape(a.shape)
    sin = torch.sin(theta)
    safe = sin.abs() > 1e-6  # parallel noises: fall back to the straight line
    w0 = torch.where(safe, torch.sin((1 - a) * theta) / torch.where(safe, sin, 1.0), 1 - a)
    w1 = torch.where(safe, torch.sin(a * theta) / torch.where(safe, sin, 1.0), a)
    return w0 * z0 + w1 * z1


def _edit(distiller, x, ts, replacement, reference, t_min, t_max, rho, steps, generator):
    return iterative_edit(
        distiller, x, ts, lambda x0: replacement(reference, x0), t_min, t_max, rho, steps, generator
    )


def iterative_inpainting(distiller, images, x, ts, mask, t_min=0.002, t_max=80.0, rho=7.0, steps=40, generator=None):
    """Inpaint where ``mask`` is 0, keeping ``images`` where it is 1.

    Returns (samples, the masked reference with −1 in the holes).
    """
    reference, replacement = inpaint_observation(images, mask)
    return _edit(distiller, x, ts, replacement, reference, t_min, t_max, rho, steps, generator), reference


def iterative_colorization(
    distiller, images, x, ts, t_min=0.002, t_max=80.0, rho=7.0, steps=40, generator=None, luma=LUMA,
):
    """Colourise: keep the reference's luminance (the `luma` direction), generate the chroma.

    Returns (samples, the grey reference).
    """
    reference, replacement = colorize_observation(images, luma)
    return _edit(distiller, x, ts, replacement, reference, t_min, t_max, rho, steps, generator), reference


def iterative_superres(
    distiller, images, x, ts, t_min=0.002, t_max=80.0, rho=7.0, steps=40, generator=None, patch_size=8,
):
    """Super-resolve: keep each patch's mean (the low-res image), generate the detail.

    Returns (samples, the blocky low-resolution reference).
    """
    reference, replacement = superres_observation(images, patch_size)
    return _edit(distiller, x, ts, replacement, reference, t_min, t_max, rho, steps, generator), reference
