"""EDM's DDPM++ / NCSN++ network against numbers from EDM's own code (tests/data/edm/)."""

import json

import pytest
import torch

from cm.karras_diffusion import KarrasDenoiser
from cm.song_unet import SongUNet, song_unet_from_flags
from song_helpers import EDM, one_thread  # noqa: F401  (autouse fixture)
CASES = json.loads((EDM / "cases.json").read_text())
SMALL = ["ddpmpp_cond_small", "ncsnpp_uncond_small"]
FULL = ["ddpmpp_cond_cifar10", "ddpmpp_uncond_cifar10", "ncsnpp_uncond_cifar10"]


def edm_kwargs(name):
    """SongUNet keyword arguments from an EDM constructor config of cases.json."""
    cfg = dict(CASES[name]["edm_config"])
    assert cfg.pop("model_type") == "SongUNet"
    channels = cfg.pop("img_channels")
    cfg.setdefault("num_blocks", 4)
    cfg.setdefault("attn_resolutions", [16])
    return dict(cfg, in_channels=channels, out_channels=channels)


def golden_model(name):
    sd = torch.load(EDM / f"weights_{name}.pt", weights_only=True)
    model = SongUNet(**edm_kwargs(name)).eval()
    model.load_state_dict({k[len("model."):]: v.float() for k, v in sd.items()}, strict=True)
    return model


@pytest.mark.parametrize("name", SMALL)
def test_small_cases_reproduce_edm_through_karras_denoiser(name):
    model = golden_model(name)
    inp = torch.load(EDM / "inputs.pt", weights_only=True)[name]
    exp = torch.load(EDM / "expected.pt", weights_only=True)[name]
    tol = CASES[name]["tolerance"]
    kwargs = {} if inp["labels"] is None else {"y": inp["labels"]}
    with torch.no_grad():
        raw, denoised = KarrasDenoiser(sigma_data=0.5).denoise(model, inp["x"], inp["sigma"], **kwargs)
    assert (raw - exp["raw"]).abs().max().item() < tol["raw_max_abs"]
    assert (denoised - exp["denoised"]).abs().max().item() < tol["denoised_max_abs"]


def read_manifest(name):
    rows = {}
    for line in (EDM / CASES[name]["manifest"]).read_text().splitlines():
        key, shape, _dtype = line.split("\t")
        rows[key[len("model."):]] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return rows


@pytest.mark.parametrize("name", FULL)
def test_full_cifar10_configs_match_manifest(name):
    with torch.device("meta"):
        model = SongUNet(**edm_kwargs(name))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == read_manifest(name)
    assert sum(p.numel() for p in model.parameters()) == CASES[name]["params"]


def test_from_flags_builds_published_ddpmpp_config():
    with torch.device("meta"):
        model = song_unet_from_flags(
            "ddpmpp", 32, 128, (2, 2, 2), 4, (16,), dropout=0.13, class_cond=True, augment_dim=9
        )
    assert sum(p.numel() for p in model.parameters()) == CASES["ddpmpp_cond_cifar10"]["params"]
    with pytest.raises(ValueError, match="--arch"):
        song_unet_from_flags("bogus", 32)


def test_qkv_channel_layout_is_channel_major():
    """Permuting qkv outputs to the (3, C) layout must change the result (the layout matters)."""
    model = golden_model("ddpmpp_cond_small")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([0.0, 300.0]), torch.tensor([1, 7])
    with torch.no_grad():
        ref = model(x, t, y)
        qkv = model.enc["8x8_block0"].qkv
        c = qkv.weight.shape[1]
        perm = torch.arange(3 * c).reshape(c, 3).t().reshape(-1)  # our channel 3c+i <- their i*C+c
        qkv.weight.copy_(qkv.weight[perm])
        qkv.bias.copy_(qkv.bias[perm])
        assert (model(x, t, y) - ref).abs().max() > 1e-4


def test_labels_dropout_augment_and_errors():
    model = SongUNet(8, label_dim=10, augment_dim=9, model_channels=8, channel_mult=(1,), num_blocks=1,
                     attn_resolutions=(), dropout=0.0, label_dropout=1.0)
    x, t = torch.randn(2, 3, 8, 8), torch.zeros(2)
    y = torch.tensor([3, 5])
    onehot = model.one_hot(y, 2, "cpu")
    assert torch.equal(onehot, torch.nn.functional.one_hot(y, 10).float())
    assert torch.equal(model.one_hot(None, 2, "cpu"), torch.zeros(2, 10))  # EDM's default: zero labels
    with torch.no_grad():
        model.eval()
        cond = model.embed(t, onehot)
        assert (cond - model.embed(t, torch.zeros(2, 10))).abs().max() > 1e-3
        assert (cond - model.embed(t, onehot, torch.ones(2, 9))).abs().max() > 1e-3
        assert torch.equal(model(x, t * 1000, y), model(x, t * 1000, onehot))
        model.train()  # label_dropout 1: every label vector zeroed
        assert torch.equal(model.embed(t, onehot), model.embed(t, torch.zeros(2, 10)))
    with pytest.raises(ValueError, match="y must have shape"):
        model(x, t, torch.tensor([1, 2, 3]))
    uncond = SongUNet(8, model_channels=8, channel_mult=(1,), num_blocks=1, attn_resolutions=())
    with pytest.raises(ValueError, match="class-conditional"):
        uncond(x, t, y)


@pytest.mark.parametrize("name", SMALL)
def test_heun18_reproduces_edm_sampler(name):
    """EDM's 18-step Heun (35 NFE) through our sampler, clipping off, from latents·80."""
    from cm.random_util import get_generator
    from cm.samplers import sample_heun
    from cm.schedules import get_sigmas_karras

    model = golden_model(name)
    inp = torch.load(EDM / "inputs.pt", weights_only=True)[f"{name}_heun18"]
    exp = torch.load(EDM / "expected.pt", weights_only=True)[f"{name}_heun18"]
    diffusion = KarrasDenoiser(sigma_data=0.5)
    kwargs = {} if inp["labels"] is None else {"y": inp["labels"]}
    sigmas = get_sigmas_karras(18, 0.002, 80.0, 7.0).double()
    with torch.no_grad():
        samples = sample_heun(
            lambda x, s: diffusion.denoise(model, x, s, **kwargs)[1],
            inp["latents"].double() * 80,
            sigmas,
            get_generator("dummy"),
        )
    assert (samples - exp["samples"].double()).abs().max().item() < CASES[name]["tolerance"]["heun18_max_abs"]
