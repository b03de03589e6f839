"""scripts/image_edit.py end to end: every task on PNG files and on an .npz, 1 and 2 processes, bad input.

One-process runs call the script's ``main`` in this process (one thread, like an
mpiexec rank); the two-process runs of all six tasks are one mpiexec launch
(tests/dist_scripts/edit_tasks.py), started first so that it overlaps.
"""

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from cm.cli import run_cli
from cm.script_util import create_model

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))
from edit_tasks import TASK_FLAGS  # noqa: E402
from launchers import MPIEXEC  # noqa: E402
from test_image_sample import one_thread  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HAVE_MPIEXEC = MPIEXEC is not None
JOB_TIMEOUT_S = 400
TINY = dict(
    image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
    num_head_channels=16, class_cond=True, use_scale_shift_norm=True, resblock_updown=True,
)  # fmt: skip
TINY_FLAGS = [x for k, v in TINY.items() for x in (f"--{k}", str(v))]
CLASSES = ["bird", "cat", "dog"]  # class ids 0, 1, 2 (sorted names)
N_IMAGES = 5


def _load_image_edit():
    spec = importlib.util.spec_from_file_location("image_edit", ROOT / "scripts" / "image_edit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


image_edit = _load_image_edit()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny random checkpoint, 5 PNGs '<class>_<i>.png', the same images as an image_sample-style .npz."""
    d = tmp_path_factory.mktemp("edit_data")
    g = torch.Generator().manual_seed(0)
    sd = create_model(**TINY).state_dict()
    for v in sd.values():  # replace the zero-initialised convs too
        fan_in = v[0].numel() if v.ndim > 1 else 1
        v.copy_(torch.randn(v.shape, generator=g) * (0.5 / fan_in**0.5 if v.ndim > 1 else 0.1))
    torch.save(sd, d / "tiny.pt")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N_IMAGES, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 0, 1, 2, 2])  # file names sort in index order
    (d / "imgs").mkdir()
    for i, (img, y) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(d / "imgs" / f"{CLASSES[y]}_{i:03d}.png")
    np.savez(d / "samples_5x8x8x3.npz", images, labels)
    (d / "empty").mkdir()
    (d / "big").mkdir()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / "big" / "cat_0.png")
    Image.fromarray(np.full((16, 16), 255, dtype=np.uint8)).save(d / "mask16.png")
    mask = np.full((8, 8), 255, dtype=np.uint8)
    mask[2:5, 1:7] = 0
    Image.fromarray(mask).save(d / "mask8.png")
    return {"dir": d, "ckpt": str(d / "tiny.pt"), "images": images, "labels": labels}


def common_flags(data, batch_size):
    return TINY_FLAGS + ["--model_path", data["ckpt"], "--steps", "4", "--ts", "0,2,3", "--seed", "7",
                         "--batch_size", str(batch_size)]  # fmt: skip


def _env(tmp):
    dropped = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OPENAI_LOGDIR")
    env = {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith(("PMI_", "OMPI_", "PMIX_"))}
    env.update(TMPDIR=str(tmp), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


@pytest.fixture(scope="module")
def mpi_run(data, tmp_path_factory):
    """All six tasks under mpiexec -n 2 (batch 2 per process) on the PNG folder; yields the output root."""
    if not HAVE_MPIEXEC:
        yield None
        return
    out = tmp_path_factory.mktemp("edit_mpi")
    cmd = [MPIEXEC, "-n", "2", sys.executable, str(ROOT / "tests" / "dist_scripts" / "edit_tasks.py"), str(out), "--",
           "--input", str(data["dir"] / "imgs"), *common_flags(data, 2)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    start = time.monotonic()

    def wait():
        try:
            o, e = proc.communicate(timeout=max(1.0, JOB_TIMEOUT_S - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            pytest.fail(f"mpiexec edit run hung: {cmd}")
        assert proc.returncode == 0, f"{cmd}\n{o}\n{e}"
        return out

    yield wait
    if proc.poll() is None:
        os.killpg(proc.pid, 9)


@pytest.fixture(scope="module")
def in_process():
    """Run image_edit.main here on one thread; the process group it creates is removed afterwards."""
    had_group = dist.is_available() and dist.is_initialized()

    def run(argv):
        with one_thread():
            return run_cli(image_edit.main, argv)

    yield run
    if not had_group and dist.is_initialized():
        dist.destroy_process_group()


def load(folder, task, n):
    path = Path(folder) / f"{task}_{n}x8x8x3.npz"
    with np.load(path) as z:
        return {k: z[k] for k in z.files}, path.read_bytes()


@pytest.fixture(scope="module")
def one_process(data, in_process, mpi_run, tmp_path_factory):
    """Each task twice in this process: PNG folder at batch 3, the .npz at batch 1."""
    out = tmp_path_factory.mktemp("edit_one")
    for task, flags in TASK_FLAGS.items():
        for name, source, batch in (("png_b3", "imgs", 3), ("npz_b1", "samples_5x8x8x3.npz", 1)):
            argv = common_flags(data, batch) + ["--task", task, *flags, "--input", str(data["dir"] / source),
                                                "--logging_dir", str(out / name / task)]  # fmt: skip
            assert in_process(argv) == 0
    return out


@pytest.mark.parametrize("task", list(TASK_FLAGS))
def test_each_task_same_result_for_png_npz_batch_and_world_size(task, data, one_process, mpi_run):
    n = 6 if task == "interpolate" else N_IMAGES
    z, raw = load(one_process / "png_b3" / task, task, n)
    _, raw_npz = load(one_process / "npz_b1" / task, task, n)
    assert raw_npz == raw, "the .npz input at batch 1 differs from the PNG folder at batch 3"
    if mpi_run is not None:
        _, raw_mpi = load(mpi_run() / task, task, n)
        assert raw_mpi == raw, "mpiexec -n 2 at batch 2 differs from one process"
    results = z["arr_0"]
    assert results.shape == (n, 8, 8, 3) and results.dtype == np.uint8 and results.std() > 5
    grid = np.asarray(Image.open(one_process / "png_b3" / task / f"{task}_{n}x8x8x3.png"))
    if task == "interpolate":
        assert sorted(z) == ["alphas", "arr_0", "arr_1", "pairs"]
        assert z["pairs"].tolist() == [0, 0, 0, 1, 1, 1] and z["alphas"].tolist() == [0, 0.5, 1] * 2
        assert grid.shape == (2 * 8, 3 * 8, 3)  # one row per pair
        assert np.array_equal(grid[8:16, 16:24], results[5])
        return
    assert np.array_equal(z["inputs"], data["images"]) and z["arr_1"].tolist() == data["labels"].tolist()
    assert grid.shape == (3 * 8, 8 * 8, 3)  # rows input / degraded / result
    for row, part in enumerate((z["inputs"], z["degraded"], results)):
        assert np.array_equal(grid[row * 8 : row * 8 + 8, 8:16], part[1])
    x, deg = z["inputs"].astype(int), z["degraded"].astype(int)
    if task == "inpaint":
        assert sorted(z) == ["arr_0", "arr_1", "degraded", "inputs", "masks"]
        assert (z["masks"][:, :, :4] == 1).all() and (z["masks"][:, :, 4:] == 0).all()
        assert np.array_equal(results[:, :, :4], z["inputs"][:, :, :4]) and (deg[:, :, 4:] == 0).all()
    elif task == "superres":  # 4×4 block means kept (to within uint8 rounding)
        pool = lambda a: a.reshape(n, 2, 4, 2, 4, 3).mean((2, 4))  # noqa: E731
        assert np.abs(pool(results.astype(float)) - pool(x)).max() <= 1.0
    elif task == "colorize":
        luma = lambda a: a @ np.array([0.2989, 0.5870, 0.1140])  # noqa: E731
        inside = ((results > 0) & (results < 255)).all(-1)  # saturated chroma is clipped at the end
        assert inside.mean() > 0.3 and np.abs(luma(results.astype(float)) - luma(x))[inside].max() <= 1.0
    elif task == "denoise":  # degraded = inputs + 0.3 noise (in [-1, 1] units, ~38 levels), clipped
        assert 20 < np.std(deg - x) < 50
    elif task == "stroke":  # the stroke input is shown as it was given
        assert np.array_equal(z["degraded"], z["inputs"]) or np.abs(deg - x).max() <= 1


def test_mask_png_and_box_preset(data, in_process, tmp_path):
    for mask in (str(data["dir"] / "mask8.png"), "box:1,2,7,5"):
        out = tmp_path / mask.replace("/", "_").replace(":", "_")
        argv = common_flags(data, 2) + ["--task", "inpaint", "--mask", mask, "--input", str(data["dir"] / "imgs"),
                                        "--logging_dir", str(out)]  # fmt: skip
        assert in_process(argv) == 0
        z, _ = load(out, "inpaint", N_IMAGES)
        hole = np.zeros((8, 8), bool)
        hole[2:5, 1:7] = True
        assert np.array_equal(z["masks"][0] == 0, hole)
        assert np.array_equal(z["arr_0"][:, ~hole], data["images"][:, ~hole])


ERRORS = {
    "mask-size": (["--task", "inpaint", "--mask", "{dir}/mask16.png"], "--mask: {dir}/mask16.png is 16x16, the images are 8x8"),
    "unknown-preset": (["--task", "inpaint", "--mask", "middle"], "--mask 'middle' is neither a preset"),
    "bad-box": (["--task", "inpaint", "--mask", "box:0,0,9,4"], "--mask box:0,0,9,4: need 0 <= x0 < x1 <= 8"),
    "empty-folder": (["--task", "colorize", "--input", "{dir}/empty"], "--input: no jpg/jpeg/png/gif images in {dir}/empty"),
    "wrong-size": (["--task", "colorize", "--input", "{dir}/big"], "is 16x16, the model takes 8x8 RGB (--image_size)"),
    "no-input": (["--task", "stroke", "--input", ""], "--task stroke needs --input"),
    "strength": (["--task", "stroke", "--strength", "100"], "--strength must lie in (0.002, 80], got 100"),
    "sigmas-and-ts": (["--task", "denoise", "--sigmas", "1,0.5"], "give either --ts or --sigmas, not both"),
    "edm-mode": (["--task", "denoise", "--training_mode", "edm"], "--training_mode must be one of"),
}  # fmt: skip
ARGPARSE_ERRORS = {
    "unknown-task": (["--task", "deblur"], "argument --task: invalid choice: 'deblur'"),
    "factor-3": (["--task", "superres", "--factor", "3"], "argument --factor: invalid choice: 3 (choose from 2, 4)"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ERRORS) + list(ARGPARSE_ERRORS))
def test_bad_input_is_one_line_and_writes_nothing(name, data, in_process, tmp_path, capsys):
    extra, message = {**ERRORS, **ARGPARSE_ERRORS}[name]
    fill = lambda s: s.replace("{dir}", str(data["dir"]))  # noqa: E731
    out = tmp_path / "out"
    argv = common_flags(data, 2) + ["--input", str(data["dir"] / "imgs"), *map(fill, extra), "--logging_dir", str(out)]
    if name in ARGPARSE_ERRORS:
        with pytest.raises(SystemExit) as e:
            in_process(argv)
        assert e.value.code == 2
    else:
        assert in_process(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fill(message) in err[0], err
    assert not out.exists(), "an error run created the logging dir"


def test_sigmas_flag_sets_the_levels(data, in_process, tmp_path):
    out = tmp_path / "out"
    argv = common_flags(data, 5)[:-6] + ["--seed", "7", "--batch_size", "5", "--task", "denoise", "--noise_sigma", "0.5",
                                         "--sigmas", "80,0.2", "--input", str(data["dir"] / "imgs"),
                                         "--logging_dir", str(out)]  # fmt: skip
    assert in_process(argv) == 0
    assert "denoise: 5 images, σ = 0.5, 0.2, 0.002" in (out / "log.txt").read_text()


def test_interpolation_pairs_take_fixed_class_labels(data, in_process, tmp_path):
    out = tmp_path / "out"
    argv = common_flags(data, 4) + ["--task", "interpolate", "--num_images", "2", "--num_points", "3",
                                    "--class_labels", "4,6", "--logging_dir", str(out)]  # fmt: skip
    assert in_process(argv) == 0
    z, _ = load(out, "interpolate", 6)
    assert z["arr_1"].tolist() == [4, 4, 4, 6, 6, 6]
