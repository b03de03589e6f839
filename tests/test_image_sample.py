"""scripts/image_sample.py and cm/sample_util.py: golden samples, reproducibility, checkpoints, errors.

Script runs are real processes (plain, mpiexec, torchrun), started together by a
module fixture so they overlap; each has a timeout so a hang fails instead of
stalling the suite. Runs compared byte for byte use one thread each, as every
mpiexec rank does, so all of them execute the same float kernels.
"""

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import golden
from launchers import MPIEXEC
from cm.checkpoint import strip_wrapper_prefix
from cm.cli import UsageError
from cm.karras_diffusion import karras_sample
from cm.random_util import get_generator
from cm.samplers import SAMPLERS
from cm.sample_util import (
    CheckpointMismatch,
    batch_indices,
    image_grid,
    label_seed,
    load_model_state,
    parse_class_labels,
    parse_ts,
    sample_images,
    samples_filename,
    save_npz,
    uses_distillation,
)
from cm.script_util import create_model, create_model_and_diffusion, model_and_diffusion_defaults

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "image_sample.py"
JOB_TIMEOUT_S = 400
HAVE_MPIEXEC = MPIEXEC is not None

UNET_A = golden.load_cases()["configs"]["unet_a"]
GOLDEN_FLAGS = [
    "--image_size", "32", "--num_channels", "32", "--num_res_blocks", "1",
    "--attention_resolutions", "16,8", "--num_head_channels", "8", "--class_cond", "True",
    "--use_scale_shift_norm", "True", "--resblock_updown", "True",
    "--steps", "5", "--num_samples", "4", "--batch_size", "4", "--seed", "42", "--generator", "determ",
]  # fmt: skip
GOLDEN_LABELS = ["--class_labels", "1,3,5,7"]  # inputs["sample_y"] of the golden cases
CD = ["--training_mode", "consistency_distillation"]

# A small random network on 8×8 images: fast, and every weight non-trivial.
TINY = dict(
    image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
    num_head_channels=16, class_cond=True, use_scale_shift_norm=True, resblock_updown=True,
)  # fmt: skip
TINY_FLAGS = [x for k, v in TINY.items() for x in (f"--{k}", str(v))]
TINY_RUN = TINY_FLAGS + ["--steps", "4", "--num_samples", "10", "--seed", "7"]
TINY_NPZ = "samples_10x8x8x3.npz"


# ----------------------------------------------------------------------------
# Jobs


def _env(tmp, **extra):
    """A clean environment: no launcher variables, one thread, temp files under ``tmp``."""
    dropped = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OPENAI_LOGDIR")
    env = {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith(("PMI_", "OMPI_", "PMIX_"))}
    env.update(TMPDIR=str(tmp), OMP_NUM_THREADS="1", **extra)
    return env


class Job:
    """A launched image_sample.py; ``result()`` waits and returns (rc, stdout, stderr, logging dir)."""

    def __init__(self, tmp, args, launcher="plain"):
        self.out = Path(tmp) / "out"
        prefix = {
            "plain": [sys.executable],
            "mpi": [MPIEXEC, "-n", "2", sys.executable],
            "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
        }[launcher]
        self.cmd = prefix + [str(SCRIPT), *map(str, args), "--logging_dir", str(self.out)]
        self.start = time.monotonic()
        self.proc = subprocess.Popen(
            self.cmd, cwd=ROOT, env=_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        self._result = None

    def result(self):
        if self._result is None:
            left = max(1.0, JOB_TIMEOUT_S - (time.monotonic() - self.start))
            try:
                out, err = self.proc.communicate(timeout=left)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                out, err = self.proc.communicate()
                pytest.fail(f"job hung for {JOB_TIMEOUT_S}s: {self.cmd}\n{out}\n{err}")
            self._result = (self.proc.returncode, out, err, self.out)
        return self._result

    def ok(self):
        rc, out, err, folder = self.result()
        assert rc == 0, f"{self.cmd}\n{out}\n{err}"
        return out, err, folder


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Golden unet_a weights (plain, DDP 'module.' and compiled '_orig_mod.' keys) and the tiny net."""
    d = tmp_path_factory.mktemp("ckpt")
    sd = golden.golden_state_dict("unet_a")
    torch.save(sd, d / "unet_a.pt")
    torch.save({"module." + k: v for k, v in sd.items()}, d / "unet_a_ddp.pt")
    torch.save({"_orig_mod." + k: v for k, v in sd.items()}, d / "unet_a_compiled.pt")
    g = torch.Generator().manual_seed(0)
    tiny = create_model(**TINY).state_dict()
    for k, v in tiny.items():  # replace the zero-initialised convs too
        fan_in = v[0].numel() if v.ndim > 1 else 1
        v.copy_(torch.randn(v.shape, generator=g) * (0.5 / fan_in**0.5 if v.ndim > 1 else 0.1))
    torch.save(tiny, d / "tiny.pt")
    torch.save({"module." + k: v for k, v in tiny.items()}, d / "tiny_ddp.pt")
    return {p.stem: str(p) for p in d.iterdir()}


ERROR_CASES = {
    "ts-not-int": (["--sampler", "multistep", "--ts", "0,x,3"], "--ts must be a comma list of integers"),
    "ts-not-ascending": (["--sampler", "multistep", "--ts", "0,3,2"], "--ts must be strictly ascending"),
    "ts-out-of-range": (["--sampler", "multistep", "--ts", "0,2,4"], "--ts indices must lie in [0, 3]"),
    "ts-missing": (["--sampler", "multistep"], "--sampler multistep needs --ts"),
    "unknown-sampler": (["--sampler", "lms"], "argument --sampler: invalid choice: 'lms'"),
    "missing-model": (["--model_path", "/nonexistent/model.pt"], "checkpoint not found: /nonexistent/model.pt"),
    "mismatch": (["--num_channels", "64"], "time_embed.0.weight has shape (128, 32) in the checkpoint, (256, 64) in the model"),
}  # fmt: skip


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, ckpts):
    """Every script run of this module, started at once, by name."""
    t = tmp_path_factory.mktemp
    a, a_ddp, a_comp = ckpts["unet_a"], ckpts["unet_a_ddp"], ckpts["unet_a_compiled"]
    runs = {
        # golden reproductions (labels fixed to the golden [1,3,5,7])
        "heun": (GOLDEN_FLAGS + GOLDEN_LABELS + ["--model_path", a, "--use_fp16", "True"], "plain"),
        "onestep": (GOLDEN_FLAGS + GOLDEN_LABELS + CD + ["--sampler", "onestep", "--model_path", a_ddp], "plain"),
        "multistep": (GOLDEN_FLAGS + GOLDEN_LABELS + CD + ["--sampler", "multistep", "--ts", "0,2,4", "--model_path", a_comp], "plain"),
        # labels from the label stream; noise must still be the golden stream
        "onestep-drawn": (GOLDEN_FLAGS + CD + ["--sampler", "onestep", "--model_path", a], "plain"),
        # one command, four batch/world layouts
        "b4": (TINY_RUN + ["--batch_size", "4", "--model_path", ckpts["tiny"]], "plain"),
        "b8-ddp": (TINY_RUN + ["--batch_size", "8", "--model_path", ckpts["tiny_ddp"]], "plain"),
        "torchrun": (TINY_RUN + ["--batch_size", "4", "--model_path", ckpts["tiny"]], "torchrun"),
    }  # fmt: skip
    if HAVE_MPIEXEC:
        runs["mpi"] = (TINY_RUN + ["--batch_size", "3", "--model_path", ckpts["tiny"]], "mpi")
    for name, (extra, expected) in ERROR_CASES.items():
        model = [] if "--model_path" in extra else ["--model_path", ckpts["tiny"]]
        runs["err-" + name] = (TINY_RUN + ["--batch_size", "4"] + model + extra, "plain")
    started = {name: Job(t(name), args, launcher) for name, (args, launcher) in runs.items()}
    yield started
    for job in started.values():
        if job.proc.poll() is None:
            os.killpg(job.proc.pid, 9)


@contextlib.contextmanager
def one_thread():
    """Run in-process work on one thread (like the script jobs), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def golden_uint8(x):
    return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def assert_uint8_close(got, exp):
    """The golden uint8 tolerance: |Δ| ≤ 1 on ≥ 99.9 % of values."""
    assert got.shape == exp.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - exp.astype(np.int16))
    assert (diff <= 1).mean() >= 0.999, f"max |Δ| {diff.max()}, {(diff > 1).sum()} values off by more than 1"


def load_npz(folder, name="samples_4x32x32x3.npz"):
    with np.load(Path(folder) / name) as z:
        return {k: z[k] for k in z.files}


# ----------------------------------------------------------------------------
# Golden samples through the script


def test_heun_reproduces_golden_uint8(jobs):
    out, err, folder = jobs["heun"].ok()
    z = load_npz(folder)
    assert sorted(z) == ["arr_0", "arr_1"]
    assert_uint8_close(z["arr_0"], golden.expected()["sample_heun_uint8"]["uint8_nhwc"].numpy())
    assert z["arr_1"].tolist() == [1, 3, 5, 7]
    # --use_fp16 True on a CPU: one warning, float32 run (the match above)
    assert "needs a CUDA device" in err and "running in float32" in err
    npz = folder / "samples_4x32x32x3.npz"
    assert f"saved 4 samples to {npz}" in out
    assert f"saved 4 samples to {npz}" in (folder / "log.txt").read_text()
    grid = Image.open(folder / "samples_4x32x32x3.png")
    assert grid.size == (4 * 32, 32) and grid.mode == "RGB"
    assert np.array_equal(np.asarray(grid)[:, 32:64], z["arr_0"][1])
    assert not [p for p in os.listdir(folder) if p.endswith(".tmp")], "temp files left behind"
    assert "sampling" in err  # tqdm progress bar


@pytest.mark.parametrize("name", ["onestep", "multistep"])
def test_consistency_samplers_reproduce_golden(jobs, name):
    """onestep from a DDP checkpoint ('module.'), multistep from a compiled one ('_orig_mod.')."""
    out, _, folder = jobs[name].ok()
    z = load_npz(folder)
    assert_uint8_close(z["arr_0"], golden_uint8(golden.expected()[f"sample_{name}"]["x0"]))
    prefix = {"onestep": "module.", "multistep": "_orig_mod."}[name]
    assert f"wrapper prefix {prefix!r}" in out


def test_drawn_labels_leave_the_golden_noise_stream_untouched(jobs):
    """Labels come from their own seeded stream: x_T is exactly the golden generator's."""
    _, _, folder = jobs["onestep-drawn"].ok()
    z = load_npz(folder)
    expected_labels = get_generator("determ", 4, label_seed(42)).randint(0, 10, (4,))
    assert z["arr_1"].tolist() == expected_labels.tolist()
    kw = model_and_diffusion_defaults()
    kw.update(UNET_A, distillation=True)
    model, diffusion = create_model_and_diffusion(**kw)
    model.load_state_dict(golden.golden_state_dict("unet_a"))
    model.eval()
    with one_thread():
        x = karras_sample(
            diffusion, model, (4, 3, 32, 32), steps=5, model_kwargs={"y": torch.from_numpy(z["arr_1"])},
            sampler="onestep", generator=get_generator("determ", 4, 42),
        )  # fmt: skip
    assert_uint8_close(z["arr_0"], golden_uint8(x))


# ----------------------------------------------------------------------------
# Same command → same bytes


def test_same_npz_for_any_batch_size_and_world_size(jobs):
    """batch 4 / batch 8 (DDP checkpoint) / torchrun 2×4 / mpiexec 2×3, 10 samples: identical files."""
    names = ["b4", "b8-ddp", "torchrun"] + (["mpi"] if HAVE_MPIEXEC else [])
    files = {n: (jobs[n].ok()[2] / TINY_NPZ).read_bytes() for n in names}
    z = load_npz(jobs["b4"].ok()[2], TINY_NPZ)
    assert z["arr_0"].shape == (10, 8, 8, 3) and z["arr_1"].shape == (10,)
    assert z["arr_0"].std() > 10 and len(set(z["arr_1"].tolist())) > 1  # real images, drawn labels
    for n in names[1:]:
        assert files[n] == files["b4"], f"{n} differs from b4"


def test_sample_images_batch_invariant_in_process(tiny_model):
    """Both seeded generators, batch sizes 3 and 10 (padding, one batch): same images and labels."""
    model, diffusion = tiny_model
    with one_thread():
        for gen in ("determ", "determ-indiv"):
            common = dict(num_samples=7, image_size=8, steps=3, sampler="euler", generator=gen, seed=5,
                          class_cond=True, progress=False)  # fmt: skip
            a, la = sample_images(model, diffusion, batch_size=3, **common)
            b, lb = sample_images(model, diffusion, batch_size=10, **common)
            assert a.shape == (7, 8, 8, 3) and np.array_equal(la, lb) and np.array_equal(a, b), gen
            fixed, lf = sample_images(model, diffusion, batch_size=3, class_labels=[2, 9], **common)
            assert lf.tolist() == [2, 9, 2, 9, 2, 9, 2]


@pytest.fixture(scope="module")
def tiny_model(ckpts):
    model, diffusion = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **TINY})
    model.load_state_dict(torch.load(ckpts["tiny"], weights_only=True))
    return model.eval(), diffusion


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs_through_sample_images(tiny_model, sampler):
    model, diffusion = tiny_model
    ts = [0, 1, 2] if sampler == "multistep" else None
    with one_thread():
        images, labels = sample_images(
            model, diffusion, num_samples=3, batch_size=2, image_size=8, steps=3, sampler=sampler, ts=ts,
            class_cond=True, progress=False, s_churn=0.5,
        )  # fmt: skip
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8 and labels.shape == (3,)


def test_training_mode_chooses_the_scalings():
    assert [uses_distillation(m) for m in ("edm", "consistency_distillation", "consistency_training", "progdist")] == [
        False, True, True, False,
    ]  # fmt: skip


# ----------------------------------------------------------------------------
# Errors: one line, non-zero exit, nothing written


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_user_errors_are_one_line(jobs, name):
    rc, out, err, folder = jobs["err-" + name].result()
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("image_sample.py: error: ") and ERROR_CASES[name][1] in lines[0], lines[0]
    assert not folder.exists(), "an error run created the logging dir"


def test_ts_parsing():
    assert parse_ts("0,22,39", 40) == [0, 22, 39]
    assert parse_ts(" 0, 39", 40) == [0, 39]
    assert parse_ts("", 40, "heun") is None
    for bad, msg in [
        ("0,1.5", "comma list of integers"), ("0,,3", "comma list of integers"), ("3", "at least two"),
        ("0,5,5", "strictly ascending"), ("-1,3", "[0, 39]"), ("0,40", "[0, 39]"), ("", "needs --ts"),
    ]:  # fmt: skip
        with pytest.raises(UsageError, match=None) as e:
            parse_ts(bad, 40)
        assert msg in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UsageError, match="only used by --sampler multistep"):
        parse_ts("0,3", 40, "onestep")


def test_class_labels_parsing():
    assert parse_class_labels("", True) is None
    assert parse_class_labels("1,3,5,7", True) == [1, 3, 5, 7]
    with pytest.raises(UsageError, match="needs --class_cond True"):
        parse_class_labels("1", False)
    with pytest.raises(UsageError, match=r"\[0, 9\], got 10"):
        parse_class_labels("1,10", True)


# ----------------------------------------------------------------------------
# Checkpoint keys


def test_strip_wrapper_prefix():
    model_keys = ["input_blocks.0.0.weight", "out.2.bias", "time_embed.0.weight"]
    sd = {k: i for i, k in enumerate(model_keys)}
    assert strip_wrapper_prefix(sd, model_keys) == (sd, "")
    for prefix in ("module.", "_orig_mod.", "model.", "module._orig_mod."):
        got, removed = strip_wrapper_prefix({prefix + k: v for k, v in sd.items()}, model_keys)
        assert got == sd and removed == prefix
    # a shared first component that is part of the model's own names is kept
    blocks = ["input_blocks.0.weight", "input_blocks.1.weight"]
    assert strip_wrapper_prefix({k: 0 for k in blocks}, blocks)[1] == ""
    # keys that share nothing stay as they are (and will fail the strict load)
    odd = {"module.a": 0, "b": 1}
    assert strip_wrapper_prefix(odd, model_keys) == (odd, "")


def test_load_model_state_errors_name_key_and_shapes():
    model = create_model(**TINY)
    sd = model.state_dict()
    assert load_model_state(model, {"module." + k: v for k, v in sd.items()}, "ckpt.pt") == "module."
    bad = dict(sd, **{"out.2.weight": torch.zeros(3, 16, 3, 3)})
    with pytest.raises(CheckpointMismatch) as e:
        load_model_state(model, bad, "ckpt.pt")
    assert "out.2.weight has shape (3, 16, 3, 3) in the checkpoint, (3, 32, 3, 3) in the model" in str(e.value)
    missing = {k: v for k, v in sd.items() if k != "label_emb.weight"}
    with pytest.raises(CheckpointMismatch, match=r"key label_emb.weight missing from the checkpoint \(model: \(10, 128\)\)"):
        load_model_state(model, missing, "ckpt.pt")
    with pytest.raises(CheckpointMismatch, match=r"unexpected key extra \(checkpoint: \(2,\)\)"):
        load_model_state(model, dict(sd, extra=torch.zeros(2)), "ckpt.pt")
    with pytest.raises(CheckpointMismatch, match="expected a state_dict, found a list"):
        load_model_state(model, [1, 2], "ckpt.pt")
    for err in (bad, missing):  # one line, whatever the message
        with pytest.raises(CheckpointMismatch) as e:
            load_model_state(model, err, "ckpt.pt")
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------
# Output helpers


def test_save_npz_is_loadable_atomic_and_byte_stable(tmp_path):
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    labels = np.array([3, 1])
    path = tmp_path / samples_filename(images)
    assert path.name == "samples_2x4x4x3.npz"
    save_npz(path, {"arr_0": images, "arr_1": labels})
    first = path.read_bytes()
    time.sleep(2.1)  # a zip time stamp has 2 s resolution
    save_npz(path, {"arr_0": images, "arr_1": labels})
    assert path.read_bytes() == first
    with np.load(path) as z:
        assert z.files == ["arr_0", "arr_1"]
        assert np.array_equal(z["arr_0"], images) and np.array_equal(z["arr_1"], labels)
    assert os.listdir(tmp_path) == [path.name]


def test_image_grid_and_batch_indices():
    imgs = np.stack([np.full((2, 2, 3), i, np.uint8) for i in range(10)])
    g = image_grid(imgs, columns=8)
    assert g.shape == (4, 16, 3) and g[2, 2, 0] == 9 and g[2, 4, 0] == 0  # empty cells black
    assert batch_indices(6, 4, 1, 2, 10).tolist() == [7, 9, 9, 9]
