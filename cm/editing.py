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


@torch.no_grad()
def iterative_edit(distiller, x, ts, replace, t_min=0.002, t_max=80.0, rho=7.0, steps=40, generator=None):
    """Multistep sampling with ``x0 = replace(clamp(f(x, t)))`` after each denoise."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(ts) - 1):
        t = sigma_at(ts[i], steps, t_min, t_max, rho)
        x0 = replace(distiller(x, t * s_in).clamp(-1.0, 1.0))
        next_t = np.clip(sigma_at(ts[i + 1], steps, t_min, t_max, rho), t_min, t_max)
        noise = generator.randn_like(x) if generator is not None else torch.randn_like(x)
        x = x0 + noise * np.sqrt(next_t**2 - t_min**2)
    return x


def iterative_inpainting(distiller, images, x, ts, mask, t_min=0.002, t_max=80.0, rho=7.0, steps=40, generator=None):
    """Inpaint where ``mask`` is 0, keeping ``images`` where it is 1.

    ``mask`` broadcasts against the images (e.g. [C,H,W] or [N,C,H,W]).
    Returns (samples, the masked reference with −1 in the holes).
    """
    mask = mask.to(images)

    def replacement(known, generated):
        return known * mask + generated * (1.0 - mask)

    reference = replacement(images, -torch.ones_like(images))
    samples = iterative_edit(
        distiller, x, ts, lambda x0: replacement(reference, x0), t_min, t_max, rho, steps, generator
    )
    return samples, reference


def _basis_replacement(q, keep, to_coords, from_coords):
    """replace(known, generated): coordinates in basis q where `keep` is set come from `known`."""

    def replacement(known, generated):
        a, b = to_coords(known) @ q, to_coords(generated) @ q
        mixed = torch.where(keep, a, b)
        return from_coords(mixed @ q.T)

    return replacement


def iterative_colorization(
    distiller, images, x, ts, t_min=0.002, t_max=80.0, rho=7.0, steps=40, generator=None,
    luma=(0.2989, 0.5870, 0.1140),
):
    """Colourise: keep the reference's luminance (the `luma` direction), generate the chroma.

    Returns (samples, the grey reference).
    """
    q = torch.as_tensor(_orthogonal_completion(luma), dtype=torch.float32, device=images.device)
    keep = torch.zeros(3, dtype=torch.bool, device=images.device)
    keep[0] = True
    # channels last so that the 3×3 basis acts on the colour axis
    replacement = _basis_replacement(
        q, keep, lambda t: t.permute(0, 2, 3, 1), lambda t: t.permute(0, 3, 1, 2)
    )
    reference = replacement(images, torch.zeros_like(images))
    samples = iterative_edit(
        distiller, x, ts, lambda x0: replacement(reference, x0), t_min, t_max, rho, steps, generator
    )
    return samples, reference


def iterative_superres(
    distiller, images, x, ts, t_min=0.002, t_max=80.0, rho=7.0, steps=40, generator=None, patch_size=8,
):
    """Super-resolve: keep each patch's mean (the low-res image), generate the detail.

    Returns (samples, the blocky low-resolution reference).
    """
    n, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch_size {p}")
    q = torch.as_tensor(_orthogonal_completion(np.ones(p * p)), dtype=torch.float32, device=images.device)
    keep = torch.zeros(p * p, dtype=torch.bool, device=images.device)
    keep[0] = True

    def to_patches(t):  # [N,C,H,W] -> [N,C,(H/p)(W/p),p*p]
        return t.reshape(-1, c, h // p, p, w // p, p).permute(0, 1, 2, 4, 3, 5).reshape(-1, c, (h // p) * (w // p), p * p)

    def from_patches(t):
        return t.reshape(-1, c, h // p, w // p, p, p).permute(0, 1, 2, 4, 3, 5).reshape(-1, c, h, w)

    replacement = _basis_replacement(q, keep, to_patches, from_patches)
    reference = replacement(images, torch.zeros_like(images))
    samples = iterative_edit(
        distiller, x, ts, lambda x0: replacement(reference, x0), t_min, t_max, rho, steps, generator
    )
    return samples, reference
