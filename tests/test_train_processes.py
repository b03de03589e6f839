"""cm_train.py / edm_train.py in several real processes: 2 processes × batch b make the
update of 1 process × 2b (mpiexec and torchrun), the loss-second-moment sampler stays
in step across 2 processes over a few hundred steps, and an error on one rank only
ends every rank with one line. The runs start together and are waited for together."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cm.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from launchers import MPIEXEC

pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="needs mpiexec (on PATH or next to sys.executable)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(ROOT, "tests", "train_scripts")
NET = dict(image_size=8, channel_mult="1,2", attention_resolutions="4", num_channels=32, num_res_blocks=1)
NET_FLAGS = [x for k, v in NET.items() for x in (f"--{k}", str(v))] + ["--dropout", "0.0", "--log_interval", "1"]
CD_FLAGS = [
    "--training_mode", "consistency_distillation", "--target_ema_mode", "fixed", "--start_ema", "0.9",
    "--scale_mode", "fixed", "--start_scales", "2", "--end_scales", "2", "--loss_norm", "l2",
    "--teacher_dropout", "0.0", "--ema_rate", "0.9", "--lr", "0.001", "--total_training_steps", "2",
    "--save_interval", "2", "--weight_schedule", "uniform", "--global_batch_size", "4",
]  # fmt: skip
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def env():
    e = {k: v for k, v in os.environ.items() if k not in ("OPENAI_LOGDIR", "CM_NO_GRAD_SYNC", "RANK", "WORLD_SIZE")}
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def write_images(folder, n, corrupt=()):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        name = f"{chr(ord('a') + i)}.png"
        if name in corrupt:
            (folder / name).write_bytes(b"not a png")
        else:
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every job at once; {name: (returncode, stdout, stderr, out_dir)}."""
    tmp = tmp_path_factory.mktemp("procs")
    torch.manual_seed(3)
    teacher, _ = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **NET})
    torch.save(teacher.state_dict(), tmp / "teacher.pt")
    data = write_images(tmp / "data", 8)
    bad = write_images(tmp / "bad", 4, corrupt=("b.png",))  # sorted index 1: rank 1's shard only
    split = os.path.join(HARNESS, "split_batch.py")
    dump = os.path.join(HARNESS, "run_and_dump.py")

    def cd(name, *extra):
        return [split, str(tmp / name), "4", "cm_train", *NET_FLAGS, *CD_FLAGS, "--data_dir", str(data),
                "--teacher_model_path", str(tmp / "teacher.pt"), "--logging_dir", str(tmp / name / "logs"), *extra]

    jobs = {
        "one": [sys.executable, *cd("one", "--microbatch", "1")],
        "mpi": [MPIEXEC, "-n", "2", sys.executable, *cd("mpi")],
        "torchrun": [*TORCHRUN, *cd("torchrun")],
        "lsm": [MPIEXEC, "-n", "2", sys.executable, dump, str(tmp / "lsm"), "edm_train", *NET_FLAGS,
                "--schedule_sampler", "loss-second-moment", "--total_training_steps", "300", "--save_interval",
                "300", "--log_interval", "100", "--global_batch_size", "4", "--ema_rate", "0.9",
                "--data_dir", str(data), "--logging_dir", str(tmp / "lsm" / "logs")],
        "one_rank_fails": [MPIEXEC, "-n", "2", sys.executable, os.path.join(ROOT, "scripts", "cm_train.py"),
                           *NET_FLAGS, "--training_mode", "consistency_training", "--loss_norm", "l2",
                           "--global_batch_size", "2", "--data_dir", str(bad),
                           "--logging_dir", str(tmp / "one_rank_fails" / "logs")],
        "batch_below_world": [MPIEXEC, "-n", "2", sys.executable, os.path.join(ROOT, "scripts", "edm_train.py"),
                              *NET_FLAGS, "--global_batch_size", "1", "--data_dir", str(data),
                              "--logging_dir", str(tmp / "batch_below_world" / "logs")],
    }  # fmt: skip
    procs = {
        name: subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, cmd in jobs.items()
    }
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[name] = (proc.returncode, out, err, tmp / name)
    return results


def dumped(runs, name, ranks=(0, 1)):
    code, out, err, out_dir = runs[name]
    assert code == 0, f"{name}: exit {code}\n{out[-2000:]}\n{err[-3000:]}"
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in ranks]


def test_two_processes_of_b_make_the_update_of_one_process_of_2b(runs):
    (one,) = dumped(runs, "one", ranks=(0,))
    mpi, torchrun = dumped(runs, "mpi"), dumped(runs, "torchrun")
    teacher = torch.load(runs["one"][3].parent / "teacher.pt", weights_only=True)
    assert one["world"] == 1 and mpi[0]["world"] == torchrun[0]["world"] == 2
    assert one["step"] == mpi[0]["step"] == torchrun[0]["step"] == 2
    for r0, r1 in (mpi, torchrun):
        assert r0["ddp"] == "DistributedDataParallel"
        assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    moved = max((p - t).abs().max().item() for p, t in zip(one["params"], teacher.values()))
    assert moved > 1e-4  # the student trained away from the teacher it started as
    # 1 process × 4 (in micro-batches of 1) == 2 processes × 2, under either launcher
    for run in (mpi, torchrun):
        for a, b in zip(one["params"], run[0]["params"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_loss_second_moment_sampler_stays_in_step_across_two_processes(runs):
    r0, r1 = dumped(runs, "lsm")
    assert r0["step"] == r1["step"] == 300
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    w0, w1 = r0["sampler_weights"], r1["sampler_weights"]
    assert w0.shape == (40,) and torch.equal(w0, w1)
    # warmed up: importance weights from every level's loss history, no longer uniform
    assert (w0 > 0).all() and w0.max() - w0.min() > 1e-3
    torch.testing.assert_close(w0.sum(), torch.tensor(1.0, dtype=w0.dtype))


@pytest.mark.parametrize(
    "job, line",
    [
        ("one_rank_fails", "cm_train.py: error: process 1: cannot read image "),
        ("batch_below_world", "edm_train.py: error: --global_batch_size 1 is smaller than the 2 processes"),
    ],
    ids=["one_rank_fails", "batch_below_world"],
)
def test_an_error_ends_every_rank_with_one_line(runs, job, line):
    code, out, err, out_dir = runs[job]
    assert code != 0
    lines = [text for text in err.splitlines() if text.strip()]
    assert len(lines) == 1 and lines[0].startswith(line), err
    assert "Traceback" not in err + out
    assert not (out_dir / "logs").exists()
