"""DMD2 losses against the seed's own numbers (tests/data/dmd2) and FastGen's (tests/data/fastgen).

Every random draw of the references is stored; the tests inject them, and also
check that our draw functions, seeded like the seed's global RNG, give the same draws.
"""

import json

import pytest
import torch

from cm import dmd2
from cm.dmd2_heads import FeatureDiscriminator, seed_head
from cm.song_unet import SongUNet
from cm.unet import UNetModel
from tests.golden import DATA, decode_weights

SEED = DATA / "dmd2"
FG = DATA / "fastgen"


def rel(got, ref):
    return float((got.detach().double() - ref.double()).abs().max() / ref.double().abs().max())


def rel_scalar(got, ref):
    return abs(float(got.detach() if torch.is_tensor(got) else got) - float(ref)) / abs(float(ref))


@pytest.fixture(scope="module")
def seed():
    g = torch.load(SEED / "golden.pt", weights_only=True)
    blobs = torch.load(SEED / "weights_unets.pt", weights_only=True)
    flags = json.loads((SEED / "cases.json").read_text())["meta"]["unet_flags"]
    nets = {}
    for name in ("teacher", "fake", "generator_cm"):
        net = UNetModel(**{**flags, "attention_resolutions": tuple(flags["attention_resolutions"]),
                           "channel_mult": tuple(flags["channel_mult"])})
        net.load_state_dict(decode_weights(blobs[name]), strict=True)
        nets[name] = net.eval()
    return g, nets


def seed_head_with_weights():
    """The seed's head filled by the README's formula (c = (i² + 7i + 13k) mod 1009 − 504)."""
    table = [(0.0, 2**-11), (0.0, 2**-12), (1.0, 2**-11), (0.0, 2**-11), (0.0, 2**-15),
             (0.0, 2**-12), (1.0, 2**-11), (0.0, 2**-11), (0.0, 2**-15), (0.0, 2**-12)]
    head = seed_head()
    with torch.no_grad():
        for k, ((key, p), (offset, step)) in enumerate(zip(head.state_dict().items(), table)):
            i = torch.arange(p.numel(), dtype=torch.int64)
            c = (i * i + 7 * i + 13 * k) % 1009 - 504
            p.copy_((offset + c.double() * step).float().reshape(p.shape))
    return head


def test_grid_is_the_seeds(seed):
    g, _ = seed
    assert torch.equal(dmd2.dmd_sigmas(40), g["karras_sigmas"])
    assert dmd2.step_range(40) == (0, 40)
    assert dmd2.step_range(1000) == (20, 981)
    assert dmd2.step_range(1000, 0.2, 99.8) == (2, 999)  # FastGen's {2, …, 998}


def test_generation_both_modes(seed):
    g, nets = seed
    inp, cases = g["inputs"], g["cases"]
    y = inp["gen_labels"]
    gen_cm = dmd2.scorer(nets["generator_cm"], "cm")
    with torch.no_grad():
        image = dmd2.generate(gen_cm, inp["z"], y)
        sigma80 = torch.full((4,), 80.0)
        _, raw, _ = gen_cm(80 * inp["z"], sigma80, y, features=True)
        bc = gen_cm(inp["x_bc"], inp["sigma_bc"], y)
        edm_init = dmd2.generate(dmd2.scorer(nets["teacher"], "edm"), inp["z"], y)
    for got, ref in [(image, cases["generate_cm"]["out"]["image"]), (raw, cases["generate_cm"]["out"]["raw"]),
                     (bc, cases["generator_bc_sigmas"]["out"]["image"]),
                     (edm_init, cases["generate_edm_init"]["out"]["image"])]:
        assert (got - ref).abs().max() < 1e-4 and rel(got, ref) < 1e-4
    assert torch.equal(bc[0], inp["x_bc"][0])  # σ = σ_min: the boundary condition gives x


def test_dm_loss(seed):
    g, nets = seed
    case, y = g["cases"]["dm_loss"], g["inputs"]["gen_labels"]
    out = case["out"]
    x = g["cases"]["generate_cm"]["out"]["image"].clone().requires_grad_(True)
    sigmas = dmd2.dmd_sigmas(40)
    torch.manual_seed(case["seed"])
    sigma, eps = dmd2.draw_dm(x, sigmas, *dmd2.step_range(40))  # the seed's global-RNG draws
    assert torch.equal(sigma, sigmas[case["draws"]["t_index"]]) and torch.equal(eps, case["draws"]["eps"])
    res = dmd2.dm_loss(dmd2.scorer(nets["teacher"]), dmd2.scorer(nets["fake"]), x, sigma, eps, y)
    loss = res["loss"].mean()
    loss.backward()
    assert rel_scalar(loss, out["loss_dm"]) < 1e-5
    assert rel(x.grad, out["grad_x"]) < 1e-4
    for key, ref in [("D_real", out["D_real"]), ("D_fake", out["D_fake"]), ("weight", out["weight_factor"])]:
        assert rel(res[key], ref) < 1e-4, key
    assert torch.equal(sigma, out["sigma"])
    assert rel_scalar(res["grad"].norm(), out["dmtrain_gradient_norm"]) < 1e-4
    # the surrogate's image gradient is grad / (B·C·H·W)
    assert rel(x.grad, res["grad"] / x.numel()) < 1e-5


def test_fake_score_loss(seed):
    g, nets = seed
    case, y = g["cases"]["fake_loss"], g["inputs"]["gen_labels"]
    out = case["out"]
    fake = UNetModel(**{**json.loads((SEED / "cases.json").read_text())["meta"]["unet_flags"]})
    fake.load_state_dict(nets["fake"].state_dict())
    x = g["cases"]["generate_cm"]["out"]["image"]
    torch.manual_seed(case["seed"])
    sigma, eps = dmd2.draw_fake(x, dmd2.dmd_sigmas(40), "grid")
    assert torch.equal(eps, case["draws"]["eps"])
    assert torch.equal(sigma, dmd2.dmd_sigmas(40)[case["draws"]["t_index"]])
    res = dmd2.fake_score_loss(dmd2.scorer(fake), x, sigma, eps, y, "karras")
    loss = res["loss"].mean()
    loss.backward()
    assert rel_scalar(loss, out["loss_fake_mean"]) < 1e-5
    assert rel(res["D_fake"], out["D_fake"]) < 1e-4
    assert rel_scalar(dmd2.grad_norm(fake.parameters()), out["fake_unet_grad_norm"]) < 1e-4
    assert rel(fake.out[2].weight.grad, out["grad_out_conv_weight"]) < 1e-4
    assert rel_scalar(fake.input_blocks[0][0].weight.grad.double().norm(), out["grad_norm_input_conv"]) < 1e-4


def test_seed_head_formula():
    head = seed_head_with_weights()
    spot = torch.load(SEED / "golden.pt", weights_only=True)["head_spot"]
    assert sum(p.numel() for p in head.parameters()) == 9_490_945
    for key, p in head.state_dict().items():
        assert p.flatten()[:3].tolist() == spot[key]["first"]
        assert float(p.double().sum()) == pytest.approx(spot[key]["sum"], rel=1e-12)


@pytest.mark.parametrize("dg", ["clean", "dg40"])
def test_gan_terms_raw_output_reading(seed, dg):
    """The seed's GAN (head on the fake score's raw F, reading (a) of DMD2.md §6)."""
    g, nets = seed
    inp, cases = g["inputs"], g["cases"]
    sigmas, max_step = dmd2.dmd_sigmas(40), (40 if dg == "dg40" else 0)
    flags = json.loads((SEED / "cases.json").read_text())["meta"]["unet_flags"]
    fake = UNetModel(**flags)
    fake.load_state_dict(nets["fake"].state_dict())
    head = seed_head_with_weights()
    fake_score = dmd2.scorer(fake)

    def logits(img, y, s, e):
        return head(fake_score(dmd2.noised(img, s, e), s, y, features=True)[1]).reshape(-1, 1)

    # generator term: the guidance module frozen, the gradient reaches x_g only
    case = cases[f"gen_cls_{dg}"]
    fake.requires_grad_(False)
    head.requires_grad_(False)
    x = cases["generate_cm"]["out"]["image"].clone().requires_grad_(True)
    torch.manual_seed(case["seed"])
    s, e = dmd2.draw_gan(x, sigmas, max_step)
    if dg == "dg40":
        assert torch.equal(s, sigmas[case["draws"]["t_index"]]) and torch.equal(e, case["draws"]["eps"])
    lf = logits(x, inp["gen_labels"], s, e)
    loss = dmd2.gan_generator_loss(lf).mean()
    loss.backward()
    assert rel_scalar(loss, case["out"]["gen_cls_loss"]) < 1e-5
    assert (lf[:, 0] - case["out"]["logits_fake"]).abs().max() < 1e-4
    assert rel(x.grad, case["out"]["grad_x"]) < 1e-4

    # discriminator term: real first, then fake, each with its own draws
    case = cases[f"guidance_cls_{dg}"]
    fake.requires_grad_(True)
    head.requires_grad_(True)
    torch.manual_seed(case["seed"])
    s_r, e_r = dmd2.draw_gan(inp["real_images"], sigmas, max_step)
    lr = logits(inp["real_images"], inp["real_labels"], s_r, e_r)
    x_g = cases["generate_cm"]["out"]["image"]
    s_f, e_f = dmd2.draw_gan(x_g, sigmas, max_step)
    if dg == "dg40":
        d = case["draws"]
        assert torch.equal(e_r, d["real_eps"]) and torch.equal(e_f, d["fake_eps"])
        assert torch.equal(s_r, sigmas[d["real_t_index"]]) and torch.equal(s_f, sigmas[d["fake_t_index"]])
    lf = logits(x_g, inp["gen_labels"], s_f, e_f)
    loss = dmd2.gan_discriminator_loss(lf, lr).mean()
    loss.backward()
    out = case["out"]
    assert rel_scalar(loss, out["guidance_cls_loss"]) < 1e-5
    assert (lr[:, 0] - out["logits_real"]).abs().max() < 1e-4
    assert (lf[:, 0] - out["logits_fake"]).abs().max() < 1e-4
    assert rel_scalar(dmd2.grad_norm(head.parameters()), out["head_grad_norm"]) < 1e-4
    assert rel_scalar(dmd2.grad_norm(fake.parameters()), out["fake_unet_grad_norm"]) < 1e-4
    assert rel(head[6].weight.grad, out["grad_head_last_conv_weight"]) < 1e-4


# ----------------------------------------------------------------------------
# FastGen dmd2_cifar


def fastgen_net(name, cases, weights):
    kw = cases["networks"][name]["edm_kwargs"]
    net = SongUNet(
        img_resolution=kw["img_resolution"], in_channels=kw["img_channels"], out_channels=kw["img_channels"],
        label_dim=kw["label_dim"], augment_dim=kw["augment_dim"], model_channels=kw["model_channels"],
        channel_mult=tuple(kw["channel_mult"]), channel_mult_emb=kw["channel_mult_emb"],
        num_blocks=kw["num_blocks"], attn_resolutions=tuple(kw["attn_resolutions"]), dropout=kw["dropout"],
        embedding_type=kw["embedding_type"], channel_mult_noise=kw["channel_mult_noise"],
        encoder_type=kw["encoder_type"], decoder_type=kw["decoder_type"],
        resample_filter=tuple(kw["resample_filter"]),
    )
    own = net.state_dict()
    sd = {k[len("model."):]: v.float() for k, v in weights[name].items()}
    sd = {k: v for k, v in sd.items() if k in own or "logvar" not in k}  # sCM's head: unused here
    net.load_state_dict(sd, strict=True)
    return net.eval()


def test_fastgen_dmd2_cifar():
    cases = json.loads((FG / "cases.json").read_text())
    weights = torch.load(FG / "weights.pt", weights_only=True)
    inp = torch.load(FG / "inputs.pt", weights_only=True)["dmd2_cifar"]
    exp = torch.load(FG / "expected.pt", weights_only=True)["dmd2_cifar"]
    tol = cases["cases"]["dmd2_cifar"]["tolerance"]
    student, teacher, fake = (fastgen_net(f"dmd2_a_{n}", cases, weights) for n in ("student", "teacher", "fake"))
    teacher.requires_grad_(False)
    dcfg = cases["networks"]["dmd2_a_disc"]
    disc = FeatureDiscriminator([(dcfg["in_channels"], r) for r in dcfg["all_res"]], dcfg["feature_indices"])
    disc.load_state_dict({k: v.float() for k, v in weights["dmd2_a_disc"].items()}, strict=True)
    opts = dmd2.DMD2Options(num_steps=1000, min_step_pct=0.2, max_step_pct=99.8,
                            **dmd2.variant_defaults("fastgen"))
    assert opts.dm_range() == (2, 999)
    idx = cases["cases"]["dmd2_cifar"]["case"]
    sigmas = opts.sigmas("cpu")
    # the stored σ are entries of the 1000-point ascending table (float32 grid vs float64: ≤ 1e-6 rel)
    assert torch.allclose(sigmas[idx["t_idx"]].double(), inp["t"], rtol=2e-6)
    y = inp["labels"]
    gen, real, fk = dmd2.scorer(student), dmd2.scorer(teacher), dmd2.scorer(fake)

    # generator step: the critic's networks frozen (FastGen's _setup_grad_requirements(0))
    fake.requires_grad_(False)
    disc.requires_grad_(False)
    out = dmd2.generator_turn(gen, real, fk, inp["eps_student"], y, opts, disc=disc,
                              draws={"dm": (inp["t"], inp["eps"])})
    out["x_g"].retain_grad()
    dm = out["dm"]
    assert (out["x_g"] - exp["gen"]).abs().max() < tol["gen"]
    assert (dm["x_t"] - exp["x_t"]).abs().max() < tol["x_t"]
    assert (dm["D_real"] - exp["teacher_x0"]).abs().max() < tol["teacher_x0"]
    assert (dm["D_fake"] - exp["fake_x0"]).abs().max() < tol["fake_x0"]
    assert rel(1 / dm["weight"], exp["vsd_weight"]) < 1e-4
    for got, ref in zip(dm["features"], exp["teacher_features"]):
        assert (got - ref).abs().max() < 2e-4
    assert (out["logits_fake"] - exp["fake_logits"]).abs().max() < tol["fake_logits"]
    assert rel_scalar(out["loss_dm"].mean(), exp["vsd_loss"]) < tol["vsd_loss_rel"]
    assert abs(float(out["gan_gen"].mean() - exp["gan_loss_gen"])) < tol["gan_loss_gen"]
    total = out["loss"].mean()
    assert rel_scalar(total, exp["total_loss_gen"]) < tol["total_loss_gen_rel"]
    total.backward()
    assert rel(out["x_g"].grad, exp["grad_gen_total"]) < tol["grad_gen_total_rel"]
    named = dict(student.named_parameters())
    for key, ref in exp["param_grads_student"].items():
        assert rel(named[key[len("model."):]].grad, ref) < tol["param_grad_rel"], key
    # the VSD part alone: gradient G/N w.r.t. gen
    assert rel(dm["grad"] / dm["grad"].numel(), exp["grad_gen_vsd"]) < tol["grad_gen_vsd_rel"]

    # critic step: same ε_s, t, ε; its own t_real, ε_real
    fake.requires_grad_(True)
    disc.requires_grad_(True)
    with torch.no_grad():
        x_g = dmd2.generate(gen, inp["eps_student"], y)
    crit = dmd2.critic_turn(real, fk, x_g, y, opts, disc=disc, real_images=inp["real"], real_labels=y,
                            draws={"fake": (inp["t"], inp["eps"]), "gan_real": (inp["t_real"], inp["eps_real"])})
    assert rel_scalar(crit["loss_fake"].mean(), exp["fake_score_loss"]) < tol["fake_score_loss_rel"]
    assert (crit["logits_real"] - exp["real_logits"]).abs().max() < tol["real_logits"]
    assert (crit["logits_fake"] - exp["fake_logits_critic"]).abs().max() < tol["fake_logits_critic"]
    assert abs(float(crit["gan_disc"].mean() - exp["gan_loss_disc"])) < tol["gan_loss_disc"]
    crit["loss"].mean().backward()
    named = dict(fake.named_parameters())
    for key, ref in exp["param_grads_fake"].items():
        assert rel(named[key[len("model."):]].grad, ref) < tol["param_grad_rel"], key
    named = dict(disc.named_parameters())
    for key, ref in exp["param_grads_disc"].items():
        assert rel(named[key].grad, ref) < tol["param_grad_rel"], key
    assert all(p.grad is None for p in teacher.parameters())


def test_seed_head_on_the_bottleneck_crashes_ours_does_not(seed):
    """The seed's GAN path (3-channel head fed the UNet's bottleneck) fails as stored; the bottleneck head works."""
    from cm.dmd2_heads import build_discriminator

    g, nets = seed
    x, y = g["cases"]["generate_cm"]["out"]["image"], g["inputs"]["gen_labels"]
    sigma = dmd2.dmd_sigmas(40)[:1].expand(4)
    with torch.no_grad():
        feats = dmd2.scorer(nets["fake"])(x, sigma, y, features=True)[2]
        with pytest.raises(RuntimeError) as info:
            seed_head()(feats[-1])
        assert str(info.value) == g["cases"]["gan_head_crash_head"]["out"]["error"]
        disc = build_discriminator("bottleneck", nets["fake"], 32, num_classes=10)
        assert disc(feats).shape == (4, 1)
