"""The training losses reproduce the original's loss terms (tests/data/losses.pt).

The file holds the inputs, the expected terms and the exact call recipe; the
model is the `unet_a` golden network (float32, eval mode).
"""

import copy

import pytest
import torch

import golden
from cm import losses
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


# --- targets by value, on hand-made denoisers -------------------------------------------------


class Recorder:
    """A denoiser D(x, σ) = k(σ)·x that records every (x, σ) it is called with."""

    def __init__(self, k=torch.zeros_like):
        self.calls, self.k = [], k

    def __call__(self, x, sigma):
        self.calls.append((x.clone(), sigma.clone()))
        return self.k(sigma).view(-1, 1, 1, 1) * x


def l2(a, b):
    return (a - b).pow(2).mean((1, 2, 3))


def test_consistency_training_target_is_x0_plus_t_next_noise():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 1, 2, 2, generator=g), torch.randn(3, 1, 2, 2, generator=g)
    t, t_next = torch.tensor([2.0, 1.0, 0.5]), torch.tensor([1.5, 0.4, 0.1])
    target = Recorder()
    loss = losses.consistency_loss(lambda x, s: x, target, x0, t, t_next, noise, l2, torch.full((3,), 2.0))
    ((x_next, s_next),) = target.calls
    # CM paper Alg. 3: the target network sees x_0 + t'·z with the student's z
    torch.testing.assert_close(x_next, x0 + t_next.view(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(s_next, t_next)
    # the student sees x_0 + t·z; the target here returns 0
    torch.testing.assert_close(loss, 2.0 * l2(x0 + t.view(-1, 1, 1, 1) * noise, torch.zeros_like(x0)))


def test_progdist_target_and_half_steps_by_value():
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 1, 2, 2, generator=g), torch.randn(2, 1, 2, 2, generator=g)
    t, t_mid, t_next = torch.tensor([4.0, 1.0]), torch.tensor([2.0, 0.6]), torch.tensor([1.0, 0.2])
    k = lambda s: 1.0 / (1.0 + s**2)  # the exact denoiser of N(0, 1) data
    teacher = Recorder(k)
    got = {}
    losses.progdist_loss(lambda x, s: torch.zeros_like(x), teacher, x0, t, t_mid, t_next, noise,
                         lambda a, b: got.setdefault("target", b).sum((1, 2, 3)) * 0, torch.ones(2))
    (x_a, s_a), (x_b, s_b) = teacher.calls
    # two teacher Euler steps t -> t_mid -> t_next, the second one from the half step
    torch.testing.assert_close(s_a, t)
    torch.testing.assert_close(s_b, t_mid)
    x_t = (x0 + t.view(-1, 1, 1, 1) * noise).double()
    v = lambda s: s.double().view(-1, 1, 1, 1)
    x_mid = x_t + (x_t - k(v(t)) * x_t) / v(t) * (v(t_mid) - v(t))
    torch.testing.assert_close(x_b.double(), x_mid, **TOL)
    x_next = x_mid + (x_mid - k(v(t_mid)) * x_mid) / v(t_mid) * (v(t_next) - v(t_mid))
    # Salimans & Ho: the denoised value whose single Euler step from t lands on x_next
    target = x_t - v(t) * (x_next - x_t) / (v(t_next) - v(t))
    torch.testing.assert_close(got["target"].double(), target, **TOL)


def test_progdist_losses_draw_half_steps_of_the_karras_grid(nets):
    student, _, teacher = nets
    calls = []
    teacher_denoiser = KarrasDenoiser(distillation=False)
    real = teacher_denoiser.denoise
    teacher_denoiser.denoise = lambda m, x, s, **kw: calls.append(s.clone()) or real(m, x, s, **kw)
    torch.manual_seed(9)
    n = 18
    with torch.no_grad():
        terms = student_denoiser().progdist_losses(
            student, X, n, model_kwargs={"y": Y}, teacher_model=teacher,
            teacher_diffusion=teacher_denoiser, noise=NOISE)
    idx = torch.searchsorted(-_grid(torch.arange(n) / n), -terms["sigmas"])
    torch.testing.assert_close(calls[0], terms["sigmas"])
    torch.testing.assert_close(calls[1], _grid((idx + 0.5) / n))


def _grid(u):
    return KarrasDenoiser()._grid(u)


@pytest.mark.parametrize("which", ["consistency", "progdist"])
def test_a_teacher_without_its_denoiser_is_an_error(nets, which):
    student, target, teacher = nets
    call = getattr(student_denoiser(), f"{which}_losses")
    kw = dict(target_model=target) if which == "consistency" else {}
    with pytest.raises(ValueError, match="teacher_diffusion"):
        call(student, X[:1], 18, model_kwargs={"y": Y[:1]}, teacher_model=teacher, **kw)
