"""cm.dist_util: real processes under mpiexec, torchrun and plain python.

The multi-process jobs run tests/dist_scripts/*.py. They are all started
together when the module's first job test runs (the machine has 2 cores and
most of a job is start-up or waiting), then each test waits for its own job
with a timeout, so a hang fails the test instead of stalling the suite.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cm import dist_util
from launchers import MPIEXEC

SCRIPTS = Path(__file__).parent / "dist_scripts"
JOB_TIMEOUT_S = 120
HAVE_MPIEXEC = MPIEXEC is not None

needs_mpiexec = pytest.mark.skipif(not HAVE_MPIEXEC, reason="mpiexec neither on PATH nor next to sys.executable")

STATE = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2])}


def _clean_env(tmp_path, **extra):
    """The environment for a job: no inherited launcher variables, temp dir inside tmp_path."""
    dropped = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OPENAI_LOGDIR")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env = {k: v for k, v in env.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_"))}
    env["TMPDIR"] = str(tmp_path)
    env.update(extra)
    return env


def _launch(launcher, nproc, script):
    """Command line starting ``script`` under ``launcher`` ("mpi", "torchrun", "plain")."""
    if launcher == "mpi":
        return [MPIEXEC, "-n", str(nproc), sys.executable, str(script)]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(script)]
    return [sys.executable, str(script)]


class _Job:
    """A launched command; ``finish()`` waits for it and returns (returncode, stdout, stderr, seconds)."""

    def __init__(self, cmd, tmp_path, timeout=JOB_TIMEOUT_S, **extra_env):
        self.cmd, self.timeout, self.tmp_path = cmd, timeout, tmp_path
        self.start = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            env=_clean_env(tmp_path, **extra_env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def finish(self):
        """Wait (at most ``timeout`` s from launch); a hang kills the job and fails the test."""
        left = max(1.0, self.timeout - (time.monotonic() - self.start))
        try:
            out, err = self.proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            out, err = self.proc.communicate()
            pytest.fail(f"job hung for {self.timeout}s: {self.cmd}\n{out}\n{err}")
        return self.proc.returncode, out, err, time.monotonic() - self.start


def _check_job(tmp_path, launcher, nproc):
    """Start dist_check.py with a checkpoint and an output folder in ``tmp_path``."""
    ckpt = tmp_path / "ckpt.pt"
    torch.save(STATE, ckpt)
    out = tmp_path / "out"
    out.mkdir()
    cmd = _launch(launcher, nproc, SCRIPTS / "dist_check.py") + [str(nproc), str(ckpt), str(out)]
    return _Job(cmd, tmp_path)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Every job of this module, started at once, by name."""
    started = {}
    if HAVE_MPIEXEC:
        started["check-mpi"] = _check_job(tmp_path_factory.mktemp("mpi"), "mpi", 2)
        die = [*_launch("mpi", 2, SCRIPTS / "dist_die.py")]
        started["raise"] = _Job(die + ["raise"], tmp_path_factory.mktemp("raise"), 90, CM_DIST_TIMEOUT_S="600")
        started["stall"] = _Job(die + ["stall"], tmp_path_factory.mktemp("stall"), 90, CM_DIST_TIMEOUT_S="5")
    started["check-torchrun"] = _check_job(tmp_path_factory.mktemp("torchrun"), "torchrun", 2)
    started["check-plain"] = _check_job(tmp_path_factory.mktemp("plain"), "plain", 1)
    yield started
    for job in started.values():
        if job.proc.poll() is None:
            os.killpg(job.proc.pid, 9)
            job.proc.communicate()


@pytest.mark.parametrize(
    "launcher,nproc",
    [pytest.param("mpi", 2, marks=needs_mpiexec), ("torchrun", 2), ("plain", 1)],
)
def test_job_ranks_sync_load_and_log(jobs, launcher, nproc):
    """setup_dist, rank helpers, sync_params, rank-0 load_state_dict and logger averaging."""
    job = jobs[f"check-{launcher}"]
    rc, stdout, stderr, _ = job.finish()
    assert rc == 0, stdout + stderr
    tmp_path, out = job.tmp_path, job.tmp_path / "out"
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]

    for r, res in enumerate(results):
        assert res["rank"] == r and res["world"] == nproc
        assert res["local_rank"] == r  # one machine: local rank = global rank
        assert res["before_group"] == [r, nproc]  # helpers work before the group exists
        assert res["is_main"] == (r == 0)
        assert res["is_distributed"] == (nproc > 1)
        assert res["dev"] == "cpu" and res["backend"] == "gloo"
        # Rank 1's own path does not exist: it can only have rank 0's bytes.
        assert res["loaded"] == {k: v.tolist() for k, v in sorted(STATE.items())}
        assert res["missing_error"] == f"checkpoint not found: {out / 'missing.pt'}"
        # logkv_mean: rank 0 logs 0, rank 1 logs 10 and 11 -> (0 + 10 + 11) / 3.
        assert res["dumped"]["loss"] == pytest.approx(7.0 if nproc == 2 else 0.0)
        assert res["dumped"]["step"] == 7
        assert Path(res["auto_dir"]).parent == tmp_path

    # Differently seeded parameters and a rank-valued tensor all equal rank 0's.
    assert all(res["synced"] == results[0]["synced"] for res in results)
    assert results[0]["synced"][-5:] == [1.0] * 5
    # Every rank agrees on rank 0's auto-chosen log dir.
    assert len({res["auto_dir"] for res in results}) == 1
    # print0 printed once; only rank 0 wrote the log files.
    assert stdout.count("PRINT0-MARKER") == 1
    # Only rank 0 logs: one "Logging to" line and one table on stdout.
    assert stdout.count("Logging to") == 1 and stdout.count("| loss |") == 1
    assert sorted(p.name for p in (out / "log").iterdir()) == ["log.txt", "progress.csv"]
    rows = (out / "log" / "progress.csv").read_text().splitlines()
    assert rows[0] == "loss,step" and len(rows) == 2


@needs_mpiexec
def test_mpi_rank_that_raises_ends_the_job(jobs):
    """Rank 1 raises while rank 0 sleeps 300 s: the MPI excepthook must abort both fast."""
    rc, stdout, stderr, seconds = jobs["raise"].finish()
    assert rc != 0
    assert seconds < 60
    assert "[rank1]: RuntimeError: rank 1 fails on purpose" in stderr
    assert "UNREACHABLE" not in stdout


@needs_mpiexec
def test_mpi_collective_times_out_instead_of_hanging(jobs):
    """Rank 1 stalls outside the barrier: rank 0's barrier times out, the job aborts."""
    rc, stdout, stderr, seconds = jobs["stall"].finish()
    assert rc != 0
    assert seconds < 60
    # Both ranks got through setup, so it is the barrier that timed out.
    assert "SETUP-DONE rank 0" in stdout and "SETUP-DONE rank 1" in stdout
    assert "[rank0]: Traceback" in stderr
    assert "UNREACHABLE" not in stdout


# ----------------------------------------------------------------------------
# In this (single, ungrouped) process


def test_helpers_without_a_process_group(capsys):
    """Rank 0 of 1 with no group: every helper works and collectives are no-ops."""
    assert not torch.distributed.is_initialized()
    assert dist_util.get_rank() == 0 and dist_util.get_world_size() == 1
    assert dist_util.is_main_process() and not dist_util.is_distributed()
    assert dist_util.dev() == torch.device("cpu")
    dist_util.barrier()
    p = torch.nn.Parameter(torch.ones(3))
    dist_util.sync_params([p])
    assert p.tolist() == [1.0, 1.0, 1.0]
    dist_util.print0("hello", 3)
    assert capsys.readouterr().out == "hello 3\n"


def test_rank_from_torchrun_environment(monkeypatch):
    """Before any group, RANK/WORLD_SIZE from a torch launcher decide the rank."""
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_util.get_rank() == 3 and dist_util.get_world_size() == 4
    assert dist_util.get_local_rank() == 1
    assert not dist_util.is_main_process() and dist_util.is_distributed()


def test_load_state_dict_round_trip(tmp_path):
    """A saved state_dict comes back equal, on the CPU."""
    torch.save(STATE, tmp_path / "ckpt.pt")
    loaded = dist_util.load_state_dict(str(tmp_path / "ckpt.pt"))
    assert loaded.keys() == STATE.keys()
    for k in STATE:
        assert torch.equal(loaded[k], STATE[k]) and loaded[k].device.type == "cpu"


def test_load_state_dict_missing_file_is_one_line(tmp_path):
    """A missing checkpoint: FileNotFoundError, one line, naming the path."""
    path = tmp_path / "nope" / "model000100.pt"
    with pytest.raises(FileNotFoundError) as info:
        dist_util.load_state_dict(str(path))
    assert str(info.value) == f"checkpoint not found: {path}"


class _RunsCode:
    """Unpickling this would create a marker file: what a hostile checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_load_state_dict_never_runs_code(tmp_path):
    """weights_only=True: a checkpoint with a code-running object is refused."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "payload": _RunsCode(marker)}, path)
    with pytest.raises(ValueError, match="refusing the global"):  # by the checks before torch.load
        dist_util.load_state_dict(str(path))
    assert not marker.exists()
    with pytest.raises(ValueError, match="weights_only=True"):
        dist_util.load_state_dict(str(path), weights_only=False)
    assert not marker.exists()


def test_timeout_from_environment(monkeypatch):
    """CM_DIST_TIMEOUT_S sets the collective timeout; junk is a one-line error."""
    monkeypatch.delenv("CM_DIST_TIMEOUT_S", raising=False)
    assert dist_util.dist_timeout().total_seconds() == dist_util.DEFAULT_TIMEOUT_S
    monkeypatch.setenv("CM_DIST_TIMEOUT_S", "42.5")
    assert dist_util.dist_timeout().total_seconds() == 42.5
    for junk in ("soon", "0", "-3"):
        monkeypatch.setenv("CM_DIST_TIMEOUT_S", junk)
        with pytest.raises(ValueError, match="CM_DIST_TIMEOUT_S") as info:
            dist_util.dist_timeout()
        assert "\n" not in str(info.value)


def test_load_state_dict_unreadable_path_is_one_line(tmp_path):
    """A path rank 0 cannot read (a directory): one-line OSError naming it."""
    with pytest.raises(OSError) as info:
        dist_util.load_state_dict(str(tmp_path))
    msg = str(info.value)
    assert msg.startswith(f"cannot read checkpoint {tmp_path}: ") and "\n" not in msg
