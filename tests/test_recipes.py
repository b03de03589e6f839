"""iCT and ECT: golden schedules, closed-form losses, the shared dropout mask.

Golden numbers: tests/data/recipes/cases.json (a copy of the shared golden
tables, computed from the published formulas), reproduced by the functions the
losses call. Closed form: for data that is one point μ (a Gaussian N(μ, s²)
with s → 0) every x + σ·ε lies on the straight ODE trajectory through μ, and
the exact consistency function is f(x, σ) = μ + (x − μ)·σ_min/σ; the CT-style
estimators of both recipes then see identical outputs at both levels, so the
loss is exactly zero for any t, r — and positive where the network is wrong.
"""

import json
import os

import pytest
import torch

from cm import losses, recipes
from cm.karras_diffusion import KarrasDenoiser
from cm.train_util import derived_seed, seed_all

CASES = json.load(open(os.path.join(os.path.dirname(__file__), "data", "recipes", "cases.json")))
SIGMA_MIN = 0.002


def test_ict_num_scales_matches_the_golden_doubling_schedule():
    ict = CASES["ict"]
    got = {k: recipes.ict_num_scales(int(k), ict["total_steps"]) for k in ict["N_of_k"]}
    assert got == ict["N_of_k"]
    assert recipes.ict_num_scales(3, 4) == 81  # K' is at least 1 for short runs


def test_ict_grid_probabilities_weights_and_huber_constant():
    ict = CASES["ict"]
    sigmas = recipes.ict_sigmas(11)
    torch.testing.assert_close(sigmas, torch.tensor(ict["sigmas_N11_ascending"], dtype=torch.float64))
    torch.testing.assert_close(recipes.ict_index_probs(sigmas), torch.tensor(ict["probs_N11"], dtype=torch.float64))
    torch.testing.assert_close(recipes.ict_weights(sigmas), torch.tensor(ict["weights_N11"], dtype=torch.float64))
    assert recipes.pseudo_huber_c(3 * 32 * 32) == pytest.approx(ict["pseudo_huber_c_cifar10"], rel=1e-12)


def test_ict_draw_follows_the_index_probabilities():
    n = 20000
    lo, hi, w = recipes.ict_draw(11, n, generator=torch.Generator().manual_seed(0))
    sigmas = recipes.ict_sigmas(11).float()
    index = torch.searchsorted(sigmas, lo.contiguous())
    freq = torch.bincount(index, minlength=10)[:10].double() / n
    assert (freq - torch.tensor(CASES["ict"]["probs_N11"], dtype=torch.float64)).abs().max() < 0.015
    torch.testing.assert_close(hi, sigmas[index + 1])
    torch.testing.assert_close(w, (1 / (sigmas[index + 1] - sigmas[index])).float())


def test_ect_r_of_t_and_stage_matches_the_golden_table():
    for key, expected in CASES["ect"]["r_of_t_stage"].items():
        t, stage = key.split("@")
        r = recipes.ect_r(torch.tensor(float(t), dtype=torch.float64), int(stage))
        assert float(r) == pytest.approx(expected, rel=1e-12, abs=1e-15), key
    assert [recipes.ect_stage(s, 25000) for s in (0, 24999, 25000, 80000)] == [0, 0, 1, 3]
    # late stages of a large q keep t − r representable in float32 (no 0/0 in the loss)
    t = torch.tensor([0.01, 1.0, 80.0])
    for stage in (3, 2000):
        r = recipes.ect_r(t, stage, q=256.0)
        assert (r < t).all() and ((t - r) / t >= 0.9 * recipes.ECT_MIN_SHRINK).all()


# ----------------------------------------------------------------------------
# closed forms


MU = torch.linspace(-0.8, 0.8, 2 * 4 * 4).view(1, 2, 4, 4)


def exact_f(sigma_min):
    def f(x, sigma):
        scale = (sigma_min / sigma).view(-1, 1, 1, 1)
        return MU + (x - MU) * scale

    return f


def wrong_at(f, lo, hi, delta=0.05):
    """f plus δ where lo ≤ σ ≤ hi."""

    def g(x, sigma):
        bad = ((sigma >= lo) & (sigma <= hi)).view(-1, 1, 1, 1)
        return f(x, sigma) + delta * bad

    return g


class ExactDenoiser(KarrasDenoiser):
    """A KarrasDenoiser whose D is a given function (the loss wiring runs unchanged)."""

    def __init__(self, f):
        super().__init__(loss_norm="l2")
        self.f = f

    def denoise(self, model, x_t, sigmas, **kw):
        return None, self.f(x_t, sigmas)


def batch(n=256):
    return MU.expand(n, -1, -1, -1).clone()


def test_ict_loss_is_zero_for_the_exact_consistency_function_and_positive_where_wrong():
    torch.manual_seed(0)
    out = ExactDenoiser(exact_f(SIGMA_MIN)).ict_losses(None, batch(), 11)
    assert out["loss"].abs().max() < 1e-5
    assert (out["r"] < out["sigmas"]).all()
    sigmas = recipes.ict_sigmas(11).float()
    bad = sigmas[5].item()
    torch.manual_seed(0)
    out = ExactDenoiser(wrong_at(exact_f(SIGMA_MIN), bad * 0.999, bad * 1.001)).ict_losses(None, batch(), 11)
    touches = ((out["sigmas"] - bad).abs() < 1e-4 * bad) | ((out["r"] - bad).abs() < 1e-4 * bad)
    assert touches.any() and (~touches).any()
    assert (out["loss"][touches] > 1e-3).all()
    assert out["loss"][~touches].abs().max() < 1e-5


def test_p_mean_and_p_std_move_the_noise_levels_both_losses_draw():
    """--p_mean/--p_std: ECT's t and iCT's grid index follow ln t ~ N(p_mean, p_std²)."""
    torch.manual_seed(0)
    exact = ExactDenoiser(exact_f(0.0))
    default = exact.ect_losses(None, batch(), 1)["sigmas"]
    assert abs(default.log().mean().item() - recipes.P_MEAN) < 0.4
    moved = exact.ect_losses(None, batch(), 1, p_mean=1.5, p_std=0.1)["sigmas"]
    assert abs(moved.log().mean().item() - 1.5) < 0.05 and moved.log().std().item() < 0.2
    ict = ExactDenoiser(exact_f(SIGMA_MIN)).ict_losses(None, batch(), 1281, p_mean=1.5, p_std=0.1)
    assert abs(ict["sigmas"].log().mean().item() - 1.5) < 0.05
    sigmas = recipes.ict_sigmas(11)
    assert not torch.allclose(recipes.ict_index_probs(sigmas, 1.5, 0.5), recipes.ict_index_probs(sigmas))


@pytest.mark.parametrize("stage", [0, 2, 6])
def test_ect_loss_is_zero_for_the_exact_consistency_function_and_positive_where_wrong(stage):
    # ECT's target at r = 0 is x itself: the consistency function with its boundary at σ = 0 (f = μ for σ > 0)
    torch.manual_seed(1)
    out = ExactDenoiser(exact_f(0.0)).ect_losses(None, batch(), stage)
    assert out["loss"].abs().max() < 1e-6
    assert (out["r"] < out["sigmas"]).all()
    assert (out["r"] == 0).any() == (stage == 0)  # stage 0 and 1 map small t to r = 0, later stages never
    torch.manual_seed(1)
    out = ExactDenoiser(wrong_at(exact_f(0.0), 0.5, 1.0)).ect_losses(None, batch(), stage)
    t, r = out["sigmas"], out["r"]
    touches = ((t >= 0.5) & (t <= 1.0)) ^ ((r >= 0.5) & (r <= 1.0))
    assert touches.any()
    assert (out["loss"][touches] > 1e-3).all()
    clean = ~(((t >= 0.5) & (t <= 1.0)) | ((r >= 0.5) & (r <= 1.0)))
    assert out["loss"][clean].abs().max() < 1e-6


def test_ect_loss_formula_with_huber_constant():
    x = torch.zeros(2, 1, 2, 2)
    noise = torch.ones_like(x)
    t, r = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.0])
    # D(y, σ) = y: Δ = (t − r)·ε, ‖Δ‖ = 2(t − r) (4 values); at r = 0 the target is x = 0 itself
    loss = losses.ect_loss(lambda y, s: y, x, t, r, noise, c=0.3)
    expected = (torch.sqrt((2 * (t - r)) ** 2 + 0.09) - 0.3) / (t - r)
    torch.testing.assert_close(loss, expected)
    # c = 0 and Δ = 0: zero loss with a finite (zero) gradient
    y = torch.ones(1, 1, 2, 2, requires_grad=True)
    value = losses.pseudo_huber(y, y.detach(), 0.0)
    value.sum().backward()
    assert value.item() < 1e-9 and torch.isfinite(y.grad).all()


# ----------------------------------------------------------------------------
# the shared dropout mask


class MaskRecorder(torch.nn.Module):
    """A one-layer 'network' with dropout that records the mask of every call."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 1)
        self.drop = torch.nn.Dropout(0.5)
        self.masks = []

    def forward(self, x, t):
        h = self.drop(torch.ones_like(x))
        self.masks.append(h != 0)
        return self.conv(x) * h


@pytest.mark.parametrize("mode", ["ect", "ict"])
def test_both_calls_of_a_step_share_the_dropout_mask_and_steps_differ(mode):
    net = MaskRecorder().train()
    diffusion = KarrasDenoiser(distillation=True, loss_norm="l2")
    for step in range(2):
        seed_all(derived_seed(0, 0, step, 0))
        if mode == "ect":
            out = diffusion.ect_losses(net, batch(8), stage=3)
        else:
            out = diffusion.ict_losses(net, batch(8), 11)
        out["loss"].sum().backward()
    assert len(net.masks) == 4
    assert torch.equal(net.masks[0], net.masks[1]) and torch.equal(net.masks[2], net.masks[3])
    assert not torch.equal(net.masks[0], net.masks[2])
    assert 0.3 < net.masks[0].float().mean() < 0.7
