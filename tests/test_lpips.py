"""LPIPS-VGG16 (average pooling) with random weights: formula, gradients, weight files."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cm.metrics.lpips import (
    CONV_INDICES,
    LPIPS,
    LPIPSWeightsError,
    LPIPSWeightsMissing,
    TAP_CHANNELS,
    load_lpips,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERTER = os.path.join(REPO, "scripts", "convert_lpips_weights.py")


def fake_torchvision_vgg16(seed=0):
    """A torchvision-layout VGG16 state_dict with He-scaled random convs (tiny classifier stand-ins)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    in_ch = 3
    out_chs = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    for i, c in zip(CONV_INDICES, out_chs):
        sd[f"features.{i}.weight"] = torch.randn(c, in_ch, 3, 3, generator=g) * (2.0 / (9 * in_ch)) ** 0.5
        sd[f"features.{i}.bias"] = 0.01 * torch.randn(c, generator=g)
        in_ch = c
    for i in (0, 3, 6):  # ignored by the converter; real ones are 4096x25088 etc.
        sd[f"classifier.{i}.weight"] = torch.randn(2, 2, generator=g)
        sd[f"classifier.{i}.bias"] = torch.randn(2, generator=g)
    return sd


def fake_lpips_heads(seed=1):
    """lpips-package layout (Dropout at model.0, Conv2d at model.1), non-negative like v0.1."""
    g = torch.Generator().manual_seed(seed)
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(TAP_CHANNELS)}


def our_state(vgg, heads):
    sd = {k: v for k, v in vgg.items() if k.startswith("features.")}
    sd.update({f"lin{k}.weight": heads[f"lin{k}.model.1.weight"] for k in range(5)})
    return sd


@pytest.fixture(scope="module")
def weights():
    return fake_torchvision_vgg16(), fake_lpips_heads()


@pytest.fixture(scope="module")
def model(weights):
    m = LPIPS()
    m.load_state_dict(our_state(*weights), strict=True)
    return m


@pytest.fixture(scope="module")
def weights_file(weights, tmp_path_factory):
    d = tmp_path_factory.mktemp("lpips")
    vgg_path, lin_path, out = d / "vgg16-397923af.pth", d / "vgg.pth", d / "lpips_vgg.pt"
    torch.save(weights[0], vgg_path)
    # The real head file is a legacy (non-zip) pickle; write the fake the same way.
    torch.save(weights[1], lin_path, _use_new_zipfile_serialization=False)
    r = run_converter("--vgg16", vgg_path, "--lin", lin_path, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def run_converter(*args):
    return subprocess.run([sys.executable, CONVERTER, *map(str, args)], capture_output=True, text=True, cwd=REPO)


def converter_error(*args):
    """Run the converter's main() in-process; return its one-line exit message."""
    spec = importlib.util.spec_from_file_location("convert_lpips_weights", CONVERTER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit) as info:
        mod.main([str(a) for a in args])
    msg = str(info.value.code)
    assert msg.startswith("convert_lpips_weights: error: ") and "\n" not in msg
    return msg


def reference_lpips(sd, x, y):
    """Straight re-statement of LPIPS-VGG16 with average pools, from the raw tensors."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    # convs per block; the block's last ReLU is the tapped layer (relu1_2 ... relu5_3)
    blocks = [[0, 2], [5, 7], [10, 12, 14], [17, 19, 21], [24, 26, 28]]

    def feats(im):
        h = (im - mean) / std
        out = []
        for b, convs in enumerate(blocks):
            if b > 0:
                h = F.avg_pool2d(h, 2)
            for i in convs:
                h = F.relu(F.conv2d(h, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], padding=1))
            out.append(h)
        return out

    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for k, (a, b) in enumerate(zip(feats(x), feats(y))):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = sd[f"lin{k}.weight"].view(1, -1, 1, 1)
        total += ((a - b) ** 2 * w).sum(1).mean(dim=(1, 2)).double()
    return total


def test_identical_images_give_exactly_zero(model):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    d = model(x, x.clone())
    assert d.shape == (2,)
    assert torch.equal(d, torch.zeros(2))


def test_nonnegative_per_sample_and_batch_independent(model):
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(3, 3, 32, 32, generator=g), torch.rand(3, 3, 32, 32, generator=g)
    d = model(x, y)
    assert d.shape == (3,)
    assert (d > 0).all()
    one = torch.cat([model(x[i:i + 1], y[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(d, one, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(d, model(y, x), rtol=1e-5, atol=1e-7)  # symmetric


def test_matches_independent_reimplementation(model, weights):
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    ref = reference_lpips(our_state(*weights), x, y)
    torch.testing.assert_close(model(x, y).double(), ref, rtol=1e-5, atol=1e-8)


def test_gradient_reaches_inputs(model):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 32, 32, generator=g).requires_grad_(True)
    y = torch.rand(2, 3, 32, 32, generator=g)
    model(x, y).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum(dim=(1, 2, 3)).gt(0).all()
    assert all(p.grad is None for p in model.parameters())


def test_frozen_eval_and_avg_pooling():
    m = LPIPS()
    assert not any(p.requires_grad for p in m.parameters())
    m.train()
    assert not any(mod.training for mod in m.modules())
    assert not any(isinstance(mod, torch.nn.MaxPool2d) for mod in m.modules())
    assert [i for i, mod in enumerate(m.features) if isinstance(mod, torch.nn.AvgPool2d)] == [4, 9, 16, 23]
    assert [tuple(lin.weight.shape) for lin in m.lins] == [(1, c, 1, 1) for c in TAP_CHANNELS]
    assert set(m.state_dict()) == set(our_state(fake_torchvision_vgg16(), fake_lpips_heads()))


def test_imagenet_normalisation_equals_lpips_scaling_layer():
    # lpips maps [0,1] -> [-1,1] then (x - shift) / scale; piq uses ImageNet mean/std on [0,1].
    u = torch.linspace(0, 1, 11).view(1, 1, -1).expand(1, 3, -1).unsqueeze(-1)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    m = LPIPS()
    torch.testing.assert_close((u - m.mean) / m.std, (2 * u - 1 - shift) / scale, rtol=0, atol=1e-5)


def test_bad_shapes_raise(model):
    with pytest.raises(ValueError, match="same shape"):
        model(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 16))
    with pytest.raises(ValueError, match="16x16"):
        model(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_224px_batch_of_one(model):
    g = torch.Generator().manual_seed(4)
    x = torch.rand(1, 3, 224, 224, generator=g)
    y = (x + 0.1 * torch.randn(1, 3, 224, 224, generator=g)).clamp(0, 1)
    d = model(x, y)
    assert d.shape == (1,) and torch.isfinite(d).all() and d.item() > 0
    assert model(x, x).item() == 0.0


def test_converter_round_trip(weights_file, model):
    loaded = load_lpips(str(weights_file))
    assert isinstance(loaded, LPIPS)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    assert torch.equal(loaded(x, y), model(x, y))
    assert not any(p.requires_grad for p in loaded.parameters())
    assert set(torch.load(weights_file, weights_only=True)) == set(model.state_dict())


def test_env_var_path(weights_file, monkeypatch):
    monkeypatch.setenv("CM_LPIPS_PATH", str(weights_file))
    assert isinstance(load_lpips(), LPIPS)
    # an explicit path wins over the environment
    with pytest.raises(LPIPSWeightsMissing, match="nope.pt"):
        load_lpips(str(weights_file.parent / "nope.pt"))


@pytest.mark.parametrize("given", [None, "missing.pt"])
def test_missing_weights_one_line_error(given, monkeypatch, tmp_path):
    monkeypatch.delenv("CM_LPIPS_PATH", raising=False)
    path = None if given is None else str(tmp_path / given)
    with pytest.raises(LPIPSWeightsMissing) as info:
        load_lpips(path)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "\n" not in msg
    for needle in ("scripts/convert_lpips_weights.py", "vgg16-397923af.pth", "weights/v0.1/vgg.pth",
                   "--lpips_path", "CM_LPIPS_PATH", "VGG16 ImageNet", "LPIPS v0.1"):
        assert needle in msg, needle
    if path:
        assert path in msg


def test_wrong_keys_one_line_error(weights, tmp_path):
    sd = our_state(*weights)
    bad = dict(sd)
    del bad["features.5.weight"]
    torch.save(bad, tmp_path / "a.pt")
    with pytest.raises(LPIPSWeightsError, match="'features.5.weight'") as info:
        load_lpips(str(tmp_path / "a.pt"))
    assert "\n" not in str(info.value)

    torch.save({**sd, "extra.weight": torch.zeros(1)}, tmp_path / "b.pt")
    with pytest.raises(LPIPSWeightsError, match="unexpected key 'extra.weight'"):
        load_lpips(str(tmp_path / "b.pt"))

    torch.save({**sd, "lin2.weight": torch.zeros(1, 3, 1, 1)}, tmp_path / "c.pt")
    with pytest.raises(LPIPSWeightsError, match="'lin2.weight' has shape"):
        load_lpips(str(tmp_path / "c.pt"))

    (tmp_path / "d.pt").write_bytes(b"not a torch file")
    with pytest.raises(LPIPSWeightsError, match="cannot read") as info:
        load_lpips(str(tmp_path / "d.pt"))
    assert "\n" not in str(info.value)


def test_converter_errors_are_one_line(weights, tmp_path):
    vgg, heads = weights
    torch.save(heads, tmp_path / "vgg.pth")
    out = tmp_path / "out.pt"

    assert "absent.pth" in converter_error("--vgg16", tmp_path / "absent.pth", "--lin", tmp_path / "vgg.pth",
                                           "--out", out)

    broken = {k: v for k, v in vgg.items() if k != "features.14.bias"}
    torch.save(broken, tmp_path / "broken.pth")
    assert "'features.14.bias'" in converter_error("--vgg16", tmp_path / "broken.pth", "--lin", tmp_path / "vgg.pth",
                                                   "--out", out)

    # inputs swapped: the "VGG16" file has only head keys
    torch.save(vgg, tmp_path / "vgg16.pth")
    assert "'features.0.weight'" in converter_error("--vgg16", tmp_path / "vgg.pth", "--lin", tmp_path / "vgg16.pth",
                                                    "--out", out)

    # the AlexNet heads (64, 192, ...) are not the VGG ones
    alex = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 192, 384, 256, 256))}
    torch.save(alex, tmp_path / "alex.pth")
    assert "'lin1.weight' has shape" in converter_error("--vgg16", tmp_path / "vgg16.pth", "--lin",
                                                        tmp_path / "alex.pth", "--out", out)

    (tmp_path / "junk.pth").write_bytes(b"junk")
    assert "cannot read" in converter_error("--vgg16", tmp_path / "junk.pth", "--lin", tmp_path / "vgg.pth",
                                            "--out", out)
    assert "output folder" in converter_error("--vgg16", tmp_path / "vgg16.pth", "--lin", tmp_path / "vgg.pth",
                                              "--out", tmp_path / "no" / "out.pt")
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_converter_help_documents_every_flag(capsys):
    spec = importlib.util.spec_from_file_location("convert_lpips_weights", CONVERTER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit):
        mod.main(["--help"])
    text = capsys.readouterr().out
    for flag, words in (("--vgg16", "vgg16-397923af.pth"), ("--lin", "v0.1/vgg.pth"), ("--out", "CM_LPIPS_PATH")):
        assert flag in text and words in text
