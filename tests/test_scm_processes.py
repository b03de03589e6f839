"""sCT in two real processes: 2 processes × batch 2 make the update of 1 process × 4 (the head included)."""

import os
import subprocess
import sys

import pytest
import torch

from launchers import MPIEXEC
from test_train_processes import HARNESS, NET_FLAGS, ROOT, env, write_images

pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="needs mpiexec (on PATH or next to sys.executable)")

SCT_FLAGS = [
    "--training_mode", "sct", "--init_from", "none", "--global_batch_size", "4", "--lr", "0.001",
    "--total_training_steps", "2", "--save_interval", "2", "--tangent_warmup_steps", "1", "--ema_rate", "0.9",
]  # fmt: skip


def test_two_processes_of_b_make_the_sct_update_of_one_process_of_2b(tmp_path):
    data = write_images(tmp_path / "data", 8)
    split = os.path.join(HARNESS, "split_batch.py")

    def job(name, *extra):
        return [split, str(tmp_path / name), "4", "cm_train", *NET_FLAGS, *SCT_FLAGS, "--data_dir", str(data),
                "--logging_dir", str(tmp_path / name / "logs"), *extra]

    jobs = {"one": [sys.executable, *job("one", "--microbatch", "1")], "mpi": [MPIEXEC, "-n", "2", sys.executable, *job("mpi")]}
    procs = {n: subprocess.Popen(c, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n, c in jobs.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {out[-1500:]}\n{err[-2500:]}"
    (one,) = [torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)]
    mpi = [torch.load(tmp_path / "mpi" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert one["world"] == 1 and mpi[0]["world"] == 2 and mpi[0]["ddp"] == "DistributedDataParallel"
    assert one["step"] == mpi[0]["step"] == 2
    assert all(torch.equal(a, b) for a, b in zip(mpi[0]["params"], mpi[1]["params"]))
    # the head is the last parameter registered (attached after the network): it trained, in step across ranks
    head_bias = one["params"][-1]
    assert head_bias.shape == (1,) and head_bias.abs().max() > 0
    for a, b in zip(one["params"], mpi[0]["params"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
