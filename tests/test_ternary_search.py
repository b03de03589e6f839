"""cm.ternary.ternary_search on known functions, and scripts/ternary_search.py end to end."""

import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cm import logger
from cm.metrics.evaluation import save_stats
from cm.metrics.inception import FIDInceptionV3
from cm.script_util import create_model
from cm.ternary import ternary_search

ROOT = Path(__file__).resolve().parents[1]


def counted(f):
    """``f`` plus a list recording every call, to check that each point is evaluated once."""
    calls = []

    def g(x):
        calls.append(x)
        return f(x)

    return g, calls


def bound(lo, hi):
    """Evaluations allowed: two per round of a 2/3 shrink, plus the last ≤ 3 points."""
    n = hi - lo + 1
    return 2 * math.ceil(math.log(max(n, 2)) / math.log(1.5)) + 3


def check(f, lo, hi):
    g, calls = counted(f)
    x, fx, evals = ternary_search(g, lo, hi)
    true_min = min(f(t) for t in range(lo, hi + 1))
    assert lo <= x <= hi and fx == f(x) == true_min, (lo, hi, x, fx, true_min)
    assert len(calls) == len(set(calls)) == len(evals), "a point was evaluated twice"
    assert list(evals) == calls and all(evals[t] == f(t) for t in evals)
    assert len(evals) <= bound(lo, hi), (len(evals), bound(lo, hi))
    return x, evals


@pytest.mark.parametrize("lo,hi", [(0, 39), (0, 0), (0, 1), (0, 2), (0, 3), (-7, 12), (5, 1000)])
def test_quadratics_every_minimum_position(lo, hi):
    for c in range(lo, hi + 1, max(1, (hi - lo) // 50)):
        x, _ = check(lambda t: (t - c) ** 2, lo, hi)
        assert x == c
    for c in (lo + 0.4, hi - 0.4, (lo + hi) / 2 + 0.3):  # real-valued centre: nearest integer
        x, _ = check(lambda t: (t - c) ** 2, lo, hi)
        assert x == round(c)


def test_edge_minima_monotone_functions():
    assert check(lambda t: t, 0, 39)[0] == 0
    assert check(lambda t: -t, 0, 39)[0] == 39
    assert check(lambda t: math.exp(-t), 3, 200)[0] == 200


def test_flat_bottom_plateaus():
    for a, b in [(10, 20), (0, 5), (30, 39), (17, 17), (0, 39)]:
        f = lambda t, a=a, b=b: max(a - t, 0, t - b)  # noqa: E731
        x, _ = check(f, 0, 39)
        assert a <= x <= b


def test_random_unimodal_sequences():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 60)
        m, width = rng.randint(0, n - 1), rng.randint(0, 3)
        vals = [0.0] * n
        for i in range(m - 1, -1, -1):  # strictly decreasing up to the bottom
            vals[i] = vals[i + 1] + rng.uniform(0.01, 5)
        for i in range(m + 1, n):  # flat for `width` points, then strictly increasing
            vals[i] = vals[i - 1] + (0.0 if i <= m + width else rng.uniform(0.01, 5))
        check(lambda t: vals[t], 0, n - 1)


def test_evaluation_count_grows_logarithmically():
    counts = {}
    for n in (10, 100, 1000, 10**4, 10**6):
        _, evals = check(lambda t, n=n: abs(t - n // 3), 0, n - 1)
        counts[n] = len(evals)
    assert counts[10**6] <= 2 * math.log(10**6, 1.5) + 3 < 75
    assert counts[10**6] - counts[10**4] <= 2 * math.ceil(math.log(100, 1.5)) + 1


def test_noisy_function_returns_best_evaluated_point():
    vals = [5, 1, 9, 0.5, 7, 8, 2, 6, 4, 3]  # not unimodal
    x, fx, evals = ternary_search(lambda t: vals[t], 0, 9)
    assert fx == min(evals.values()) and vals[x] == fx


def test_empty_range_is_an_error():
    with pytest.raises(ValueError, match=r"empty search range \[3, 2\]"):
        ternary_search(lambda t: t, 3, 2)


# ----------------------------------------------------------------------------
# The script


TINY = dict(
    image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
    num_head_channels=16, class_cond=True, use_scale_shift_norm=True, resblock_updown=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A random tiny consistency model, a random He-initialised Inception, tiny reference stats."""
    d = tmp_path_factory.mktemp("tern")
    g = torch.Generator().manual_seed(1)
    sd = create_model(**TINY).state_dict()
    for v in sd.values():
        fan_in = v[0].numel() if v.ndim > 1 else 1
        v.copy_(torch.randn(v.shape, generator=g) * (0.5 / fan_in**0.5 if v.ndim > 1 else 0.1))
    torch.save(sd, d / "model.pt")
    inc = FIDInceptionV3().state_dict()
    for k, v in inc.items():
        if k.endswith("conv.weight") or k == "fc.weight":
            v.normal_(0, float(np.sqrt(2 / np.prod(v.shape[1:]))), generator=g)
        elif k.endswith("bn.weight"):
            v.uniform_(0.8, 1.2, generator=g)
        elif k.endswith(("bn.bias", "running_mean")) or k == "fc.bias":
            v.normal_(0, 0.1, generator=g)
        elif k.endswith("running_var"):
            v.uniform_(0.5, 1.5, generator=g)
    torch.save(inc, d / "inception.pth")
    # reference statistics of a made-up distribution over the 2048 pool3 features
    rng = np.random.default_rng(0)
    feats = rng.normal(0.5, 0.3, size=(16, 2048))
    save_stats(d / "ref_stats.npz", feats.mean(0), np.cov(feats, rowvar=False))
    return d


def run_search(files, *extra, out="out"):
    cmd = [
        sys.executable, str(ROOT / "scripts" / "ternary_search.py"),
        *[x for k, v in TINY.items() for x in (f"--{k}", str(v))],
        "--model_path", str(files / "model.pt"), "--ref", str(files / "ref_stats.npz"),
        "--inception_path", str(files / "inception.pth"), "--fid_batch_size", "4",
        "--steps", "10", "--num_samples", "4", "--batch_size", "4", "--logging_dir", str(files / out), *extra,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "OPENAI_LOGDIR")}
    env["OMP_NUM_THREADS"] = "1"  # two threads on a busy 2-core machine run 4x slower
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_script_end_to_end(files):
    """A 4-point range: one search round plus the final bracket (each FID costs seconds on a CPU)."""
    r = run_search(files, "--search_min", "2", "--search_max", "5")
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((files / "out" / "ternary_search.json").read_text())
    evals = {e["t"]: e["fid"] for e in res["evaluations"]}
    assert res["search_range"] == [2, 5] and res["steps"] == 10
    assert 3 <= len(evals) <= 4 and set(evals) <= {2, 3, 4, 5} and list(evals)[:2] == [3, 4]
    assert res["best_fid"] == min(evals.values()) and evals[res["best_t"]] == res["best_fid"]
    assert res["best_ts"] == f"0,{res['best_t']},9"
    assert all(np.isfinite(v) and v > 0 for v in evals.values())
    assert len(set(evals.values())) > 1, "FID does not depend on t: the objective is degenerate"
    for t, fid in evals.items():
        assert f"ts=0,{t},9: FID {fid:.4f}" in r.stdout
    assert f"best: ts=0,{res['best_t']},9" in r.stdout
    csv = (files / "out" / "progress.csv").read_text().splitlines()
    assert csv[0].split(",") == ["fid", "t"] and len(csv) == len(evals) + 1


def test_script_errors_are_one_line(files):
    r = run_search(files, "--search_min", "4", "--search_max", "12", out="bad")
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "ternary_search.py: error: --search_min/--search_max must satisfy 0 <= min <= max <= steps-1 = 9, got [4, 12]"
    ]
    r = run_search(files, "--inception_path", str(files / "missing.pth"), out="bad")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "FID Inception weights not found" in lines[0], r.stderr
    assert not (files / "bad").exists()


# ----------------------------------------------------------------------------
# The original's --begin / --end / --ref_batch


def load_search_script():
    spec = importlib.util.spec_from_file_location("_ternary_search", ROOT / "scripts" / "ternary_search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_original_begin_end_ref_batch_flags(monkeypatch, tmp_path):
    script = load_search_script()
    calls = []

    def fake_fid(model, diffusion, t, inception, ref, steps, begin, end, **kw):
        calls.append((ref, (*begin, t, *end)))
        return (t - 6) ** 2 + 1.0

    monkeypatch.setattr(script, "load_model_and_diffusion", lambda args, device, **kw: (None, None, ""))
    monkeypatch.setattr(script, "load_fid_reference", lambda path, ref, *a: (None, ref))
    monkeypatch.setattr(script, "multistep_fid", fake_fid)
    try:
        script.main(["--model_path", "m.pt", "--begin", "0,2", "--end", "11,17", "--ref_batch", "ref.npz",
                     "--steps", "18", "--num_samples", "4", "--logging_dir", str(tmp_path)])  # fmt: skip
    finally:
        logger.reset()  # main() configured the process-wide logger on pytest's captured stdout
    ts = [c[1] for c in calls]
    assert all(t[:2] == (0, 2) and t[3:] == (11, 17) and 2 <= t[2] <= 11 for t in ts)
    assert {c[0] for c in calls} == {"ref.npz"}
    res = json.loads((tmp_path / "ternary_search.json").read_text())
    assert res["best_t"] == 6 and res["best_ts"] == "0,2,6,11,17" and res["search_range"] == [2, 11]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--begin", "0,x"], "--begin must be a comma list of integers, got '0,x'"),
        (["--end", "5,3"], "--end must be increasing indices in [0, steps-1 = 9], got '5,3'"),
        (["--begin", "0,6", "--end", "4"], "--begin's last index 6 is after --end's first 4"),
        (["--begin", "0", "--search_min", "2"], "--begin/--end and --search_min/--search_max both set"),
        (["--ref_batch", "a.npz"], "--ref and --ref_batch (its old name) name different files"),
    ],
)
def test_begin_end_errors_are_one_line(tmp_path, flags, message):
    script = load_search_script()
    parser = script.create_argparser(script.search_defaults())
    args = parser.parse_args(["--model_path", "m.pt", "--ref", "r.npz", "--steps", "10", *flags])
    with pytest.raises(script.UsageError, match=re.escape(message)):
        script.check_search_args(args)
