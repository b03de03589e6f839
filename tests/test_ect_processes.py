"""ECT from a network file with augment_dim 9 (ECT's own training snapshot, as NVIDIA's EDM
CIFAR-10 files) in two real processes under mpiexec and under torchrun: the network is built
without map_augment (one log line), DDP keeps find_unused_parameters off, 3 steps run, and
2 steps + resume + 1 step give the same files as 3 steps straight (across a stage change)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from launchers import MPIEXEC

pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="needs mpiexec (on PATH or next to sys.executable)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNAPSHOT = os.path.join(ROOT, "tests", "data", "ect", "snapshot_ncsnpp_uncond_aug9.pkl")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
LAUNCHERS = {"mpi": [MPIEXEC, "-n", "2", sys.executable], "torchrun": TORCHRUN}


def env():
    e = {k: v for k, v in os.environ.items() if k not in ("OPENAI_LOGDIR", "CM_NO_GRAD_SYNC", "RANK", "WORLD_SIZE")}
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def argv(data, log_dir, steps, *extra):
    return [os.path.join(ROOT, "scripts", "cm_train.py"), "--training_mode", "ect", "--init_from", SNAPSHOT,
            "--data_dir", str(data), "--logging_dir", str(log_dir), "--global_batch_size", "4",
            "--total_training_steps", str(steps), "--save_interval", "1", "--log_interval", "1",
            "--ect_double", "2", "--dropout", "0.1", "--lr", "1e-3", *extra]  # fmt: skip


def run_all(jobs):
    """Start the jobs together; {name: (returncode, stdout, stderr)}."""
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, cmd in jobs.items()}
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=500)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[name] = (proc.returncode, out, err)
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}"
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ect_procs")
    data = tmp / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(data / f"{i}.png")
    first = {f"{k}_{part}": [*launch, *argv(data, tmp / f"{k}_{part}", 3 if part == "straight" else 2)]
             for k, launch in LAUNCHERS.items() for part in ("straight", "split")}
    results = run_all(first)
    resumed = {f"{k}_resumed": [*launch, *argv(data, tmp / f"{k}_split", 3, "--resume_checkpoint",
                                                str(tmp / f"{k}_split" / "model000002.pt"))]
               for k, launch in LAUNCHERS.items()}
    results.update(run_all(resumed))
    return tmp, results


def files(folder, step):
    return {f: torch.load(folder / f, weights_only=True) for f in sorted(os.listdir(folder))
            if f.endswith(f"{step:06d}.pt")}


def same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_three_steps_from_an_augment_dim_9_snapshot_in_two_processes(runs, launcher):
    tmp, results = runs
    log = (tmp / f"{launcher}_straight" / "log.txt").read_text()
    assert "ect: 2 process(es) x batch 2, from step 0" in log
    assert log.count("the network is built without map_augment") == 1
    model = files(tmp / f"{launcher}_straight", 3)["model000003.pt"]
    assert not any("map_augment" in k for k in model)
    from cm.formats.model_files import load_network_file

    source, flags = load_network_file(SNAPSHOT)
    assert flags["augment_dim"] == 9 and flags["training_mode"] == "ect" and flags["sigma_min"] == 0.003
    start = {k: v for k, v in source.state_dict().items() if "map_augment" not in k}
    assert model.keys() == start.keys()
    assert max((model[k] - v).abs().max().item() for k, v in start.items()) > 1e-5  # it trained


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_resume_in_two_processes_is_bit_exact(runs, launcher):
    tmp, _ = runs
    straight, split = files(tmp / f"{launcher}_straight", 3), files(tmp / f"{launcher}_split", 3)
    assert set(straight) == {"model000003.pt", "opt000003.pt", "ema_0.9999_000003.pt"}
    assert straight.keys() == split.keys()
    for name in straight:
        assert same(straight[name], split[name]), name


def test_mpiexec_and_torchrun_train_the_same_weights(runs):
    tmp, _ = runs
    assert same(files(tmp / "mpi_straight", 3), files(tmp / "torchrun_straight", 3))
