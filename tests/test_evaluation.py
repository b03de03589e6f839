"""FID / IS / precision-recall math, streaming feature extraction, and the scripts/fid.py CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.special
import torch
from PIL import Image

from cm.metrics.evaluation import (
    EvaluationError,
    compute_activations,
    feature_stats,
    frechet_distance,
    inception_score,
    load_stats,
    precision_recall,
    reference_stats,
    save_stats,
)
from cm.metrics.inception import ENV_VAR, WEIGHTS_FILENAME, FIDInceptionV3

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FID_SCRIPT = os.path.join(REPO, "scripts", "fid.py")


def random_gaussian(rng, n, d, shift=0.0):
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ a + shift


def scipy_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


# ----------------------------------------------------------------------------------
# Fréchet distance


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_distance_matches_scipy_sqrtm(seed):
    rng = np.random.default_rng(seed)
    x, y = random_gaussian(rng, 400, 48), random_gaussian(rng, 300, 48, shift=0.3)
    mu1, s1 = feature_stats(x)
    mu2, s2 = feature_stats(y)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours > 1.0
    assert ours == pytest.approx(scipy_fid(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ours, rel=1e-9)


def test_feature_stats_match_numpy_cov():
    x = np.random.default_rng(0).normal(size=(1000, 16)).astype(np.float32) * 3 + 5
    mu, sigma = feature_stats(x, chunk=333)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)


def test_frechet_distance_self_is_zero_full_and_rank_deficient():
    rng = np.random.default_rng(0)
    mu, s = feature_stats(random_gaussian(rng, 2000, 128))
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8
    # Fewer samples than dimensions (a tiny FID run): covariance of rank 19 in 512-d.
    mu, s = feature_stats(rng.normal(size=(20, 512)))
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8


def test_frechet_distance_rank_deficient_is_exact():
    # Tr((Σ1Σ2)^½) = sum of singular values of A Bᵀ when Σ1 = AᵀA, Σ2 = BᵀB (n << d).
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(20, 512)), rng.normal(size=(20, 512)) + 0.1
    mu1, s1 = feature_stats(x)
    mu2, s2 = feature_stats(y)
    a, b = (x - mu1) / np.sqrt(19), (y - mu2) / np.sqrt(19)
    exact = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.linalg.svd(a @ b.T, compute_uv=False).sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-10)


def test_frechet_distance_closed_form_diagonal():
    # Diagonal covariances: FID = |Δμ|² + Σ (√a − √b)².
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.0])
    fid = frechet_distance([0, 0, 0], np.diag(a), [1, 2, 2], np.diag(b))
    assert fid == pytest.approx(9 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), rel=1e-12)


def test_frechet_distance_bad_input():
    with pytest.raises(EvaluationError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(EvaluationError, match="NaN"):
        frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


# ----------------------------------------------------------------------------------
# Inception Score


def test_inception_score_uniform_is_one():
    mean, std = inception_score(np.zeros((50, 1008)))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_confident_distinct_classes():
    k = 7
    logits = np.full((70, 1008), -50.0)
    logits[np.arange(70), np.arange(70) % k] = 50.0  # every split holds each class once
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(k, rel=1e-9) and std < 1e-9
    # All images the same confident class: no diversity, IS = 1.
    same = np.full((20, 1008), -50.0)
    same[:, 3] = 50.0
    assert inception_score(same, splits=2)[0] == pytest.approx(1.0, abs=1e-9)


def test_inception_score_matches_formula():
    logits = np.random.default_rng(0).normal(size=(103, 1008)) * 3
    p = scipy.special.softmax(logits, axis=1)
    scores = []
    for k in range(4):
        part = p[k * 103 // 4 : (k + 1) * 103 // 4]
        kl = scipy.special.rel_entr(part, part.mean(0, keepdims=True)).sum(1).mean()
        scores.append(np.exp(kl))
    mean, std = inception_score(logits, splits=4)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-8)
    with pytest.raises(EvaluationError, match="at least 10 images"):
        inception_score(logits[:5])


# ----------------------------------------------------------------------------------
# Precision / recall


def brute_force_pr(real, fake, k=3):
    def radii(x):
        return np.sort(scipy.spatial.distance.cdist(x, x), axis=1)[:, k]

    d = scipy.spatial.distance.cdist(fake, real)
    precision = (d <= radii(real)[None, :]).any(1).mean()
    recall = (d.T <= radii(fake)[None, :]).any(1).mean()
    return precision, recall


def test_precision_recall_identical_and_far_apart():
    x = np.random.default_rng(0).normal(size=(200, 64))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_precision_recall_matches_brute_force_with_small_blocks():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(150, 8))
    fake = rng.normal(size=(120, 8)) + 1.0
    expected = brute_force_pr(real, fake)
    assert 0.05 < expected[0] < 0.95 and 0.05 < expected[1] < 0.95  # a non-trivial case
    # max_elems 500: blocks of 3-4 rows, never an N x N matrix.
    got = precision_recall(real, fake, max_elems=500)
    assert got == pytest.approx(expected, abs=1.5 / 120)
    assert precision_recall(real, fake) == got


# ----------------------------------------------------------------------------------
# Streaming features


class ColorFeatures(torch.nn.Module):
    """A stand-in feature network: per-channel mean and max (6 features), 4 logits."""

    def __init__(self):
        super().__init__()
        self.batch_sizes = []

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        self.batch_sizes.append(len(x))
        x = x.float()
        f = torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1)
        return f, f[:, :4] / 255


def images(n, seed=0, size=8):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("compressed", [False, True])
def test_compute_activations_streams_npz_in_batches(tmp_path, compressed):
    x = images(23)
    path = tmp_path / "s.npz"
    (np.savez_compressed if compressed else np.savez)(path, x, np.arange(23))
    model = ColorFeatures()
    feats, logits = compute_activations(str(path), model, batch_size=5, progress=False)
    assert model.batch_sizes == [5, 5, 5, 5, 3]
    ref, _ = ColorFeatures()(torch.from_numpy(x).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(feats, ref.numpy())
    assert feats.dtype == np.float32 and logits.shape == (23, 4)
    # Same for an in-memory array and an iterable of batches.
    np.testing.assert_array_equal(compute_activations(x, ColorFeatures(), 7, progress=False)[0], feats)
    np.testing.assert_array_equal(compute_activations([x[:10], x[10:]], ColorFeatures(), 7, progress=False)[0], feats)


def test_compute_activations_folder_and_grayscale(tmp_path):
    x = images(6)
    for i, im in enumerate(x):
        Image.fromarray(im).save(tmp_path / f"cls_{i:03d}.png")
    feats, _ = compute_activations(str(tmp_path), ColorFeatures(), 4, progress=False)
    np.testing.assert_array_equal(feats, compute_activations(x, ColorFeatures(), 4, progress=False)[0])
    gray = x[..., :1]
    f_gray, _ = compute_activations(gray, ColorFeatures(), 4, progress=False)
    f_rgb, _ = compute_activations(np.repeat(gray, 3, axis=3), ColorFeatures(), 4, progress=False)
    np.testing.assert_array_equal(f_gray, f_rgb)


def test_bad_image_inputs_one_line_errors(tmp_path):
    model = ColorFeatures()
    cases = {
        "float.npz": lambda p: np.savez(p, np.zeros((2, 8, 8, 3), np.float32)),
        "nchw.npz": lambda p: np.savez(p, np.zeros((2, 3, 8, 8), np.uint8)),
        "noarr0.npz": lambda p: np.savez(p, images=np.zeros((2, 8, 8, 3), np.uint8)),
        "text.npz": lambda p: open(p, "w").write("not a zip"),
    }
    for name, make in cases.items():
        path = str(tmp_path / name)
        make(path)
        with pytest.raises(EvaluationError) as info:
            compute_activations(path, model, 2, progress=False)
        assert "\n" not in str(info.value) and path in str(info.value), name
    with pytest.raises(EvaluationError, match="file not found"):
        compute_activations(str(tmp_path / "missing.npz"), model, 2, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match="no image files"):
        compute_activations(str(tmp_path / "empty"), model, 2, progress=False)


def test_truncated_npz_is_refused(tmp_path):
    path = tmp_path / "t.npz"
    np.savez(path, images(10))
    raw = path.read_bytes()
    # Chop the array data: the zip directory is gone too, so it is not a readable zip.
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(EvaluationError):
        compute_activations(str(tmp_path / "cut.npz"), ColorFeatures(), 4, progress=False)


def test_save_load_stats_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(30, 6)).astype(np.float32)
    mu, sigma = feature_stats(feats)
    save_stats(tmp_path / "a.npz", mu, sigma)
    save_stats(tmp_path / "b.npz", mu, sigma, feats)
    a, b = load_stats(str(tmp_path / "a.npz")), load_stats(str(tmp_path / "b.npz"))
    assert set(a) == {"mu", "sigma"} and set(b) == {"mu", "sigma", "feats"}
    np.testing.assert_array_equal(a["sigma"], sigma)
    np.testing.assert_array_equal(b["feats"], feats)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp files left
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.zeros((2, 2)))
    with pytest.raises(EvaluationError, match="malformed"):
        load_stats(str(tmp_path / "bad.npz"))


def test_reference_stats_from_images_and_stats(tmp_path):
    x = images(12)
    np.savez(tmp_path / "ref.npz", x)
    ref = reference_stats(str(tmp_path / "ref.npz"), ColorFeatures(), 5, progress=False)
    mu, sigma = feature_stats(compute_activations(x, ColorFeatures(), 5, progress=False)[0])
    np.testing.assert_allclose(ref["mu"], mu)
    np.testing.assert_allclose(ref["sigma"], sigma)
    save_stats(tmp_path / "st.npz", ref["mu"], ref["sigma"])
    st = reference_stats(str(tmp_path / "st.npz"), None)
    np.testing.assert_array_equal(st["sigma"], ref["sigma"])
    with pytest.raises(EvaluationError, match="only mu/sigma"):
        reference_stats(str(tmp_path / "st.npz"), ColorFeatures(), need_feats=True)
    # A stats file that also carries its images: keep its mu/sigma, add features.
    np.savez(tmp_path / "both.npz", arr_0=x, mu=ref["mu"] + 1, sigma=ref["sigma"])
    both = reference_stats(str(tmp_path / "both.npz"), ColorFeatures(), 5, need_feats=True, progress=False)
    np.testing.assert_array_equal(both["mu"], ref["mu"] + 1)
    assert both["feats"].shape == (12, 6)


# ----------------------------------------------------------------------------------
# scripts/fid.py end to end with a randomly initialised Inception


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """He-initialised weights (torch's default init makes pool3 vanish) saved as a state_dict."""
    g = torch.Generator().manual_seed(0)
    sd = FIDInceptionV3().state_dict()
    for k, v in sd.items():
        if k.endswith("conv.weight") or k == "fc.weight":
            v.normal_(0, float(np.sqrt(2 / np.prod(v.shape[1:]))), generator=g)
        elif k.endswith("bn.weight"):
            v.uniform_(0.8, 1.2, generator=g)
        elif k.endswith(("bn.bias", "running_mean")) or k == "fc.bias":
            v.normal_(0, 0.1, generator=g)
        elif k.endswith("running_var"):
            v.uniform_(0.5, 1.5, generator=g)
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(sd, path)
    return str(path)


def run_fid(*args, env=None):
    if env is None:  # the weights path only where a test passes it
        env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    return subprocess.run(
        [sys.executable, FID_SCRIPT, "--progress", "False", "--device", "cpu", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )


def parse_output(stdout):
    out = {}
    for line in stdout.splitlines():
        if ":" in line and not line.startswith("wrote"):
            key, value = line.split(":", 1)
            out[key] = value.strip()
    return out


def test_fid_script_end_to_end(tmp_path, random_inception):
    # Few images: the Inception costs ~6 GFLOP per image at 299x299 on CPU.
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    ref_images = (rng.integers(0, 128, (6, 32, 32, 3)) // 2).astype(np.uint8)  # darker: a real gap
    np.savez(tmp_path / "samples.npz", samples, np.arange(10))  # arr_1: labels, as the sampler writes
    np.savez_compressed(tmp_path / "ref.npz", ref_images)
    stats = tmp_path / "ref_stats.npz"

    # Evaluate against an image npz, writing its statistics (with features) on the way.
    r1 = run_fid(
        "--sample_npz", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"),
        "--inception_path", random_inception, "--batch_size", "4", "--precision_recall", "True",
        "--splits", "2", "--save_stats", str(stats), "--json", str(tmp_path / "r1.json"),
    )  # fmt: skip
    assert r1.returncode == 0, r1.stderr
    printed = parse_output(r1.stdout)
    assert {"FID", "IS", "precision", "recall"} <= set(printed)
    res1 = json.loads((tmp_path / "r1.json").read_text())
    assert res1["num_samples"] == 10 and res1["splits"] == 2
    assert np.isfinite(res1["fid"]) and res1["fid"] > 1e-3
    assert res1["is_mean"] > 1.0 and res1["is_std"] >= 0.0
    assert 0.0 <= res1["precision"] <= 1.0 and 0.0 <= res1["recall"] <= 1.0
    assert float(printed["FID"]) == pytest.approx(res1["fid"], abs=1e-4)
    assert printed["IS"] == f"{res1['is_mean']:.4f} ± {res1['is_std']:.4f}"
    saved = load_stats(str(stats))
    assert saved["mu"].shape == (2048,) and saved["sigma"].shape == (2048, 2048) and saved["feats"].shape == (6, 2048)

    # Re-read the saved statistics (weights through $CM_INCEPTION_PATH this time): same numbers.
    env = dict(os.environ, **{ENV_VAR: random_inception})
    r2 = run_fid(
        "--sample_npz", str(tmp_path / "samples.npz"), "--ref", str(stats), "--precision_recall", "True",
        "--splits", "2", "--batch_size", "5", "--json", str(tmp_path / "r2.json"), env=env,
    )  # fmt: skip
    assert r2.returncode == 0, r2.stderr
    res2 = json.loads((tmp_path / "r2.json").read_text())
    for key in ("fid", "is_mean", "is_std", "precision", "recall"):
        # Other batch size: float32 features differ by rounding only (is_std ~1e-4 is a difference).
        assert res2[key] == pytest.approx(res1[key], rel=1e-5, abs=1e-6), key

    # Statistics from a folder of PNGs of the same images equal those from the npz.
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, im in enumerate(ref_images):
        Image.fromarray(im).save(folder / f"x_{i:02d}.png")
    r3 = run_fid("--ref", str(folder), "--save_stats", str(tmp_path / "png_stats.npz"), env=env)
    assert r3.returncode == 0, r3.stderr
    png_stats = load_stats(str(tmp_path / "png_stats.npz"))
    assert "feats" not in png_stats
    np.testing.assert_allclose(png_stats["mu"], saved["mu"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(png_stats["sigma"], saved["sigma"], rtol=1e-5, atol=1e-6)


def test_fid_script_user_errors(tmp_path, random_inception):
    np.savez(tmp_path / "s.npz", images(20, size=32))
    r = run_fid("--sample_npz", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert WEIGHTS_FILENAME in lines[0] and "--inception_path" in lines[0] and ENV_VAR in lines[0]

    r = run_fid(
        "--sample_npz", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"),
        "--inception_path", str(tmp_path / "missing.pth"),
    )  # fmt: skip
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "missing.pth" in r.stderr

    np.savez(tmp_path / "bad.npz", np.zeros((4, 32, 32, 3), np.float32))
    r = run_fid(
        "--sample_npz", str(tmp_path / "bad.npz"), "--ref", str(tmp_path / "s.npz"),
        "--inception_path", random_inception,
    )  # fmt: skip
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "bad.npz" in r.stderr and "uint8" in r.stderr

    save_stats(tmp_path / "st.npz", np.zeros(2048), np.eye(2048))
    r = run_fid("--ref", str(tmp_path / "st.npz"), "--save_stats", str(tmp_path / "o.npz"),
                "--inception_path", random_inception)  # fmt: skip
    assert r.returncode != 0 and "already holds statistics" in r.stderr

    r = run_fid("--sample_npz", str(tmp_path / "s.npz"))  # no --ref: argparse usage error
    assert r.returncode == 2 and "--ref" in r.stderr
