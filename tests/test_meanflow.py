"""MeanFlow: NVIDIA FastGen's own numbers (cases mf_l2, mf_sample of tests/data/fastgen), the closed
form of Gaussian data, the separate-pass JVP against torch.func.jvp, the time sampler and bad input."""

import json
import math
from pathlib import Path

import pytest
import torch

from cm.jvp import fork_rng
from cm.meanflow import (
    TIME_PRESETS,
    du_dt_fd,
    du_dt_jvp,
    flow_path,
    meanflow_loss,
    meanflow_sample,
    parse_flow_times,
    sample_t_r,
    tangent_warmup,
    velocity,
)
from cm.random_util import get_generator
from cm.samplers import sample_meanflow
from cm.song_unet import ARCH_CONFIGS, SongUNet
from song_helpers import one_thread  # noqa: F401  (autouse fixture: one thread)

DATA = Path(__file__).resolve().parent / "data" / "fastgen"


@pytest.fixture(scope="module")
def golden():
    cases = json.loads((DATA / "cases.json").read_text())
    load = lambda name: torch.load(DATA / f"{name}.pt", weights_only=True)  # noqa: E731
    return cases, load("weights"), load("inputs"), load("expected")


def mf_net(cases, weights):
    """FastGen's mf_a (SongUNet with r_timestep) as our two-time SongUNet, its weights loaded strictly."""
    kw = cases["networks"]["mf_a"]["edm_kwargs"]
    net = SongUNet(
        img_resolution=kw["img_resolution"], model_channels=kw["model_channels"], channel_mult=kw["channel_mult"],
        num_blocks=kw["num_blocks"], attn_resolutions=kw["attn_resolutions"], dropout=0.0, time_inputs=2,
        **ARCH_CONFIGS["ddpmpp"],
    )  # fmt: skip
    # FastGen's log-variance head (sCM only) is not part of the MeanFlow network
    state = {k[len("model.") :]: v.float() for k, v in weights["mf_a"].items() if "logvar_linear" not in k}
    net.load_state_dict(state, strict=True)
    return net


def max_err(got, want):
    return float((got.detach().double() - want.double()).abs().max())


def test_mf_l2_reproduces_fastgen(golden):
    cases, weights, inputs, expected = golden
    case, inp, exp = cases["cases"]["mf_l2"], inputs["mf_l2"], expected["mf_l2"]
    tol = case["tolerance"]
    net = mf_net(cases, weights).train()
    warm = tangent_warmup(inp["iteration"], case["fastgen"]["model_config"]["loss_config"]["tangent_warmup_steps"])
    assert warm == float(exp["warmup_weight"])
    out = meanflow_loss(velocity(net), inp["x0"], inp["e"], inp["t"], inp["r"], warmup=warm)
    for key in ("x_t", "v", "u", "du_dt", "target"):
        assert max_err(out[key], exp[key]) <= tol[key], key
    for key in ("loss", "weight"):
        assert max_err(out[key], exp[key]) <= tol[f"{key}_rel"] * float(exp[key].abs().max()), key
    assert max_err(out["v_loss"], exp["v_loss"]) <= 1e-4 * float(exp["v_loss"].abs().max())
    total = out["loss"].mean()
    assert abs(float(total) - float(exp["total_loss"])) <= tol["loss_rel"] * abs(float(exp["total_loss"]))
    grad_u = torch.autograd.grad(out["loss"].sum(), out["u"], retain_graph=True)[0]
    assert max_err(grad_u, exp["grad_u"]) <= tol["grad_u_rel"] * float(exp["grad_u"].abs().max())
    total.backward()
    params = dict(net.named_parameters())
    for name, want in exp["param_grads"].items():
        got = params[name[len("model.") :]].grad
        assert max_err(got, want) <= tol["param_grad_rel"] * float(want.abs().max()), name


def test_mf_sample_reproduces_fastgen_one_and_two_steps(golden):
    cases, weights, inputs, expected = golden
    tol, noise, exp = cases["cases"]["mf_sample"]["tolerance"], inputs["mf_sample"]["noise"], expected["mf_sample"]
    net = mf_net(cases, weights).eval()
    u = velocity(net)
    one_step = exp["t_list_1step"].tolist()
    assert one_step == pytest.approx([0.999, 0.0])
    assert max_err(sample_meanflow(u, 0.999 * noise, one_step), exp["sample_1step"]) <= tol["sample_1step"]
    assert max_err(sample_meanflow(u, 0.999 * noise, [0.999, 0.5, 0.0]), exp["sample_2step"]) <= tol["sample_2step"]


# ----------------------------------------------------------------------------
# Gaussian data: x0 ~ N(0, s²I), e ~ N(0, I). x_t ~ N(0, a_t²), a_t² = (1−t)²s² + t²; the flow is
# linear, x_r = (a_r/a_t)·x_t along the ODE, so u(x, t, r) = (x − x_r)/(t − r) = x·(1 − a_r/a_t)/(t − r),
# and at r = t the velocity v(x, t) = x·(d a_t/dt)/a_t = x·(t − (1−t)s²)/a_t².

S = 0.5


def a_of(t):
    return torch.sqrt((1 - t) ** 2 * S**2 + t**2)


def exact_u(x, t, r):
    t, r = t.double(), r.double()
    at, ar = a_of(t), a_of(r)
    same = (t - r).abs() < 1e-12
    coef = torch.where(same, (t - (1 - t) * S**2) / at**2, (1 - ar / at) / torch.where(same, 1.0, t - r))
    return (x.double() * coef.reshape(-1, *[1] * (x.ndim - 1))).to(x.dtype)


def v_marginal(x, t):
    return x * ((t - (1 - t) * S**2) / a_of(t) ** 2).reshape(-1, *[1] * (x.ndim - 1))


def test_exact_average_velocity_is_its_own_target_with_zero_unweighted_loss():
    g = torch.Generator().manual_seed(0)
    n = 64
    t, r = sample_t_r(n, **TIME_PRESETS["fastgen"], generator=g)
    x_t = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64) * a_of(t).reshape(-1, 1, 1, 1)
    # the pair (x0, e) on the straight line through x_t with the marginal velocity: e − x0 = v(x_t, t)
    vm = v_marginal(x_t, t)
    x0, e = x_t - t.reshape(-1, 1, 1, 1) * vm, x_t + (1 - t).reshape(-1, 1, 1, 1) * vm
    for jvp, tol in (("ad", 1e-20), ("fd", 1e-12)):
        out = meanflow_loss(exact_u, x0, e, t, r, jvp=jvp)
        assert torch.allclose(out["x_t"], x_t, atol=1e-12)
        sq = ((out["u"] - out["target"]) ** 2).flatten(1).sum(1)
        assert float(sq.max()) < tol, jvp
        assert torch.allclose(out["weight"], torch.full_like(sq, 1e-3) ** -0.75)
    # a wrong u (the instantaneous velocity, right only at r = t) is not its own target
    wrong = meanflow_loss(lambda x, tt, rr: v_marginal(x, tt), x0, e, t, r)
    assert float(((wrong["u"] - wrong["target"]) ** 2).flatten(1).sum(1).max()) > 1e-3


def test_exact_average_velocity_is_the_mean_target_of_random_pairs():
    """With independent x0 and e the target is noisy, but its regression on x_t is u's coefficient."""
    g = torch.Generator().manual_seed(5)
    n = 20000
    for tv, rv in ((0.9, 0.2), (0.5, 0.0), (0.3, 0.3)):
        t, r = torch.full((n,), tv, dtype=torch.float64), torch.full((n,), rv, dtype=torch.float64)
        x0, e = S * torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64), torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
        out = meanflow_loss(exact_u, x0, e, t, r)
        slope = float((out["target"] * out["x_t"]).mean() / (out["x_t"] ** 2).mean())
        want = float(exact_u(torch.ones(1, 1, 1, 1, dtype=torch.float64), t[:1], r[:1]))
        assert slope == pytest.approx(want, abs=0.03), (tv, rv)


def exact_network(x, timesteps, r_timesteps):
    """The exact u as a two-time network is called (times in the networks' timesteps units)."""
    return exact_u(x, timesteps / 1000, r_timesteps / 1000)


def test_exact_velocity_one_step_maps_noise_onto_the_data_distribution():
    gen = get_generator("determ", 4000, seed=1)
    x = meanflow_sample(exact_network, (4000, 1, 2, 2), [0.999, 0.0], gen)
    # sample = (a_0/a_0.999)·0.999·e: exactly N(0, s²) up to FastGen's latent 0.999·e standing for x_0.999
    assert abs(float(x.mean())) < 3 * S / math.sqrt(x.numel())
    assert float(x.std()) == pytest.approx(S * 0.999 / float(a_of(torch.tensor(0.999, dtype=torch.float64))), rel=0.03)
    two = meanflow_sample(exact_network, (4000, 1, 2, 2), [0.999, 0.5, 0.0], get_generator("determ", 4000, seed=2))
    assert float(two.std()) == pytest.approx(float(x.std()), rel=0.05)


# ----------------------------------------------------------------------------
# the JVP


def tiny_mf_net(dropout):
    torch.manual_seed(0)
    net = SongUNet(8, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=dropout,
                   time_inputs=2, **ARCH_CONFIGS["ddpmpp"])  # fmt: skip
    for p in net.parameters():  # EDM zero-initialises some layers: give every path a signal
        p.data.normal_(0, 0.2)
    return net.train()


def test_separate_pass_jvp_matches_torch_func_joint_output_with_dropout():
    net = tiny_mf_net(dropout=0.5)
    u = velocity(net)
    g = torch.Generator().manual_seed(1)
    x0, e = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([0.9, 0.4, 0.7], dtype=torch.float64)
    r = torch.tensor([0.1, 0.4, 0.0], dtype=torch.float64)
    torch.manual_seed(7)
    out = meanflow_loss(u, x0, e, t, r)
    torch.manual_seed(7)  # the joint JVP from the same RNG state: the same dropout mask
    x_t, v = flow_path(x0, e, t)
    value, tangent = torch.func.jvp(lambda x, tt: u(x, tt, r), (x_t, t), (v, torch.ones_like(t)))
    assert torch.allclose(out["u"], value, atol=1e-6) and torch.allclose(out["du_dt"], tangent, atol=1e-5)
    assert out["u"].requires_grad and not out["du_dt"].requires_grad
    torch.manual_seed(8)  # another mask gives another u: the check above can fail
    assert not torch.allclose(u(x_t, t, r), value, atol=1e-3)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_finite_difference_tangent_is_close_to_the_jvp(dropout):
    """Both under one dropout mask (with dropout on, each FD call restores the RNG state)."""
    net = tiny_mf_net(dropout=dropout)
    u = velocity(net)
    rng = fork_rng("cpu")
    g = torch.Generator().manual_seed(2)
    x_t, v = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0.5, 0.99989, 0.00005, 0.3], dtype=torch.float64)  # central, backward, forward, central
    r = torch.tensor([0.1, 0.2, 0.0, 0.29995], dtype=torch.float64)  # the last: t − ε ≤ r, forward
    _, ad = du_dt_jvp(u, x_t, t, r, v, rng=rng)
    _, fd = du_dt_fd(u, x_t, t, r, v, rng=rng)
    assert max_err(fd, ad) < 0.05 * float(ad.abs().max())


# ----------------------------------------------------------------------------
# times


def test_time_sampler_presets_sorted_equal_fraction_and_batch_independent():
    for name, preset in TIME_PRESETS.items():
        t, r = sample_t_r(20000, **preset, generator=torch.Generator().manual_seed(3))
        assert t.dtype == torch.float64 and bool((r <= t).all()) and bool((r >= 0).all()) and bool((t <= 0.999).all())
        assert float((r == t).double().mean()) == pytest.approx(0.25, abs=0.015), name
    fast = TIME_PRESETS["fastgen"]
    t, r = sample_t_r(20000, **{**fast, "equal_fraction": 0.0}, generator=torch.Generator().manual_seed(4))
    # the larger of σ(N(−0.6, 1.6²)) and σ(N(−4, 1.6²)) is almost always the t draw: median ≈ σ(−0.6)
    assert float(t.median()) == pytest.approx(0.999 * 1 / (1 + math.exp(0.6)), abs=0.02)
    assert float(r.median()) == pytest.approx(0.999 * 1 / (1 + math.exp(4.0)), abs=0.01)


def test_bad_times_and_flow_times_are_one_line_errors():
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="r <= t"):
        meanflow_loss(exact_u, x, x, torch.tensor([0.5, 0.5]).double(), torch.tensor([0.2, 0.6]).double())
    with pytest.raises(ValueError, match=r"\[0, 0.999\]"):
        meanflow_loss(exact_u, x, x, torch.tensor([1.0, 0.5]).double(), torch.tensor([0.2, 0.1]).double())
    assert parse_flow_times("0.999,0") == [0.999, 0.0] and parse_flow_times("0.999, 0.5, 0") == [0.999, 0.5, 0.0]
    for bad, msg in [("0.999", "at least two"), ("0.5,0.999", "decreasing"), ("0.999,0.999", "decreasing"),
                     ("1.0,0", "[0, 0.999]"), ("0.9,-0.1", "[0, 0.999]"), ("0.9,a", "comma list")]:  # fmt: skip
        with pytest.raises(ValueError) as err:
            parse_flow_times(bad)
        assert msg in str(err.value) and "\n" not in str(err.value) and "--flow_times" in str(err.value)
