"""sCT / sCD against NVIDIA FastGen's own sCM code (tests/data/fastgen, its README §1).

Every number goes through the functions training uses: `cm.trigflow` (F, ℓ, the
JVP and its finite-difference variant) and `cm.scm` (time, direction, target,
loss), on our SongUNet with the log-variance head attached.
"""

import json
from pathlib import Path

import pytest
import torch

from cm.checkpoint import load_model_state
from cm.scm import ScmVariant, scm_loss, scm_target, sct_direction, tangent_warmup
from cm.song_unet import ARCH_CONFIGS, SongUNet
from cm.trigflow import attach_logvar_head, logvar, trigflow_F, trigflow_fd, trigflow_jvp, trigflow_point, trigflow_time

DATA = Path(__file__).parent / "data" / "fastgen"
SCM_CASES = ["sct_paper", "sct_fastgen_default", "scd_paper", "scd_fastgen_default"]


@pytest.fixture(scope="module")
def golden():
    load = lambda name: torch.load(DATA / f"{name}.pt", weights_only=True)  # noqa: E731
    return json.loads((DATA / "cases.json").read_text()), load("weights"), load("inputs"), load("expected")


def _network(cases, weights, name):
    kw = cases["networks"][name]["edm_kwargs"]
    net = SongUNet(
        img_resolution=kw["img_resolution"], in_channels=kw["img_channels"], out_channels=kw["img_channels"],
        label_dim=kw["label_dim"], augment_dim=kw["augment_dim"], model_channels=kw["model_channels"],
        channel_mult=tuple(kw["channel_mult"]), channel_mult_emb=kw["channel_mult_emb"],
        num_blocks=kw["num_blocks"], attn_resolutions=tuple(kw["attn_resolutions"]), dropout=kw["dropout"],
        **ARCH_CONFIGS["ddpmpp"],
    )
    attach_logvar_head(net)
    load_model_state(net, {k: v.float() for k, v in weights[name].items()}, name)  # strips "model."
    return net.eval()


def _max_err(got, want):
    return float((got.detach().double() - want.double()).abs().max())


def _check(report, key, got, want, tol):
    """Record max |got − want| (relative to max |want| for *_rel tolerances) against the case's tolerance."""
    err = _max_err(got, want)
    if key.endswith("_rel"):
        err /= float(want.double().abs().max())
    report[key] = err
    assert err <= tol[key], f"{key}: {err:.3g} > {tol[key]}"


@pytest.mark.parametrize("name", SCM_CASES)
def test_scm_loss_reproduces_fastgen(golden, name):
    cases, weights, inputs, expected = golden
    case, tol = cases["cases"][name], cases["cases"][name]["tolerance"]
    inp, exp = inputs[name], expected[name]
    flags = case["case"]["flags"]
    variant = ScmVariant(flags["g_norm_spatial_invariance"], flags["divide_x_0_spatial_dim"],
                         flags["prior_weighting_enabled"])
    net = _network(cases, weights, case["case"]["net"])
    teacher_net = _network(cases, weights, case["case"]["teacher"]) if "teacher" in case["case"] else None
    t_hat = trigflow_time(inp["sigma"])
    assert _max_err(t_hat, inp["t_hat"]) < 1e-12
    r = tangent_warmup(inp["iteration"])
    assert r == pytest.approx(float(exp["r"]))

    seen = {}

    def student(x_hat, t):
        F = trigflow_F(net, x_hat, t)
        lv = logvar(net, t)
        F.retain_grad()
        lv.retain_grad()
        seen.update(F=F, logvar=lv, x_hat=x_hat)
        return F, lv

    def tangent(x_hat, t, dxdt, path, rng):
        seen["dxdt"] = dxdt
        seen["J"] = trigflow_jvp(net, x_hat, t, dxdt, rng=rng)[1]
        return seen["J"]

    teacher = None if teacher_net is None else (lambda x, t: trigflow_F(teacher_net, x, t))
    out = scm_loss(student, tangent, inp["x0"], inp["z"], t_hat, r, teacher=teacher, variant=variant)
    out["loss"].sum().backward()
    g_hat, _ = scm_target(seen["F"].detach(), seen["dxdt"], seen["x_hat"], seen["J"], t_hat, r, variant=variant)
    x0_pred = torch.cos(t_hat)[:, None, None, None] * seen["x_hat"] - 0.5 * torch.sin(t_hat)[:, None, None, None] * seen["F"]

    report = {}
    _check(report, "x_hat", seen["x_hat"], exp["x_hat"], tol)
    _check(report, "dxt_dt", seen["dxdt"], exp["dxt_dt"], tol)
    _check(report, "F", seen["F"], exp["F"], tol)
    _check(report, "F", x0_pred, exp["x0_pred"], tol)
    _check(report, "logvar", seen["logvar"], exp["logvar"], tol)
    _check(report, "F_jvp", seen["J"], exp["F_jvp"], tol)
    _check(report, "g", g_hat, exp["g"], tol)
    _check(report, "loss_unweighted_rel", out["loss_unweighted"], exp["loss_unweighted"], tol)
    _check(report, "loss", out["loss"], exp["loss"], tol)
    _check(report, "loss", out["loss"].mean(), exp["total_loss"], tol)
    _check(report, "grad_F_rel", seen["F"].grad, exp["grad_F"], tol)
    _check(report, "grad_logvar", seen["logvar"].grad, exp["grad_logvar"], tol)
    params = dict(net.named_parameters())
    batch = inp["x0"].shape[0]
    for key, want in exp["param_grads"].items():
        got = params[key.removeprefix("model.")].grad / batch  # d mean_i L_i
        err = _max_err(got, want) / float(want.double().abs().max())
        report[f"param_grad_rel {key}"] = err
        assert err <= tol["param_grad_rel"], f"{key}: {err:.3g}"
    print(name, {k: f"{v:.2g}" for k, v in report.items()})


@pytest.mark.parametrize("name", ["jvp_sct_a", "jvp_scd_a"])
def test_jvp_and_finite_differences_reproduce_fastgen(golden, name):
    cases, weights, inputs, expected = golden
    case, tol = cases["cases"][name], cases["cases"][name]["tolerance"]
    inp, exp = inputs[name], expected[name]
    net = _network(cases, weights, case["case"]["net"])
    t_hat = inp["t_hat"]
    F, J = trigflow_jvp(net, inp["x_hat"], t_hat, inp["dxt_dt"])
    # FastGen's FD variant follows the conditional path in both recipes (README §1.3)
    J_fd = trigflow_fd(net, lambda s: trigflow_point(inp["x0"], inp["z"], s), t_hat)
    errs = {k: _max_err(v, exp[k]) for k, v in (("F", F), ("F_jvp", J), ("F_jvp_fd", J_fd))}
    print(name, {k: f"{v:.2g}" for k, v in errs.items()})
    for key, err in errs.items():
        assert err <= tol[key], f"{key}: {err:.3g} > {tol[key]}"
    if name == "jvp_sct_a":  # the stored dx̂/dt̂ is sCT's direction
        assert _max_err(sct_direction(inp["x0"], inp["z"], t_hat), inp["dxt_dt"]) < 2e-5
