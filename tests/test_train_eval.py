"""In-training evaluation (cm/train_eval.py): FID during training and the fixed-seed sample grids.

The proofs run the real scripts on scikit-learn digits: a run with
--eval_interval and one without give the same progress.csv (minus the
evaluation columns) and bit-identical checkpoints; the logged FID of a
checkpoint equals fid.py on image_sample.py's .npz of the same EMA weights,
noise and labels (random-weight Inception); 2 processes log the FID of 1;
setup failures are one line at start-up with nothing written.
"""

import csv
import json
import os
import random
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cm.cli import UsageError
from cm.metrics.evaluation import feature_stats, save_stats
from cm.metrics.inception import FIDInceptionV3
from cm.recipes import get_recipe
from cm.train_eval import (
    check_reference,
    mode_samplers,
    preserved_rng,
    reference_statistics,
    torchscript_features,
)
from launchers import MPIEXEC

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
NET = (
    "--image_size 8 --channel_mult 1,2 --attention_resolutions 4 --num_channels 32 --num_res_blocks 1 "
    "--class_cond True --dropout 0.1"
)
SMALL = f"{NET} --log_interval 1 --global_batch_size 4"
CT = (
    "--training_mode consistency_training --target_ema_mode fixed --start_ema 0.9 --scale_mode fixed "
    "--start_scales 10 --loss_norm l2 --ema_rate 0.9,0.99"
)
EVAL_COLUMNS = ("fid_", "eval_")


def env():
    e = {k: v for k, v in os.environ.items() if k not in ("OPENAI_LOGDIR", "CM_INCEPTION_PATH", "CM_NO_GRAD_SYNC")}
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run(argv, prefix=(sys.executable,)):
    return subprocess.run([*prefix, *argv], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def script(name, flags):
    return [os.path.join(SCRIPTS, name), *shlex.split(flags)]


def progress_rows(log_dir, drop_eval=True):
    with open(os.path.join(log_dir, "progress.csv")) as f:
        rows = list(csv.DictReader(f))
    if drop_eval:
        rows = [{k: v for k, v in r.items() if not k.startswith(EVAL_COLUMNS)} for r in rows]
    return rows


def checkpoints(log_dir):
    return sorted(n for n in os.listdir(log_dir) if n.endswith(".pt"))


# ----------------------------------------------------------------------------
# Fixtures: digits, a cheap TorchScript feature network, a random-weight Inception


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """40 training digits as 8x8 RGB PNGs, and 30 other digits as a reference .npz (arr_0)."""
    from sklearn.datasets import load_digits

    out = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    rgb = [np.asarray(Image.fromarray((im * (255 / 16)).astype(np.uint8)).convert("RGB")) for im in digits.images]
    (out / "train").mkdir()
    for i in range(40):
        Image.fromarray(rgb[i]).save(out / "train" / f"{digits.target[i]}_{i}.png")
    np.savez(out / "ref.npz", np.stack(rgb[40:70]))
    return out


@pytest.fixture(scope="module")
def feature_net(tmp_path_factory):
    """A seeded random conv net (16-d features) saved as TorchScript: the --eval_features interface."""
    with preserved_rng():
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
        )
    path = tmp_path_factory.mktemp("features") / "features.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    return str(path)


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """He-initialised FID Inception weights (torch's default init makes pool3 vanish) as a state_dict."""
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


# ----------------------------------------------------------------------------
# Pure parts


def test_mode_samplers():
    (heun,) = mode_samplers("edm", eval_steps=7)
    assert heun.kwargs() == dict(sampler="heun", steps=7, ts=None, sigmas=None, flow_times=None)
    for mode in ("consistency_distillation", "consistency_training"):
        one, two = mode_samplers(mode)
        assert (one.name, one.sampler, two.name, two.sampler) == ("onestep", "onestep", "twostep", "multistep")
        assert two.kwargs()["ts"] == [0, 22, 39] and two.steps == 40  # the original's two-step CD command
    for mode in ("ect", "ict"):
        _, two = mode_samplers(mode)
        assert two.kwargs()["sigmas"] == [80.0, 0.821] and two.kwargs()["ts"] is None  # ECT's mid_t
    # progressive distillation trains an EDM denoiser: Heun, as the teacher
    assert [s.name for s in mode_samplers("progdist")] == ["heun"]
    assert get_recipe("ect").two_step_sigmas == (80.0, 0.821)
    # MeanFlow: its flow sampler, one step from t = 0.999 and two through 0.5
    one, two = mode_samplers("meanflow")
    assert (one.sampler, one.kwargs()["flow_times"], two.kwargs()["flow_times"]) == ("meanflow", [0.999, 0.0],
                                                                                      [0.999, 0.5, 0.0])


def test_preserved_rng_restores_every_global_stream():
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    expected = torch.rand(2), np.random.rand(2), random.random()
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    with preserved_rng():
        torch.rand(5), np.random.rand(5), random.random()
    got = torch.rand(2), np.random.rand(2), random.random()
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_reference_statistics_from_images_and_from_stats(data, feature_net, tmp_path):
    features = torchscript_features(feature_net, batch_size=7)
    with np.load(data / "ref.npz") as z:
        images = z["arr_0"]
    feats = features(images)
    assert feats.shape == (30, 16)
    # batching does not change the features beyond rounding
    np.testing.assert_allclose(torchscript_features(feature_net, batch_size=30)(images), feats, rtol=1e-5, atol=1e-6)
    mu, sigma = reference_statistics(str(data / "ref.npz"), features)
    np.testing.assert_array_equal(mu, feature_stats(feats)[0])
    save_stats(tmp_path / "stats.npz", mu, sigma)
    mu2, sigma2 = reference_statistics(str(tmp_path / "stats.npz"), features)
    np.testing.assert_array_equal(mu2, mu) and np.testing.assert_array_equal(sigma2, sigma)
    check_reference((mu, sigma), features, 8)
    save_stats(tmp_path / "wrong.npz", np.zeros(5), np.eye(5))
    with pytest.raises(UsageError, match="--eval_ref: statistics of dimension 5, the features have 16"):
        check_reference(reference_statistics(str(tmp_path / "wrong.npz"), features), features, 8)
    for bad in ("", str(tmp_path / "missing.npz")):
        with pytest.raises(UsageError, match="--eval_ref"):
            reference_statistics(bad, features)
    with pytest.raises(UsageError, match="--eval_features"):
        torchscript_features(str(tmp_path / "stats.npz"))


# ----------------------------------------------------------------------------
# The scripts


def ct_flags(data, feature_net, steps, evaluate=True):
    flags = f"{SMALL} {CT} --data_dir {data / 'train'} --total_training_steps {steps} --save_interval 2"
    if evaluate:
        flags += (f" --eval_interval 3 --eval_num_samples 6 --eval_batch_size 4 --eval_ema 0.9 "
                  f"--eval_ref {data / 'ref.npz'} --eval_features {feature_net}")
    return flags


@pytest.fixture(scope="module")
def ct_runs(data, feature_net, tmp_path_factory):
    """The same CT run (dropout 0.1) without and with --eval_interval 3: (plain dir, evaluated dir)."""
    plain, evald = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("eval")
    ok(run(script("cm_train.py", f"{ct_flags(data, feature_net, 4, evaluate=False)} --logging_dir {plain}")))
    ok(run(script("cm_train.py", f"{ct_flags(data, feature_net, 4)} --logging_dir {evald}")))
    return plain, evald


def test_resume_with_evaluation_is_bit_exact(ct_runs, data, feature_net, tmp_path):
    """2 steps (evaluated at their end), auto-resume to 4: the straight run's files and its FIDs at 3 and 4."""
    _, straight = ct_runs
    split = tmp_path / "split"
    ok(run(script("cm_train.py", f"{ct_flags(data, feature_net, 2)} --logging_dir {split}")))
    ok(run(script("cm_train.py", f"{ct_flags(data, feature_net, 4)} --logging_dir {split} --resume_checkpoint auto")))
    for name in [n for n in checkpoints(straight) if n.endswith("000004.pt")]:
        assert (straight / name).read_bytes() == (split / name).read_bytes(), name

    def evals(d):
        return [(r["eval_step"], r["fid_onestep"], r["fid_twostep"]) for r in progress_rows(d, False) if r["eval_step"]]

    # the resumed run's progress.csv starts at step 2 (the logger rewrites it)
    assert evals(split) == evals(straight) and [e[0] for e in evals(split)] == ["3", "4"]


def test_evaluation_changes_nothing_in_training(ct_runs):
    """CT with dropout: progress.csv (minus fid_/eval_ columns) and every .pt identical with and without FID."""
    plain, evald = ct_runs
    assert progress_rows(plain) == progress_rows(evald) and len(progress_rows(plain)) == 4
    rows = progress_rows(evald, drop_eval=False)
    # at step 3 and at the end (4): one step + two step samplers of the one EMA rate asked for
    assert [r["eval_step"] for r in rows] == ["", "", "3", "4"]
    assert all(float(rows[i][k]) > 0 for i in (2, 3) for k in ("fid_onestep", "fid_twostep", "eval_seconds"))
    assert not any(k.startswith("fid_") and "ema" in k for k in rows[0])
    assert checkpoints(plain) == checkpoints(evald) and len(checkpoints(plain)) == 2 * 5
    for name in checkpoints(plain):
        a, b = (open(os.path.join(d, name), "rb").read() for d in (plain, evald))
        assert a == b, name
    # the grids are written with or without --eval_interval, and they are the same
    for step in (2, 4):
        a, b = (np.asarray(Image.open(d / f"samples_{step:06d}.png")) for d in (plain, evald))
        assert a.shape == (64, 64, 3) and np.array_equal(a, b)
    assert "evaluation after 3 steps: fid_onestep" in (evald / "log.txt").read_text()


def test_grid_is_image_sample_of_the_ema_with_seed_0(data, tmp_path):
    """samples_<step>.png is image_sample.py --seed 0 --num_samples 64 of the first EMA rate (same noise each time)."""
    log_dir = tmp_path / "edm"
    ok(run(script("edm_train.py", f"{SMALL} --data_dir {data / 'train'} --total_training_steps 2 "
                  f"--save_interval 1 --ema_rate 0.9,0.99 --eval_steps 3 --logging_dir {log_dir}")))
    grids = [np.asarray(Image.open(log_dir / f"samples_{s:06d}.png")) for s in (1, 2)]
    assert not np.array_equal(grids[0], grids[1])  # trained between the two
    ok(run(script("image_sample.py", f"{NET} --model_path {log_dir / 'ema_0.9_000002.pt'} --training_mode edm "
                  f"--sampler heun --steps 3 --seed 0 --num_samples 64 --batch_size 64 "
                  f"--logging_dir {tmp_path / 's'}")))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "s" / "samples_64x8x8x3.png")), grids[1])


def fid_py(sample_npz, ref, inception, batch_size):
    out = tmp_json = sample_npz + ".json"
    ok(run([os.path.join(SCRIPTS, "fid.py"), "--sample_npz", sample_npz, "--ref", ref, "--inception_path", inception,
            "--batch_size", str(batch_size), "--splits", "2", "--device", "cpu", "--progress", "False",
            "--json", tmp_json]))
    return json.load(open(out))["fid"]


def test_in_loop_fid_equals_fid_py_and_two_processes_equal_one(data, random_inception, tmp_path):
    """EDM run, random-weight Inception: logged fid_heun = fid.py(image_sample.py npz), 1 and 2 processes.

    --lr 0 keeps the weights at their seeded initialisation, so a 2-process
    run evaluates the same EMA weights as the 1-process run.
    """
    n, steps = 6, 2
    flags = (f"{SMALL} --data_dir {data / 'train'} --total_training_steps 2 --save_interval 2 --lr 0 "
             f"--eval_interval 2 --eval_num_samples {n} --eval_steps {steps} --eval_batch_size 4 "
             f"--eval_ref {data / 'ref.npz'} --inception_path {random_inception} --ema_rate 0.9")
    ok(run(script("edm_train.py", f"{flags} --logging_dir {tmp_path / 'one'}")))
    logged = float(progress_rows(tmp_path / "one", drop_eval=False)[-1]["fid_heun"])
    ok(run(script("image_sample.py", f"{NET} --model_path {tmp_path / 'one' / 'ema_0.9_000002.pt'} "
                  f"--training_mode edm --sampler heun --steps {steps} --seed 0 --num_samples {n} --batch_size 5 "
                  f"--logging_dir {tmp_path / 's'}")))
    reference = fid_py(str(tmp_path / "s" / f"samples_{n}x8x8x3.npz"), str(data / "ref.npz"), random_inception, 4)
    assert np.isfinite(logged) and logged > 0
    assert abs(logged - reference) <= 1e-6 * max(1.0, abs(reference)), (logged, reference)
    assert MPIEXEC is not None, "2 processes need mpiexec: the test install (pip install mpich) provides it"
    two_processes = (MPIEXEC, "-n", "2", sys.executable)
    ok(run(script("edm_train.py", f"{flags} --logging_dir {tmp_path / 'two'}"), prefix=two_processes))
    two = float(progress_rows(tmp_path / "two", drop_eval=False)[-1]["fid_heun"])
    assert abs(two - logged) <= 1e-6 * max(1.0, abs(logged)), (two, logged)
    grids = [np.asarray(Image.open(tmp_path / d / "samples_000002.png")) for d in ("one", "two")]
    assert np.array_equal(*grids)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("--eval_interval 2", "--eval_interval needs --eval_ref"),
        ("--eval_interval 2 --eval_ref REF --inception_path MISSING", "missing.pth"),
        ("--eval_interval 2 --eval_ref MISSING --eval_features FEATS", "--eval_ref"),
        ("--eval_interval 2 --eval_ref REF --eval_features MISSING", "--eval_features"),
        ("--eval_interval 2 --eval_ref REF --eval_features FEATS --eval_ema 0.5", "--eval_ema 0.5"),
        ("--eval_ref REF", "only used with --eval_interval"),
        ("--eval_interval -1", "--eval_interval"),
    ],
)
def test_setup_failures_are_one_line_at_start_up(data, feature_net, tmp_path, extra, message):
    log_dir = tmp_path / "logs"
    extra = extra.replace("REF", str(data / "ref.npz")).replace("FEATS", feature_net)
    extra = extra.replace("MISSING", str(tmp_path / "missing.pth"))
    proc = run(script("edm_train.py", f"{SMALL} --data_dir {data / 'train'} --total_training_steps 2 "
                      f"--logging_dir {log_dir} {extra}"))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr and message in lines[0], proc.stderr
    assert not log_dir.exists()


# ----------------------------------------------------------------------------
# scripts/plot_progress.py


def test_smooth_is_a_debiased_moving_average():
    from cm.tools.progress_plot import smooth

    np.testing.assert_allclose(smooth(np.full(50, 3.0)), 3.0)  # debiased: no ramp up from 0
    y = smooth(np.array([1.0, np.nan, 1.0, 5.0]), span=1.0)
    assert y[0] == 1.0 and y[1] == 1.0 and 1.0 < y[3] < 5.0


def test_plot_progress_draws_every_panel_of_real_runs(ct_runs, tmp_path):
    pytest.importorskip("matplotlib")  # the [plot] extra (in [test] too)
    from cm.tools.progress_plot import write_progress_plot

    plain, evald = ct_runs
    out = tmp_path / "plot.png"
    boxes = write_progress_plot([evald, plain], out, names=["with eval", "without"])
    assert len(boxes) == 6 and any(t.startswith("FID") for t in boxes)
    image = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert image.shape == (3 * 360, 2 * 640, 3)
    for title, (x0, y0, x1, y1) in boxes.items():
        panel = image[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2]
        coloured = (panel.max(-1) - panel.min(-1)) > 60  # lines are coloured, frame and text grey
        assert coloured.sum() > 30, title
    # a folder without progress.csv: one line, no PNG
    proc = run([os.path.join(SCRIPTS, "plot_progress.py"), str(evald), str(tmp_path), "--out", str(tmp_path / "x.png")])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "no progress.csv" in lines[0] and str(tmp_path) in lines[0]
    assert not (tmp_path / "x.png").exists()
    # the script itself on both runs
    ok(run([os.path.join(SCRIPTS, "plot_progress.py"), str(evald), str(plain), "--out", str(tmp_path / "y.png")]))
    assert Image.open(tmp_path / "y.png").size == (1280, 1080)


def test_training_scripts_do_not_import_matplotlib():
    for name in ("edm_train.py", "cm_train.py"):
        probe = (f"import sys, importlib.util; path = {os.path.join(SCRIPTS, name)!r}; "
                 "spec = importlib.util.spec_from_file_location('s', path); "
                 "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
                 "import cm.train_util, cm.train_eval; print('matplotlib' in sys.modules)")
        proc = ok(run(["-c", probe]))
        assert proc.stdout.strip() == "False", name
