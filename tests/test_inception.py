"""The FID Inception network against the golden manifest and forward (tests/data/inception_fid_*)."""

import os

import numpy as np
import pytest
import torch

from cm.metrics.inception import (
    ENV_VAR,
    WEIGHTS_FILENAME,
    FIDInceptionV3,
    InceptionWeightsMismatch,
    InceptionWeightsNotFound,
    load_inception,
    preprocess,
)

DATA = os.path.join(os.path.dirname(__file__), "data")
MANIFEST = os.path.join(DATA, "inception_fid_manifest.txt")
GOLDEN = os.path.join(DATA, "inception_fid_golden.pt")


def read_manifest():
    """[(key, shape)] in registration order, and the header line."""
    entries, header = [], None
    with open(MANIFEST) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("#"):
                header = line
                continue
            key, shape = line.split("\t")
            entries.append((key, tuple(int(s) for s in shape.split(",")) if shape else ()))
    return entries, header


def formula_state_dict():
    """The golden README's weights: r = (i^2 + 7i + 13k) mod 1009, u = r/1009 - 1/2."""
    state = {}
    for k, (key, shape) in enumerate(read_manifest()[0]):
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0, dtype=torch.int64)
            continue
        i = np.arange(int(np.prod(shape)), dtype=np.int64)
        u = ((i * i + 7 * i + 13 * k) % 1009) / 1009.0 - 0.5
        if key.endswith("bn.weight"):
            v = 1.0 + 0.2 * u
        elif key.endswith("bn.running_var"):
            v = 1.0 + u
        elif key.endswith("weight"):  # conv weights and fc.weight
            v = u * np.sqrt(24.0 / np.prod(shape[1:]))
        else:  # bn.bias, bn.running_mean, fc.bias
            v = 0.2 * u
        state[key] = torch.from_numpy(v.astype(np.float32).reshape(shape))
    return state


def golden_images():
    """uint8 NHWC [2, 32, 32, 3]: img[b,i,j,c] = (7i + 13j + 29c + 31b) mod 256."""
    b, i, j, c = np.ogrid[0:2, 0:32, 0:32, 0:3]
    return ((i * 7 + j * 13 + c * 29 + b * 31) % 256).astype(np.uint8)


@pytest.fixture(scope="module")
def state():
    return formula_state_dict()


@pytest.fixture(scope="module")
def weights_file(state, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILENAME
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope="module")
def golden_run(state):
    model = FIDInceptionV3()
    model.load_state_dict(state, strict=True)
    model.eval()
    x = torch.from_numpy(golden_images()).permute(0, 3, 1, 2)
    with torch.no_grad():
        pool3, logits = model(x)
    return pool3, logits


def test_state_dict_matches_manifest_exactly():
    entries, header = read_manifest()
    sd = FIDInceptionV3().state_dict()
    ours = [(k, tuple(v.shape)) for k, v in sd.items()]
    assert ours == entries  # same keys, same shapes, same registration order
    assert len(ours) == 566
    n_params = sum(p.numel() for p in FIDInceptionV3().parameters())
    assert n_params == 23850960 and "23850960 parameters" in header
    n_buffers = sum(b.numel() for b in FIDInceptionV3().buffers())
    assert n_buffers == 34526


def test_formula_weights_spot_values(state):
    w = state["Conv2d_1a_3x3.conv.weight"].flatten()[:3]
    torch.testing.assert_close(w, torch.tensor([-0.4714045, -0.4639293, -0.4545853]), rtol=0, atol=1e-7)
    rv = state["Conv2d_1a_3x3.bn.running_var"][:3]
    torch.testing.assert_close(rv, torch.tensor([0.5515362, 0.5594648, 0.5693756]), rtol=0, atol=1e-7)
    fb = state["fc.bias"][:3]
    torch.testing.assert_close(fb, torch.tensor([-0.04410307, -0.04251735, -0.04053518]), rtol=0, atol=1e-8)


def test_golden_forward(golden_run):
    pool3, logits = golden_run
    golden = torch.load(GOLDEN, weights_only=True)
    assert pool3.shape == (2, 2048) and logits.shape == (2, 1008)
    torch.testing.assert_close(pool3, golden["pool3"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, golden["logits"], rtol=1e-4, atol=1e-4)
    # The README's spot values and summaries.
    spot = torch.tensor([2.442514, 0.730549, 3.038121, 1.992776])
    torch.testing.assert_close(pool3[0, :4], spot, rtol=1e-4, atol=1e-4)
    assert abs(pool3.sum().item() - 5848.376) < 0.05
    assert abs(logits.sum().item() - (-3479.217)) < 0.05
    assert logits.argmax(1).tolist() == [500, 500]
    assert (pool3 - pool3.flip(0)).abs().max().item() > 0.1  # the two images differ


def test_load_inception_from_path_and_env(weights_file, state, golden_run, monkeypatch):
    x = torch.from_numpy(golden_images()).permute(0, 3, 1, 2)
    monkeypatch.delenv(ENV_VAR, raising=False)
    model = load_inception(weights_file, device="cpu")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        pool3, logits = model(x)
    torch.testing.assert_close(pool3, golden_run[0], rtol=0, atol=0)
    torch.testing.assert_close(logits, golden_run[1], rtol=0, atol=0)
    monkeypatch.setenv(ENV_VAR, weights_file)
    model = load_inception()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("how", ["argument", "env", "nothing"])
def test_missing_weights_one_line_error(how, tmp_path, monkeypatch):
    missing = str(tmp_path / "nope.pth")
    monkeypatch.delenv(ENV_VAR, raising=False)
    if how == "env":
        monkeypatch.setenv(ENV_VAR, missing)
    with pytest.raises(InceptionWeightsNotFound) as info:
        load_inception(missing if how == "argument" else None)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "\n" not in msg
    assert WEIGHTS_FILENAME in msg and "pytorch-fid" in msg
    assert "--inception_path" in msg and ENV_VAR in msg
    if how != "nothing":
        assert missing in msg


def test_wrong_weights_file_one_line_error(tmp_path):
    sd = FIDInceptionV3().state_dict()
    sd["AuxLogits.fc.weight"] = torch.zeros(1000, 768)  # e.g. the ImageNet Inception
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(InceptionWeightsMismatch, match="unexpected key 'AuxLogits.fc.weight'") as info:
        load_inception(str(bad))
    assert "\n" not in str(info.value)

    sd.pop("AuxLogits.fc.weight")
    sd["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(sd, bad)
    with pytest.raises(InceptionWeightsMismatch, match=r"fc.weight has shape \(1000, 2048\)"):
        load_inception(str(bad))

    bad.write_bytes(b"not a torch file")
    with pytest.raises(InceptionWeightsMismatch, match="cannot read"):
        load_inception(str(bad))


def test_preprocess_uint8_float_and_size():
    img = torch.from_numpy(golden_images()).permute(0, 3, 1, 2)
    a = preprocess(img)
    b = preprocess(img.float() / 255.0)
    assert a.shape == (2, 3, 299, 299) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.min() >= -1 and a.max() <= 1
    big = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)
    torch.testing.assert_close(preprocess(big), big.float() / 255.0 * 2 - 1)  # identity resize
    with pytest.raises(ValueError, match="NCHW"):
        preprocess(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weights_file_does_not_run_code(tmp_path):
    # torch.load(weights_only=True): a pickle that would execute code is refused.
    marker = tmp_path / "ran"
    torch.save({"x": _RunsCode(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(InceptionWeightsMismatch, match="cannot read"):
        load_inception(str(tmp_path / "evil.pth"))
    assert not marker.exists()
