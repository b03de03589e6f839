"""Denoiser losses, distances and weightings."""

import argparse
import copy

import pytest
import torch
import torch.nn.functional as F

from cm import losses
from cm.karras_diffusion import KarrasDenoiser
from cm.metrics.lpips import LPIPSWeightsMissing
from cm.precond import get_weightings
from cm.script_util import (
    add_dict_to_argparser,
    cm_train_defaults,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    model_and_diffusion_kwargs,
    train_defaults,
)


def tiny(dropout=0.0, **over):
    kw = model_and_diffusion_defaults()
    kw.update(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16",
              num_head_channels=8, class_cond=True, dropout=dropout, loss_norm="l2")
    kw.update(over)
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, diffusion


def batch(n=4):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1, {"y": torch.arange(n) % 10}


def test_distances():
    x, y = torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8)
    y[1] *= 2
    assert torch.equal(losses.distance("l1", x, y), torch.tensor([1.0, 2.0]))
    assert torch.equal(losses.distance("l2", x, y), torch.tensor([1.0, 4.0]))
    a, b = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    expected = ((F.interpolate(a, size=32, mode="bilinear") - F.interpolate(b, size=32, mode="bilinear")) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(losses.distance("l2-32", a, b), expected)
    with pytest.raises(ValueError, match="unknown loss_norm 'l3'"):
        losses.distance("l3", x, y)


def test_lpips_distance_resizes_to_224_and_maps_to_unit_range():
    seen = {}

    def fake_lpips(a, b):  # records what the distance hands the network
        seen["shape"], seen["min"] = a.shape, float(a.min())
        return (a - b).abs().mean((1, 2, 3))

    x = -torch.ones(2, 3, 32, 32)
    losses.distance("lpips", x, x, lpips=fake_lpips)
    assert seen == {"shape": (2, 3, 224, 224), "min": 0.0}


def test_weightings():
    sigma = torch.tensor([0.5, 2.0])
    snr = sigma**-2
    torch.testing.assert_close(get_weightings("snr", snr), snr)
    torch.testing.assert_close(get_weightings("snr+1", snr), snr + 1)
    torch.testing.assert_close(get_weightings("karras", snr, 0.5), snr + 4)
    torch.testing.assert_close(get_weightings("truncated-snr", snr), torch.tensor([4.0, 1.0]))
    torch.testing.assert_close(get_weightings("uniform", snr), torch.ones(2))
    with pytest.raises(ValueError, match="weight_schedule"):
        KarrasDenoiser(weight_schedule="cosine")


def test_edm_training_loss_terms():
    model, diffusion = tiny()
    x0, kw = batch()
    sigmas = torch.tensor([0.01, 0.5, 2.0, 40.0])
    noise = torch.randn_like(x0)
    terms = diffusion.training_losses(model, x0, sigmas, model_kwargs=kw, noise=noise)
    _, denoised = diffusion.denoise(model, x0 + noise * sigmas.view(-1, 1, 1, 1), sigmas, **kw)
    err = ((denoised - x0) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(terms["xs_mse"], err)
    torch.testing.assert_close(terms["loss"], err * (sigmas**-2 + 4))
    assert terms["loss"].shape == (4,)


def test_consistency_distillation_grads_reach_the_student_only():
    student, diffusion = tiny()
    target = copy.deepcopy(student).requires_grad_(False)
    teacher, teacher_diffusion = tiny(distillation=False)
    diffusion.distillation = True
    x0, kw = batch()
    terms = diffusion.consistency_losses(
        student, x0, 18, model_kwargs=kw, target_model=target, teacher_model=teacher, teacher_diffusion=teacher_diffusion
    )
    assert terms["loss"].shape == (4,) and (terms["loss"] >= 0).all()
    terms["loss"].mean().backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    grid = set(diffusion._grid(torch.arange(17) / 17).tolist())
    assert set(terms["sigmas"].tolist()) <= grid


def test_student_and_target_see_the_same_dropout():
    """With t' = t and no teacher move, identical student/target networks agree exactly."""
    model, diffusion = tiny(dropout=0.3)
    model.train()
    x0, kw = batch()
    t = torch.full((4,), 1.5)
    denoise = lambda x, s: diffusion.denoise(model, x, s, **kw)[1]  # noqa: E731
    per_sample = losses.consistency_loss(
        denoise, denoise, x0, t, t, torch.randn_like(x0), lambda a, b: losses.distance("l2", a, b),
        torch.ones(4), teacher=lambda x, s: x * 0 + x,  # Heun step of length 0: x' = x
    )
    assert torch.equal(per_sample, torch.zeros(4))
    # without the shared randomness the two dropout masks differ
    a, b = denoise(x0, t), denoise(x0, t)
    assert not torch.equal(a, b)


def test_consistency_training_needs_no_teacher():
    student, diffusion = tiny(distillation=True)
    target = copy.deepcopy(student)
    x0, kw = batch()
    terms = diffusion.consistency_losses(student, x0, 10, model_kwargs=kw, target_model=target)
    assert torch.isfinite(terms["loss"]).all()
    with pytest.raises(ValueError, match="target_model"):
        diffusion.consistency_losses(student, x0, 10, model_kwargs=kw)


def test_progdist_losses_run_and_use_the_half_steps():
    student, diffusion = tiny()
    teacher = copy.deepcopy(student)
    x0, kw = batch()
    terms = diffusion.progdist_losses(student, x0, 8, model_kwargs=kw, teacher_model=teacher, teacher_diffusion=diffusion)
    terms["loss"].mean().backward()
    assert torch.isfinite(terms["loss"]).all()
    assert set(terms["sigmas"].tolist()) <= set(diffusion._grid(torch.arange(8) / 8).tolist())


def test_lpips_without_weights_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("CM_LPIPS_PATH", raising=False)
    student, diffusion = tiny(loss_norm="lpips")
    x0, kw = batch(2)
    with pytest.raises(LPIPSWeightsMissing, match="convert_lpips_weights"):
        diffusion.consistency_losses(student, x0, 10, model_kwargs=kw, target_model=copy.deepcopy(student))


def test_loss_norm_flag_reaches_the_denoiser():
    parser = argparse.ArgumentParser()
    defaults = {**train_defaults(), **model_and_diffusion_defaults(), **cm_train_defaults()}
    add_dict_to_argparser(parser, defaults)
    args = parser.parse_args(["--loss_norm", "l2", "--image_size", "32", "--num_channels", "32",
                              "--num_res_blocks", "1", "--attention_resolutions", "16"])
    _, diffusion = create_model_and_diffusion(**model_and_diffusion_kwargs(args, distillation=True))
    assert diffusion.loss_norm == "l2" and diffusion.distillation
    # and the loss it computes is the l2 one
    x, y = torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32) * 0.5
    assert diffusion.distance(x, y).item() == pytest.approx(0.25)
    args = parser.parse_args([])
    assert model_and_diffusion_kwargs(args)["loss_norm"] == "lpips"
