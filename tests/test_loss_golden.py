"""The training losses reproduce the original's loss terms (tests/data/losses.pt).

The file holds the inputs, the expected terms and the exact call recipe; the
model is the `unet_a` golden network (float32, eval mode).
"""

import copy

import pytest
import torch

import golden
from cm.karras_diffusion import KarrasDenoiser
from cm.script_util import create_model_and_diffusion, model_and_diffusion_defaults

LOSSES = torch.load(golden.DATA / "losses.pt", weights_only=False)
X = LOSSES["inputs"]["x"]
Y = LOSSES["inputs"]["y"]
NOISE = LOSSES["inputs"]["noise"]
SIGMAS = LOSSES["inputs"]["sigmas"]
EXPECTED = LOSSES["expected"]
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def nets():
    """(student, target = student·0.99, teacher = student·1.01), unet_a golden weights."""
    kw = model_and_diffusion_defaults()
    kw.update(golden.case("unet_a_forward")["flags"])
    model, _ = create_model_and_diffusion(**kw)
    model.load_state_dict(golden.golden_state_dict("unet_a"), strict=True)
    model.eval()
    scaled = []
    for factor in (0.99, 1.01):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(factor)
        scaled.append(m)
    return model, scaled[0], scaled[1]


def student_denoiser(loss_norm="l2"):
    return KarrasDenoiser(distillation=True, weight_schedule="uniform", loss_norm=loss_norm)


TEACHER_DENOISER = KarrasDenoiser(distillation=False)


@torch.no_grad()
def test_edm_karras_loss(nets):
    got = KarrasDenoiser(distillation=False, weight_schedule="karras").training_losses(
        nets[0], X, SIGMAS, model_kwargs={"y": Y}, noise=NOISE
    )
    for key in ("xs_mse", "mse", "loss"):
        torch.testing.assert_close(got[key], EXPECTED["edm_karras"][key], **TOL)


@pytest.mark.parametrize("loss_norm", ["l2", "l1", "l2-32"])
@torch.no_grad()
def test_consistency_distillation_loss(nets, loss_norm):
    student, target, teacher = nets
    torch.manual_seed(7)
    got = student_denoiser(loss_norm).consistency_losses(
        student, X, 18, model_kwargs={"y": Y}, target_model=target,
        teacher_model=teacher, teacher_diffusion=TEACHER_DENOISER, noise=NOISE,
    )
    torch.testing.assert_close(got["loss"], EXPECTED[f"cd_{loss_norm}"]["loss"], **TOL)


@torch.no_grad()
def test_consistency_training_loss(nets):
    student, target, _ = nets
    torch.manual_seed(8)
    got = student_denoiser().consistency_losses(
        student, X, 18, model_kwargs={"y": Y}, target_model=target, noise=NOISE
    )
    torch.testing.assert_close(got["loss"], EXPECTED["ct_l2"]["loss"], **TOL)


@torch.no_grad()
def test_progdist_loss(nets):
    student, _, teacher = nets
    torch.manual_seed(9)
    got = student_denoiser().progdist_losses(
        student, X, 18, model_kwargs={"y": Y}, teacher_model=teacher,
        teacher_diffusion=TEACHER_DENOISER, noise=NOISE,
    )
    torch.testing.assert_close(got["loss"], EXPECTED["progdist"]["loss"], **TOL)
