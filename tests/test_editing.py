"""Zero-shot editing loops keep exactly what the observation fixes."""

import torch

from cm.editing import iterative_colorization, iterative_inpainting, iterative_superres
from cm.random_util import get_generator

TS = [0, 20, 39]


def distiller(x, sigma):
    """Some consistency-like map: a bounded function of the noisy input."""
    return torch.tanh(x / (1 + sigma.view(-1, 1, 1, 1)))


def inputs(n=2, size=16):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    x = torch.randn(n, 3, size, size, generator=g) * 80
    return images, x


def test_inpainting_keeps_the_known_pixels():
    images, x = inputs()
    mask = torch.zeros(3, 16, 16)
    mask[:, :, :8] = 1
    out, reference = iterative_inpainting(distiller, images, x, TS, mask, generator=get_generator("dummy"))
    # the last level is σ_min, so only float rounding of σ_min is re-noised
    torch.testing.assert_close(out[..., :8], images[..., :8], atol=1e-6, rtol=0)
    assert torch.equal(reference[..., 8:], -torch.ones_like(reference[..., 8:]))
    assert not torch.allclose(out[..., 8:], images[..., 8:])


def test_colorization_keeps_the_luminance():
    images, x = inputs()
    out, reference = iterative_colorization(distiller, images, x, TS, generator=get_generator("dummy"))
    w = torch.tensor([0.2989, 0.5870, 0.1140]).view(1, 3, 1, 1)
    luma = lambda t: (t * w).sum(1)  # noqa: E731
    torch.testing.assert_close(luma(out), luma(images), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(luma(reference), luma(images), atol=1e-5, rtol=1e-5)
    # the reference keeps the luminance direction only: it is luma·w/|w|²
    torch.testing.assert_close(reference, luma(images)[:, None] * w / w.square().sum(), atol=1e-5, rtol=1e-5)


def test_superres_keeps_the_patch_means():
    images, x = inputs()
    out, reference = iterative_superres(distiller, images, x, TS, generator=get_generator("dummy"), patch_size=4)
    pool = lambda t: torch.nn.functional.avg_pool2d(t, 4)  # noqa: E731
    torch.testing.assert_close(pool(out), pool(images), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference, torch.nn.functional.interpolate(pool(images), scale_factor=4), atol=1e-5, rtol=1e-5)
