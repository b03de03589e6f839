"""ECT against ECT's own code (tests/data/ect, from locuslab/ect's ECMPrecond, ECMLoss and
few-step generator): the denoiser in sampling (eval) and training mode, per-sample losses,
targets and gradients at two stages and two c, one- and two-step generation and its uint8.

Everything goes through what cm_train.py and image_sample.py use: the ECT row of
`cm.recipes`, `create_model_and_diffusion`, `KarrasDenoiser.train_denoiser` /
`denoise`, `cm.losses.ect_loss`, `cm.recipes.ect_r`, `karras_sample` and `to_uint8`.
"""

import json
from pathlib import Path

import pytest
import torch

from cm import recipes
from cm.karras_diffusion import karras_sample
from cm.losses import ect_loss
from cm.precond import c_noise, scalings
from cm.sample_util import to_uint8
from cm.samplers import sample_ect_fewstep
from cm.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from golden import decode_weights

DATA = Path(__file__).resolve().parent / "data" / "ect"
NETS = ("ddpmpp_cond", "ncsnpp_uncond_aug9")
FLAGS = {  # the cases.json networks as our flags
    "ddpmpp_cond": dict(arch="ddpmpp", channel_mult="1,2", attention_resolutions="16", class_cond=True),
    "ncsnpp_uncond_aug9": dict(arch="ncsnpp", channel_mult="1,1,1", attention_resolutions="8", augment_dim=9),
}


def ect_weights(name):
    """The golden state_dict (the README's int4 decoder + fixed buffers), ``model.`` prefix stripped."""
    blob = torch.load(DATA / f"weights_{name}.pt", weights_only=True)
    sd = dict(decode_weights(blob), **blob["fixed_buffers"])
    return {k.removeprefix("model."): v for k, v in sd.items()}


@pytest.fixture(scope="module")
def golden():
    load = lambda name: torch.load(DATA / name, weights_only=True)  # noqa: E731
    return load("inputs.pt"), load("expected.pt"), json.loads((DATA / "cases.json").read_text())


def ect_net(name):
    """Network + denoiser built as cm_train.py builds an ECT run (its row's scalings and σ_min)."""
    row = recipes.precond_row("ect")
    kw = dict(model_and_diffusion_defaults(), image_size=16, num_channels=16, num_res_blocks=1, dropout=0.0,
              sigma_min=row["sigma_min"], distillation=row["sample_scalings"] == "boundary",
              train_scalings=row["train_scalings"], **FLAGS[name])
    model, diffusion = create_model_and_diffusion(**kw)
    model.load_state_dict(ect_weights(name), strict=True)
    return model, diffusion


def labels_kw(labels, name):
    return {"y": labels} if FLAGS[name].get("class_cond") else {}


def max_abs(a, b):
    return (a.double() - b.double()).abs().max().item()


def test_the_ect_row_is_what_ect_computes():
    row = recipes.precond_row("ect")
    assert (row["train_scalings"], row["sample_scalings"], row["sigma_min"]) == ("edm", "boundary", 0.003)
    assert (row["fewstep"], row["quantize"]) == ("ect", "round")
    for mode in ("consistency_distillation", "consistency_training", "ict"):
        assert recipes.precond_row(mode)["train_scalings"] == "boundary" and recipes.precond_row(mode)["fewstep"] == "cm"


@pytest.mark.parametrize("name", NETS)
def test_denoiser_in_sampling_and_training_mode(golden, name):
    inp, exp, _ = golden
    model, diffusion = ect_net(name)
    f = inp["forward"]
    kw = labels_kw(f["labels"], name)
    with torch.no_grad():
        raw, d_eval = diffusion.denoise(model, f["x"], f["sigma"], **kw)
        d_train = diffusion.train_denoiser(model, kw)(f["x"], f["sigma"])
    assert max_abs(raw, exp[name]["raw"]) < 1e-4
    assert max_abs(d_eval, exp[name]["eval"]) < 1e-4
    assert max_abs(d_train, exp[name]["train"]) < 1e-4
    at_min = f["sigma"] == 0.003
    assert torch.equal(d_eval[at_min], f["x"][at_min])  # boundary condition at ECT's σ_min 0.003
    # the mistake this guards against: training with the boundary-condition scalings
    c_skip, c_out, c_in = (v[:, None, None, None] for v in scalings("boundary", f["sigma"], sigma_min=0.003))
    with torch.no_grad():
        wrong = c_skip * f["x"] + c_out * model(c_in * f["x"], c_noise(f["sigma"]), **kw)
    assert max_abs(wrong, exp[name]["train"]) > 1e-3


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("case", ["stage0_c0", "stage0_c0.05", "stage2_c0", "stage2_c0.05"])
def test_per_sample_loss_target_and_gradients(golden, name, case):
    inp, exp, _ = golden
    e = exp[name]["loss"][case]
    stage, c = int(case[5]), float(case.split("_c")[1])
    model, diffusion = ect_net(name)
    model.train()
    ld = inp["loss"]
    kw = labels_kw(ld["labels"], name)
    t = e["t"]
    r = recipes.ect_r(t, stage, q=2.0)
    assert (r - e["r"]).abs().max().item() <= 1e-6 * t.max().item()
    seen = {}

    def denoise(x, sigma):
        out = diffusion.train_denoiser(model, kw)(x, sigma)
        seen.setdefault("D_t" if torch.is_grad_enabled() else "D_r", out)
        return out

    loss = ect_loss(denoise, ld["x0"], t, r, ld["eps"], c)
    # rtol 1e-5 (the golden README's); atol 1e-6 for the smallest per-sample losses (0.011 of up to 47), whose
    # float32 rounding reached 1.06e-5 relative on another CPU (its oneDNN kernels; the old code alike)
    torch.testing.assert_close(loss, e["loss"], rtol=1e-5, atol=1e-6)
    assert max_abs(seen["D_t"], exp[name]["loss_D_t"]) < 1e-4
    model.zero_grad()
    loss.mean().backward()
    params = dict(model.named_parameters())
    for key, g in e["grads"].items():
        ours = params[key.removeprefix("model.")].grad
        assert max_abs(ours, g) / g.abs().max().item() <= 1e-4, key
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)).item()
    assert norm == pytest.approx(e["grad_norm"], rel=1e-4)
    # the target as used: D_r where r > 0, x0 where r = 0 (ECT's stored loss_target)
    target = torch.where((r > 0)[:, None, None, None], seen["D_r"], ld["x0"]) if "D_r" in seen else ld["x0"]
    assert max_abs(target, exp[name][f"loss_target_stage{stage}"]) < 1e-4


class StoredNoise:
    """The golden's noise as the sampler draws it: x_T from randn, then randn_like."""

    def __init__(self, *draws):
        self.draws = list(draws)

    def randn(self, *shape, device=None):
        return self.draws.pop(0).reshape(shape).to(device)

    def randn_like(self, x):
        return self.draws.pop(0).to(x)


@pytest.mark.parametrize("name", NETS)
def test_one_and_two_step_generation(golden, name):
    inp, exp, _ = golden
    model, diffusion = ect_net(name)
    model.eval()
    s = inp["sample"]
    kw = labels_kw(s["labels"], name)
    levels = {"onestep": [s["t_max"]], "twostep": [s["t_max"], s["mid_t"]]}
    for key, sigmas in levels.items():
        want = exp[name]["sample"][key]
        denoise = lambda x, sigma: diffusion.denoise(model, x, sigma, **kw)[1]  # noqa: E731
        x = sample_ect_fewstep(denoise, s["z0"] * float(sigmas[0]), [float(v) for v in sigmas], StoredNoise(s["z1"]))
        assert max_abs(x, want) < 1e-4, key  # unclamped, as ECT
        # image_sample's path: karras_sample with the row's few-step sampler, uint8 with the row's quantize
        row = recipes.precond_row("ect")
        x = karras_sample(diffusion, model, tuple(s["z0"].shape), steps=40, sampler="multistep", model_kwargs=kw,
                          sigma_min=row["sigma_min"], sigmas=sigmas, fewstep=row["fewstep"],
                          generator=StoredNoise(s["z0"], s["z1"]))
        ours = to_uint8(x, row["quantize"]).permute(0, 3, 1, 2)
        assert (ours.int() - exp[name]["sample"][f"{key}_uint8"].int()).abs().max().item() <= 1
        assert (to_uint8(x, "truncate").double().mean() - ours.double().mean()).item() < -0.3  # truncation darkens


def test_cm_few_step_sampler_differs_where_ect_does_not_clamp(golden):
    inp, exp, _ = golden
    model, diffusion = ect_net("ddpmpp_cond")
    s = inp["sample"]
    kw = labels_kw(s["labels"], "ddpmpp_cond")
    x = karras_sample(diffusion, model, tuple(s["z0"].shape), steps=40, sampler="multistep", model_kwargs=kw,
                      sigma_min=0.003, sigmas=[80.0, s["mid_t"]], fewstep="cm",
                      generator=StoredNoise(s["z0"], s["z1"]))
    assert max_abs(x, exp["ddpmpp_cond"]["sample"]["twostep"].clamp(-1, 1)) > 1e-2
