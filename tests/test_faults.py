"""Fault tolerance on real files and real processes (cm/faults.py, cm/run_metadata.py).

Disk full (a file-size limit) during a save, a SIGKILLed rank under mpiexec and
torchrun, NaN losses (the CM_INJECT_NAN_STEPS test switch), truncated and
unreadable checkpoints, corrupt images, and the metadata json beside each set.
"""

import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from cm import dist_util, faults, run_metadata
from cm.image_datasets import DataError, ImageDataset
from cm.train_util import StepBatches
from launchers import MPIEXEC
from test_train_scripts import ROOT, SCRIPTS, SMALL, env, ok, same_state, script, wait_for

EDM = f"{SMALL} --global_batch_size 4"
CT = (
    "--training_mode consistency_training --target_ema_mode fixed --start_ema 0.9 --scale_mode fixed "
    "--start_scales 10 --loss_norm l2 --ema_rate 0.9"
)
DIST_TIMEOUT = 20


def start(cmd, preexec=None, **env_extra):
    return subprocess.Popen(cmd, cwd=ROOT, env=env(**env_extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=preexec)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def error_lines(stderr):
    """stderr lines that are not one-line warnings."""
    return [line for line in stderr.splitlines() if line.strip() and "Warning: " not in line]


def rows(log_dir):
    """progress.csv as {step: row dict}."""
    lines = (log_dir / "progress.csv").read_text().splitlines()
    header = lines[0].split(",")
    table = [dict(zip(header, line.split(","))) for line in lines[1:]]
    return {int(r["step"]): r for r in table}


def listing(directory):
    return {name: os.path.getmtime(os.path.join(directory, name)) for name in os.listdir(directory)}


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def limit_file_size(nbytes):
    """preexec_fn: files may not grow past ``nbytes``; SIGXFSZ ignored so writes fail with EFBIG."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return apply


@pytest.fixture(scope="module")
def few_digits(tmp_path_factory):
    """8 scikit-learn digits as 8x8 RGB PNGs (<class>_<i>.png), and a copy where one is corrupt."""
    from sklearn.datasets import load_digits

    good = tmp_path_factory.mktemp("digits8")
    digits = load_digits()
    for i in range(8):
        img = Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8)).convert("RGB")
        img.save(good / f"{digits.target[i]}_{i}.png")
    bad = tmp_path_factory.mktemp("digits8_bad")
    for p in good.iterdir():
        shutil.copy(p, bad / p.name)
    corrupt = bad / "3_3.png"
    data = corrupt.read_bytes()
    corrupt.write_bytes(data[:30] + b"\0" * (len(data) - 30))  # header kept, pixel data garbage
    return good, bad, corrupt


# ----------------------------------------------------------------------------
# In this process: the pure parts


def test_injected_nan_steps_and_bad_step_guard():
    assert faults.injected_nan_steps("") == range(0)
    assert list(faults.injected_nan_steps("2:5")) == [2, 3, 4]
    with pytest.raises(ValueError, match="CM_INJECT_NAN_STEPS"):
        faults.injected_nan_steps("2-5")
    assert torch.isnan(faults.maybe_inject_nan(torch.tensor(1.0), 3, range(2, 5)))
    assert faults.maybe_inject_nan(torch.tensor(1.0), 5, range(2, 5)) == 1.0
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert not faults.grads_finite([p])
    p.grad = torch.ones(3)
    assert faults.grads_finite([p])

    guard = faults.BadStepGuard(3)
    guard.bad(4, "/x/model000004.pt")
    guard.good()
    guard.bad(6, None)
    guard.bad(7, None)
    with pytest.raises(faults.TrainingStopped) as info:
        guard.bad(8, "/x/model000004.pt")
    assert guard.total == 4
    assert str(info.value) == (
        "loss or gradients not finite for 3 consecutive steps (6..8, --max_bad_steps 3); stopped at step 8 "
        "without saving; last good checkpoint: /x/model000004.pt"
    )
    with pytest.raises(ValueError, match="--max_bad_steps"):
        faults.BadStepGuard(0)


def _write_set(directory, step, rates=(0.9,), extra=()):
    files = [(name, {"w": torch.full((2,), float(step))}) for name in faults.set_file_names(step, rates, extra)]
    faults.write_checkpoint_set(str(directory), files)


def test_failed_set_write_leaves_previous_set_and_no_temp_file(tmp_path):
    _write_set(tmp_path, 1)
    before = sorted(os.listdir(tmp_path))
    (tmp_path / "model000002.pt").mkdir()  # the last rename of set 2 fails for real
    files = [(name, {"w": torch.zeros(2)}) for name in faults.set_file_names(2, (0.9,))]
    with pytest.raises(OSError) as info:
        faults.write_checkpoint_set(str(tmp_path), files)
    message = str(info.value)
    assert message.startswith(f"cannot write {tmp_path / 'model000002.pt'}: [Errno 21]") and "\n" not in message
    (tmp_path / "model000002.pt").rmdir()
    assert sorted(os.listdir(tmp_path)) == before  # opt/ema of set 2 removed again, no .tmp
    assert faults.newest_usable_checkpoint(str(tmp_path), [0.9]) == str(tmp_path / "model000001.pt")


def test_newest_usable_checkpoint_falls_back_with_a_warning(tmp_path):
    assert faults.newest_usable_checkpoint(str(tmp_path / "none"), [0.9]) is None
    for step in (1, 2, 3, 4):
        _write_set(tmp_path, step, extra=("target_model",))
    truncate(tmp_path / "ema_0.9_000004.pt")
    (tmp_path / "target_model000003.pt").unlink()
    with pytest.warns(UserWarning) as record:
        found = faults.newest_usable_checkpoint(str(tmp_path), [0.9], ("target_model",))
    assert found == str(tmp_path / "model000002.pt")
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert f"step 4: {tmp_path / 'ema_0.9_000004.pt'} is unusable" in messages[0]
    assert f"step 3: {tmp_path / 'target_model000003.pt'} is unusable (missing)" in messages[1]
    # without a target in the mode, set 3 is complete
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert faults.newest_usable_checkpoint(str(tmp_path), [0.9]) == str(tmp_path / "model000003.pt")


def test_metadata_changed_flags_warn_by_name(tmp_path):
    flags = {"num_channels": 32, "global_batch_size": 4, "lr": 1e-4, "log_interval": 10}
    (tmp_path / "meta000005.json").write_bytes(run_metadata.metadata_bytes(5, flags, 2))
    meta = run_metadata.read_metadata(str(tmp_path / "model000005.pt"))
    assert meta["step"] == 5 and meta["world_size"] == 2 and meta["flags"] == flags
    assert "code_version" in meta
    changed = dict(flags, global_batch_size=8, log_interval=1)  # log_interval does not matter
    with pytest.warns(UserWarning) as record:
        run_metadata.warn_changed_flags(str(tmp_path / "model000005.pt"), changed, 1)
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2
    assert "with --global_batch_size 8; the checkpoint was made with --global_batch_size 4" in messages[0]
    assert "with world size 1; the checkpoint was made with world size 2" in messages[1]
    assert run_metadata.read_metadata(str(tmp_path / "model000009.pt")) is None


def test_step_batches_skip_or_name_a_corrupt_image(few_digits):
    _, bad_dir, corrupt = few_digits
    files = sorted(str(p) for p in bad_dir.iterdir())
    dataset = ImageDataset(8, files, random_flip=False)
    strict = StepBatches(dataset, 4, seed=0, rank=0, num_workers=0)
    with pytest.raises(DataError) as info:
        for _ in range(2):  # one epoch: every image is read once
            next(strict)
    assert str(info.value).startswith(f"cannot read image {corrupt}:") and "\n" not in str(info.value)

    lenient = StepBatches(dataset, 4, seed=0, rank=0, num_workers=0, skip_bad_images=True)
    with pytest.warns(UserWarning, match=re.escape(f"leaving out unreadable image {corrupt}")):
        sizes = [next(lenient)[0].shape[0] for _ in range(2)]
    assert sorted(sizes) == [3, 4]


def test_bad_dist_timeout_is_one_line_before_any_setup():
    assert not torch.distributed.is_initialized()
    for bad in (0, -5.0):
        with pytest.raises(ValueError, match="--dist_timeout must be a positive number of seconds") as info:
            dist_util.setup_dist(timeout=bad)
        assert "\n" not in str(info.value)
    assert not torch.distributed.is_initialized()


def test_lost_process_reason_recognises_a_killed_loader_worker():
    killed = RuntimeError("DataLoader worker (pid 123) is killed by signal: Terminated.")
    assert "data-loading worker process died" in dist_util.lost_process_reason(killed)
    assert dist_util.lost_process_reason(RuntimeError("shape mismatch")) is None
    assert dist_util.lost_process_reason(ValueError("gloo")) is None


# ----------------------------------------------------------------------------
# Real runs: NaN steps, metadata, truncated checkpoint, disk full, explicit bad path


@pytest.fixture(scope="module")
def nan_run(few_digits, tmp_path_factory):
    """edm_train for 2 steps, a checkpoint set per step, step 1 with an injected NaN loss."""
    good, _, _ = few_digits
    log_dir = tmp_path_factory.mktemp("nan") / "logs"
    cmd = script("edm_train.py", EDM, f"--data_dir {good} --logging_dir {log_dir} --total_training_steps 2",
                 "--save_interval 1")
    proc = ok(subprocess.run(cmd, cwd=ROOT, env=env(CM_INJECT_NAN_STEPS="1:2"), capture_output=True, text=True,
                             timeout=300))
    return log_dir, proc, good


def test_nan_step_is_skipped_counted_and_leaves_weights(nan_run):
    log_dir, proc, _ = nan_run
    assert "step 1: loss or gradients not finite; step skipped" in proc.stdout
    table = rows(log_dir)
    assert [table[k]["bad_steps"] for k in (0, 1)] == ["0", "1"]
    assert table[0]["grad_norm"] != "" and table[1]["grad_norm"] == ""
    # the skipped step changed nothing: not the weights, the EMA, nor the optimiser
    for kind in ("model{:06d}.pt", "ema_0.9999_{:06d}.pt", "opt{:06d}.pt"):
        a = torch.load(log_dir / kind.format(1), weights_only=True)
        b = torch.load(log_dir / kind.format(2), weights_only=True)
        assert same_state(a, b), kind


def test_metadata_json_beside_every_set(nan_run):
    log_dir, _, good = nan_run
    for step in (1, 2):
        meta = json.loads((log_dir / f"meta{step:06d}.json").read_text())
        assert meta["step"] == step and meta["world_size"] == 1
        assert meta["flags"]["num_channels"] == 32 and meta["flags"]["data_dir"] == str(good)
        assert meta["flags"]["max_bad_steps"] == 20 and meta["flags"]["dist_timeout"] == 300.0
        assert meta["code_version"] is None or isinstance(meta["code_version"], str)


@pytest.fixture(scope="module")
def broken_runs(nan_run, tmp_path_factory):
    """Three runs on copies of nan_run's folder (newest set truncated), concurrently.

    full: auto-resume with --lr changed, under a 1 MB file-size limit (its first save fails);
    nan: auto-resume, NaN from step 2 on, --max_bad_steps 2;
    explicit: --resume_checkpoint naming a truncated model file.
    """
    src, _, good = nan_run
    tmp = tmp_path_factory.mktemp("broken")
    dirs = {}
    for case in ("full", "nan"):
        dirs[case] = tmp / case
        shutil.copytree(src, dirs[case])
        truncate(dirs[case] / "ema_0.9999_000002.pt")
    dirs["explicit"] = tmp / "explicit"
    bad_model = tmp / "bad" / "model000002.pt"
    bad_model.parent.mkdir()
    shutil.copy(src / "model000002.pt", bad_model)
    truncate(bad_model)
    common = f"{EDM} --data_dir {good} --save_interval 1 --total_training_steps 4"
    before = {case: listing(d) for case, d in dirs.items() if d.exists()}
    procs = {
        "full": start(script("edm_train.py", common, f"--logging_dir {dirs['full']} --resume_checkpoint auto",
                             "--lr 0.0002"), preexec=limit_file_size(2**20)),
        "nan": start(script("edm_train.py", common, f"--logging_dir {dirs['nan']} --resume_checkpoint auto",
                            "--max_bad_steps 2"), CM_INJECT_NAN_STEPS="1:100"),
        "explicit": start(script("edm_train.py", common, f"--logging_dir {dirs['explicit']}",
                                 f"--resume_checkpoint {bad_model}")),
    }
    return {case: (finish(p), dirs[case], before.get(case)) for case, p in procs.items()}, bad_model


def test_auto_resume_skips_truncated_newest_set_with_a_warning(broken_runs):
    runs, _ = broken_runs
    for case in ("full", "nan"):
        (rc, out, err), log_dir, _ = runs[case]
        bad = log_dir / "ema_0.9999_000002.pt"
        assert f"UserWarning: --resume_checkpoint auto: skipping the checkpoint of step 2: {bad} is unusable" in err
        assert f"loading model from checkpoint: {log_dir / 'model000001.pt'}" in out


def test_disk_full_during_save_is_one_line_and_keeps_the_previous_set(broken_runs):
    (rc, out, err), log_dir, _ = broken_runs[0]["full"]
    assert rc == 1
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"edm_train.py: error: cannot write {log_dir / 'opt000002.pt'}: [Errno 27]")
    assert not [n for n in os.listdir(log_dir) if n.endswith(".tmp")]
    for name in faults.set_file_names(1, [0.9999]):
        torch.load(log_dir / name, weights_only=True)
    # the flag that changed is named
    assert "resuming" in err and "with --lr 0.0002; the checkpoint was made with --lr 0.0001" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="as root, a read-only mode does not stop writes")
def test_read_only_directory_is_one_line(nan_run, tmp_path):
    src, _, good = nan_run
    log_dir = tmp_path / "ro"
    shutil.copytree(src, log_dir)
    os.chmod(log_dir, 0o555)
    try:
        proc = subprocess.run(
            script("edm_train.py", EDM, f"--data_dir {good} --logging_dir {log_dir} --resume_checkpoint auto",
                   "--total_training_steps 4 --save_interval 1", "--log_interval 1000"),
            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300,
        )
    finally:
        os.chmod(log_dir, 0o755)
    assert proc.returncode == 1
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "[Errno 13]" in lines[0] and str(log_dir) in lines[0], proc.stderr


def test_nan_steps_stop_the_run_after_the_limit_saving_nothing(broken_runs):
    (rc, out, err), log_dir, before = broken_runs[0]["nan"]
    assert rc == 1
    lines = error_lines(err)
    assert lines == [
        "edm_train.py: error: loss or gradients not finite for 2 consecutive steps (1..2, --max_bad_steps 2); "
        f"stopped at step 2 without saving; last good checkpoint: {log_dir / 'model000001.pt'}"
    ], err
    after = listing(log_dir)
    checkpoints = {n: t for n, t in after.items() if n.endswith((".pt", ".json")) and n != "args.json"}
    assert checkpoints == {n: t for n, t in before.items() if n.endswith((".pt", ".json")) and n != "args.json"}


def test_explicit_bad_checkpoint_is_one_line(broken_runs):
    runs, bad_model = broken_runs
    (rc, out, err), log_dir, _ = runs["explicit"]
    assert rc == 1
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f"edm_train.py: error: cannot load {bad_model} as a weights-only")
    assert not log_dir.exists()


# ----------------------------------------------------------------------------
# Real runs: a corrupt image in the data folder


def test_corrupt_image_is_named_or_skipped_in_both_scripts(few_digits, tmp_path):
    _, bad_dir, corrupt = few_digits
    common = f"{SMALL} --data_dir {bad_dir} --global_batch_size 4 --total_training_steps 2 --save_interval 2"
    strict = start(script("edm_train.py", common, f"--logging_dir {tmp_path / 'strict'}"))
    lenient = start(script("cm_train.py", common, CT, f"--logging_dir {tmp_path / 'lenient'}",
                           "--skip_bad_images True"))
    rc, out, err = finish(strict)
    assert rc == 1
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f"edm_train.py: error: cannot read image {corrupt}:"), err
    rc, out, err = finish(lenient)
    assert rc == 0, err
    assert f"UserWarning: --skip_bad_images: leaving out unreadable image {corrupt}" in err
    assert (tmp_path / "lenient" / "model000002.pt").exists()


# ----------------------------------------------------------------------------
# Real runs: one rank of two SIGKILLed, then auto-resume


def _descendants(pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rank_of(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            pairs = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return None
    if b"edm_train.py" not in cmdline:
        return None
    rank = pairs.get(b"RANK", pairs.get(b"PMI_RANK"))
    return None if rank is None else int(rank)


def _kill_rank1(launcher_pid):
    """SIGKILL the training process of rank 1 (not its data-loader children)."""
    ranked = [p for p in _descendants(launcher_pid) if _rank_of(p) == 1]
    parents = {}
    for p in ranked:
        with open(f"/proc/{p}/stat") as f:
            parents[p] = int(f.read().rsplit(")", 1)[1].split()[1])
    victim = [p for p in ranked if parents[p] not in ranked]
    assert len(victim) == 1, ranked
    os.kill(victim[0], signal.SIGKILL)


LAUNCHERS = {
    "mpiexec": [MPIEXEC or "mpiexec", "-n", "2", sys.executable],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
}


def two_ranks(launcher, flags):
    return LAUNCHERS[launcher] + [os.path.join(SCRIPTS, "edm_train.py"), *shlex.split(flags)]


@pytest.mark.skipif(MPIEXEC is None, reason="needs mpiexec (on PATH or next to sys.executable)")
def test_killed_rank_ends_the_job_and_auto_resume_matches_a_straight_run(few_digits, tmp_path):
    good, _, _ = few_digits
    common = f"{EDM} --data_dir {good} --dist_timeout {DIST_TIMEOUT}"
    straight = tmp_path / "straight"
    reference = start(two_ranks("mpiexec", f"{common} --logging_dir {straight} --total_training_steps 5"))
    for launcher in ("mpiexec", "torchrun"):
        log_dir = tmp_path / launcher
        first = start(two_ranks(launcher, f"{common} --logging_dir {log_dir} --total_training_steps 1000 "
                                          "--save_interval 1"))
        wait_for(lambda: (log_dir / "model000002.pt").exists(), first)
        _kill_rank1(first.pid)
        killed_at = time.time()
        rc, out, err = finish(first, timeout=DIST_TIMEOUT + 100)
        assert rc != 0, (launcher, err[-2000:])
        assert time.time() - killed_at < DIST_TIMEOUT + 40, launcher
        if launcher == "torchrun":  # the survivor says what happened, in one line
            said = [line for line in err.splitlines() if line.startswith("edm_train.py: error: process 0:")]
            assert len(said) == 1 and ("lost contact" in said[0] or "worker process died" in said[0]), err[-2000:]
        rc, out, err = finish(start(two_ranks(
            launcher, f"{common} --logging_dir {log_dir} --total_training_steps 5 --resume_checkpoint auto")))
        assert rc == 0, (launcher, err[-2000:])
        resumed_from = int(re.search(r"loading model from checkpoint: .*model(\d+)\.pt", out).group(1))
        assert 2 <= resumed_from < 5
        if launcher == "mpiexec":
            assert finish(reference)[0] == 0
        ours, theirs = rows(log_dir), rows(straight)
        assert sorted(ours) == list(range(resumed_from, 5)), launcher
        for step in ours:
            assert ours[step]["loss"] == theirs[step]["loss"], (launcher, step)


@pytest.mark.skipif(MPIEXEC is None, reason="needs mpiexec (on PATH or next to sys.executable)")
def test_save_failure_on_rank0_stops_every_rank(few_digits, tmp_path):
    # a file-size limit would also stop MPI's own start-up (shared-memory files), so the
    # save fails another real way: a folder sits where the optimiser file must go
    good, _, _ = few_digits
    log_dir = tmp_path / "logs"
    (log_dir / "opt000001.pt").mkdir(parents=True)
    began = time.time()
    rc, out, err = finish(start(two_ranks("mpiexec", f"{EDM} --data_dir {good} --logging_dir {log_dir} "
                                                     f"--total_training_steps 1 --dist_timeout {DIST_TIMEOUT}")))
    assert rc != 0 and time.time() - began < DIST_TIMEOUT + 100
    lines = error_lines(err)
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith(f"edm_train.py: error: process 0: cannot write {log_dir / 'opt000001.pt'}: [Errno 21]")
    assert not [n for n in os.listdir(log_dir) if n.endswith((".pt", ".tmp")) and n != "opt000001.pt"]


def test_survivor_of_a_killed_peer_says_so_in_one_line(few_digits, tmp_path):
    """Two ranks started by hand (RANK/WORLD_SIZE/MASTER_*, as a multi-node scheduler does); rank 1 killed."""
    good, _, _ = few_digits
    log_dir = tmp_path / "logs"
    port = str(dist_util._free_port())
    flags = f"{EDM} --data_dir {good} --logging_dir {log_dir} --total_training_steps 1000 --save_interval 1"
    ranks = [
        start(script("edm_train.py", flags, f"--dist_timeout {DIST_TIMEOUT}"), RANK=str(r), WORLD_SIZE="2",
              LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        for r in (0, 1)
    ]
    try:
        wait_for(lambda: (log_dir / "model000002.pt").exists(), ranks[0])
        ranks[1].kill()
        killed_at = time.time()
        rc, out, err = finish(ranks[0], timeout=DIST_TIMEOUT + 100)
    finally:
        for proc in ranks:
            proc.kill()
            proc.communicate()
    assert rc == 1 and time.time() - killed_at < DIST_TIMEOUT + 40
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("edm_train.py: error: process 0: lost contact with another process")
    assert lines[0].endswith("rerun with --resume_checkpoint auto")
