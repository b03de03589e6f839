"""DMD2 losses: closed forms on Gaussian data, feature taps, discriminator heads, batch size 1."""

import pytest
import torch

from cm import dmd2
from cm.dmd2_heads import build_discriminator, conv_head, feature_shapes
from cm.song_unet import SongUNet
from cm.unet import UNetModel


def gaussian_denoiser(mean, s):
    """Exact denoiser of data N(mean, s²·I): D(x, σ) = mean + s²/(s² + σ²)·(x − mean)."""

    def score(x, sigma, y=None, features=False):
        k = (s**2 / (s**2 + sigma.to(x.dtype) ** 2)).reshape(-1, 1, 1, 1)
        return mean + k * (x - mean)

    return score


def test_dm_gradient_zero_when_fake_equals_real():
    g = torch.Generator().manual_seed(0)
    x = (0.3 + 0.5 * torch.randn(6, 3, 4, 4, generator=g)).requires_grad_(True)
    sigma, eps = dmd2.draw_dm(x, dmd2.dmd_sigmas(40), 0, 40, g)
    real = gaussian_denoiser(0.3, 0.5)
    res = dmd2.dm_loss(real, gaussian_denoiser(0.3, 0.5), x, sigma, eps)
    res["loss"].mean().backward()
    assert torch.count_nonzero(x.grad) == 0 and torch.count_nonzero(res["loss"]) == 0


@pytest.mark.parametrize("shift", [0.4, -0.25])
def test_generator_update_moves_mean_toward_data(shift):
    """Data N(μ, s²); generator G(z) = b + s·z with b = μ + shift; fake = exact denoiser of N(b, s²).

    D_f − D_r = (b − μ)·σ²/(s² + σ²), so ∂loss/∂b = mean_i (b − μ)·σ_i²/((s² + σ_i²)·w_i) > 0
    when b > μ: a descent step moves b toward μ.
    """
    mu, s = 0.1, 0.5
    b = torch.tensor(mu + shift, requires_grad=True)

    def gen(x, sigma, y=None):
        return b + s * x / 80.0

    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 3, 4, 4, generator=g)
    opts = dmd2.DMD2Options()
    out = dmd2.generator_turn(gen, gaussian_denoiser(mu, s), gaussian_denoiser(b.detach(), s), z, None, opts,
                              generator=g)
    out["loss"].mean().backward()
    dm = out["dm"]
    g2 = torch.Generator().manual_seed(1)
    torch.randn(8, 3, 4, 4, generator=g2)  # z
    sig, _ = dmd2.draw_dm(out["x_g"], opts.sigmas("cpu"), 0, 40, g2)
    expected = (shift * sig**2 / ((s**2 + sig**2) * dm["weight"])).mean()
    assert torch.sign(b.grad) == torch.sign(torch.tensor(shift))
    assert float(b.grad) == pytest.approx(float(expected), rel=1e-5)
    before = abs(float(b.detach()) - mu)
    with torch.no_grad():
        b -= 0.01 * b.grad
    assert abs(float(b.detach()) - mu) < before


def small_adm(**kw):
    base = dict(image_size=16, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
                attention_resolutions=(2,), dropout=0.0, channel_mult=(1, 1, 1), num_classes=10,
                num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True)
    return UNetModel(**{**base, **kw})


def small_song():
    return SongUNet(img_resolution=16, label_dim=10, model_channels=8, channel_mult=(1, 2), num_blocks=2,
                    attn_resolutions=(8,), dropout=0.0)


@pytest.mark.parametrize("make", [small_adm, small_song])
def test_feature_taps_leave_output_and_keys(make):
    torch.manual_seed(0)
    net = make().eval()
    keys = list(net.state_dict())
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10.0, -200.0]), torch.tensor([1, 7])
    with torch.no_grad():
        out = net(x, t, y)
        out2, feats = net(x, t, y, return_features=True)
    assert torch.equal(out, out2) and list(net.state_dict()) == keys
    levels = 3 if make is small_adm else 2
    assert [f.shape[-1] for f in feats] == [16 >> i for i in range(levels)]


def test_bottleneck_head_trains_the_encoder_only():
    torch.manual_seed(0)
    fake = small_adm()
    assert feature_shapes(fake, 16, num_classes=10) == [(32, 16), (32, 8), (32, 4)]
    disc = build_discriminator("bottleneck", fake, 16, num_classes=10)
    score = dmd2.scorer(fake)
    sigma = torch.full((3,), 0.5)
    logits = disc(score(torch.randn(3, 3, 16, 16), sigma, torch.tensor([0, 1, 2]), features=True)[2])
    assert logits.shape == (3, 1)
    dmd2.gan_discriminator_loss(logits, -logits).mean().backward()
    # the last encoder block's output conv (its input convs see none: that conv starts at zero)
    assert fake.input_blocks[-1][0].out_layers[-1].weight.grad.abs().sum() > 0
    assert fake.out[2].weight.grad is None and fake.middle_block[0].in_layers[2].weight.grad is None


def test_conv_head_shapes():
    for res, convs in [(16, 4), (8, 3), (4, 2), (2, 2), (5, 2)]:
        head = conv_head(12, res)
        assert head(torch.randn(2, 12, res, res)).shape == (2, 1, 1, 1)
        assert sum(isinstance(m, torch.nn.Conv2d) for m in head) == convs


@pytest.mark.parametrize("variant", ["seed", "fastgen"])
def test_turns_with_batch_size_one(variant):
    torch.manual_seed(0)
    teacher, fake, gen = small_adm(), small_adm(), small_adm()
    opts = dmd2.DMD2Options(gan_max_step=10, **dmd2.variant_defaults(variant))
    disc = build_discriminator(opts.gan_placement, teacher if variant == "fastgen" else fake, 16,
                               num_classes=10)
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(1, 3, 16, 16), torch.tensor([4])
    out = dmd2.generator_turn(dmd2.scorer(gen, "cm"), dmd2.scorer(teacher), dmd2.scorer(fake), z, y, opts,
                              disc=disc, generator=g)
    out["loss"].mean().backward()
    assert out["loss"].shape == (1,) and torch.isfinite(out["loss"]).all()
    crit = dmd2.critic_turn(dmd2.scorer(teacher), dmd2.scorer(fake), out["x_g"], y, opts, disc=disc,
                            real_images=torch.rand(1, 3, 16, 16) * 2 - 1, real_labels=torch.tensor([2]),
                            generator=g)
    crit["loss"].mean().backward()
    assert crit["loss"].shape == (1,) and crit["gan_disc"].shape == (1,)


def test_nan_to_num_keeps_infinite_grad_finite():
    x = torch.zeros(1, 1, 2, 2, requires_grad=True)
    real = gaussian_denoiser(0.0, 1.0)  # D_real(x_t) = k·x_t
    fake = gaussian_denoiser(1.0, 1.0)
    res = dmd2.dm_loss(real, fake, x, torch.tensor([0.002]), torch.zeros(1, 1, 2, 2))  # w = 0
    assert torch.isfinite(res["grad"]).all() and float(res["grad"].max()) == torch.finfo(torch.float32).max


def test_bad_options():
    with pytest.raises(ValueError, match="--dmd_min_step"):
        dmd2.DMD2Options(min_step_pct=99.0, max_step_pct=1.0)
    with pytest.raises(ValueError, match="--gan_max_step"):
        dmd2.DMD2Options(gan_max_step=41)
    with pytest.raises(ValueError, match="--dmd_variant"):
        dmd2.variant_defaults("official")
    assert dmd2.lr_warmup(0, 500) == 0.0 and dmd2.lr_warmup(250, 500) == 0.5 and dmd2.lr_warmup(900, 500) == 1.0


def test_critic_checkpoint_round_trip_holds_its_optimiser(tmp_path):
    """The critic file (fake score, head, AdamW state, update count) reloads strictly and continues exactly."""
    from cm.checkpoint import load_model_state
    from cm.dmd2_train import DMD2Critic

    def make():
        torch.manual_seed(0)
        fake = small_adm()
        return DMD2Critic(fake, build_discriminator("bottleneck", fake, 16, num_classes=10), 10, lr=1e-3)

    def update(critic, seed):
        g = torch.Generator().manual_seed(seed)
        opts = dmd2.DMD2Options(gan_max_step=5)
        x = torch.randn(2, 3, 16, 16, generator=g)
        out = dmd2.critic_turn(None, dmd2.scorer(critic.fake), x, torch.tensor([1, 2]), opts,
                               disc=critic.discriminator, real_images=torch.randn(2, 3, 16, 16, generator=g),
                               real_labels=torch.tensor([3, 4]), generator=g)
        critic.opt.zero_grad()
        out["loss"].mean().backward()
        critic.opt.step()
        critic.updates += 1

    a = make()
    update(a, 1)
    torch.save(a.state_dict(), tmp_path / "dmd2_critic.pt")
    update(a, 2)
    b = make()
    load_model_state(b, torch.load(tmp_path / "dmd2_critic.pt", weights_only=True), "dmd2_critic.pt")
    assert b.updates == 1
    update(b, 2)
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        if torch.is_tensor(pa):
            assert torch.equal(pa, pb), k


def test_autocast_wrapper_passes_features_through():
    from cm.precision import wrap

    torch.manual_seed(0)
    net = wrap(small_adm().eval(), "bf16")
    out, feats = net(torch.randn(2, 3, 16, 16), torch.zeros(2), torch.tensor([0, 1]), return_features=True)
    assert out.dtype == torch.float32 and all(f.dtype == torch.float32 for f in feats)
