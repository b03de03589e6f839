"""edm_train.py / cm_train.py as real processes on real images (scikit-learn digits).

The README's two training commands run with only the paths changed and size
overrides appended (argparse keeps the last value of a repeated flag). Then:
bad inputs, exact resume, SIGKILL/SIGTERM, consistency training, progressive
distillation, and two-process runs under mpiexec and torchrun. Nothing is mocked.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from launchers import MPIEXEC

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
DUMP = os.path.join(ROOT, "tests", "train_scripts", "run_and_dump.py")

# The README's commands (copies of the original's, paths aside). The tests run
# the README's own lines when it has them, these copies otherwise.
BRIEF_COMMANDS = {
    "edm_train.py": (
        "python edm_train.py --attention_resolutions 32,16,8 --class_cond True --use_scale_shift_norm True "
        "--dropout 0.1 --ema_rate 0.999,0.9999,0.9999432189950708 --global_batch_size 512 --image_size 32 "
        "--lr 0.0001 --num_channels 128 --num_head_channels 32 --num_res_blocks 3 --resblock_updown True "
        "--schedule_sampler lognormal --use_fp16 True --weight_decay 0.0 --weight_schedule karras "
        "--data_dir /path/to/cifar10 --logging_dir /path/to/logs"
    ),
    "cm_train.py": (
        "python cm_train.py --training_mode consistency_distillation --target_ema_mode fixed --start_ema 0.95 "
        "--scale_mode fixed --start_scales 18 --total_training_steps 800000 --loss_norm lpips --lr 0.000008 "
        "--teacher_model_path /path/to/edm_cifar10_ema.pt --attention_resolutions 16,8 --class_cond True "
        "--use_scale_shift_norm True --dropout 0.0 --teacher_dropout 0.1 "
        "--ema_rate 0.9999,0.99994,0.9999432189950708 --global_batch_size 512 --image_size 32 --lr 0.000008 "
        "--num_channels 128 --num_head_channels 32 --num_res_blocks 3 --resblock_updown True --use_fp16 True "
        "--weight_decay 0.0 --weight_schedule uniform --data_dir /path/to/cifar10 --logging_dir /path/to/logs"
    ),
}
PATH_FLAGS = ("--data_dir", "--logging_dir", "--teacher_model_path")


def command_argv(line):
    """argv from the training script on ("edm_train.py ..."), launcher prefix dropped."""
    argv = shlex.split(line)
    start = next(i for i, a in enumerate(argv) if a.endswith(("edm_train.py", "cm_train.py")))
    argv = argv[start:]
    argv[0] = os.path.basename(argv[0])
    return argv


def readme_commands(path=os.path.join(ROOT, "README.md")):
    """{script: argv} of the training commands in the README (none when it has none)."""
    found = {}
    for line in open(path).read().replace("\\\n", " ").splitlines():
        if re.match(r"\s*(mpiexec|torchrun|python)\b.*(edm|cm)_train\.py --", line):
            argv = command_argv(line)
            found.setdefault(argv[0], argv)
    return found


def check_readme_commands(path=os.path.join(ROOT, "README.md")):
    """The README holds both training commands, and they are the original's up to paths."""
    found = readme_commands(path)
    placeholders = {flag[2:]: "PATH" for flag in PATH_FLAGS}
    for name, line in BRIEF_COMMANDS.items():
        assert name in found, f"{path} lost its {name} command"
        assert with_paths(found[name], **placeholders) == with_paths(command_argv(line), **placeholders)


def with_paths(argv, **paths):
    """Replace the values of the path flags (data_dir=..., logging_dir=..., teacher_model_path=...)."""
    argv = list(argv)
    for i, a in enumerate(argv[:-1]):
        if a.startswith("--") and a[2:] in paths:
            argv[i + 1] = str(paths[a[2:]])
    return argv


def readme(name, extra="", cwd=None, **paths):
    """The README command for ``name`` as an argv for ``cwd`` (scripts/ or the repo root)."""
    argv = with_paths(readme_commands()[name], **paths)
    path = argv[0] if cwd == SCRIPTS else os.path.join("scripts", argv[0])
    return [sys.executable, path] + argv[1:] + shlex.split(extra)


# no sample grid at each checkpoint (64 Heun samples of a 32-pixel model with attention take minutes on a CPU)
TINY = (
    "--num_channels 32 --num_res_blocks 1 --global_batch_size 4 --total_training_steps 2 --save_interval 1 "
    "--grid_samples 0"
)
# even smaller runs for the behaviour tests: 8-pixel images, two levels
SMALL = (
    "--image_size 8 --channel_mult 1,2 --attention_resolutions 4 --num_channels 32 --num_res_blocks 1 "
    "--class_cond True --dropout 0.1 --log_interval 1"
)
CT = (
    "--training_mode consistency_training --target_ema_mode fixed --start_ema 0.9 --scale_mode fixed "
    "--start_scales 10 --loss_norm l2 --ema_rate 0.9,0.99"
)
TEACHER_EMA = "ema_0.9999432189950708_000002.pt"


def env(**extra):
    e = {k: v for k, v in os.environ.items() if k not in ("CM_LPIPS_PATH", "OPENAI_LOGDIR", "CM_NO_GRAD_SYNC")}
    # one thread per process: these models are tiny, and on 2 shared cores a
    # 2-thread pool stalls at every parallel region (measured: 22 s -> 6 s a run)
    e["OMP_NUM_THREADS"] = "1"
    e.update(extra)
    return e


def run(cmd, cwd=ROOT, timeout=300, **env_extra):
    """Run a command line (list), return CompletedProcess with text output."""
    return subprocess.run(cmd, cwd=cwd, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)


def script(name, *flags):
    return [sys.executable, os.path.join(SCRIPTS, name), *shlex.split(" ".join(flags))]


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def same_state(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


def checkpoint_files(directory, step):
    return sorted(f for f in os.listdir(directory) if f.endswith(f"{step:06d}.pt"))


# ----------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """40 scikit-learn digits, upscaled to 32x32 RGB PNGs named <class>_<i>.png."""
    from sklearn.datasets import load_digits

    out = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    for i in range(40):
        img = Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8))
        img.resize((32, 32), Image.BICUBIC).convert("RGB").save(out / f"{digits.target[i]}_{i}.png")
    return out


@pytest.fixture(scope="module")
def edm_run(digits_dir, tmp_path_factory):
    """The README's EDM command, run from scripts/ with tiny sizes appended."""
    log_dir = tmp_path_factory.mktemp("edm") / "logs"
    cmd = readme("edm_train.py", TINY, cwd=SCRIPTS, data_dir=digits_dir, logging_dir=log_dir)
    proc = ok(run(cmd, cwd=SCRIPTS))
    return log_dir, proc


# ----------------------------------------------------------------------------
# The README commands


def test_readme_edm_command_trains_and_saves(edm_run):
    log_dir, proc = edm_run
    names = set(os.listdir(log_dir))
    for step in (1, 2):
        expected = {f"model{step:06d}.pt", f"opt{step:06d}.pt"}
        expected |= {f"ema_{r}_{step:06d}.pt" for r in ("0.999", "0.9999", "0.9999432189950708")}
        assert expected <= names
    assert {"args.json", "log.txt", "progress.csv"} <= names
    assert not [n for n in names if ".tmp" in n]
    args = json.loads((log_dir / "args.json").read_text())
    assert args["num_channels"] == 32 and args["lr"] == 0.0001 and args["schedule_sampler"] == "lognormal"
    assert args["logging_dir"] == str(log_dir)
    # fp16 on a CPU: one one-line warning, then float32
    if not torch.cuda.is_available():
        warnings = [line for line in proc.stderr.splitlines() if "use_fp16" in line]
        assert len(warnings) == 1 and "float32" in warnings[0]
    progress = (log_dir / "progress.csv").read_text().splitlines()
    header = progress[0].split(",")
    assert {"loss", "grad_norm", "param_norm", "samples", "step"} <= set(header)
    assert any(h.startswith("loss_q") for h in header)
    state = torch.load(log_dir / "model000002.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state.values())


def test_readme_distillation_command_starts_from_the_edm_checkpoint(edm_run, digits_dir, tmp_path):
    edm_dir, _ = edm_run
    log_dir = tmp_path / "cd"
    # the EDM run has attention at 32,16,8; the distillation command says 16,8:
    # the student must match its teacher, so that is overridden too
    extra = f"{TINY} --loss_norm l2 --attention_resolutions 32,16,8"
    teacher = edm_dir / TEACHER_EMA
    cmd = readme("cm_train.py", extra, data_dir=digits_dir, logging_dir=log_dir, teacher_model_path=teacher)
    ok(run(cmd, cwd=ROOT))  # from the repo root this time
    names = set(os.listdir(log_dir))
    for step in (1, 2):
        expected = {f"model{step:06d}.pt", f"opt{step:06d}.pt", f"target_model{step:06d}.pt"}
        expected |= {f"ema_{r}_{step:06d}.pt" for r in ("0.9999", "0.99994", "0.9999432189950708")}
        assert expected <= names
    teacher = torch.load(teacher, weights_only=True)
    student = torch.load(log_dir / "model000002.pt", weights_only=True)
    assert teacher.keys() == student.keys()
    # started from the teacher: close to it after 2 steps at lr 8e-6, but trained
    diffs = [(student[k] - teacher[k]).abs().max().item() for k in teacher]
    assert 0 < max(diffs) < 1e-3


def test_readme_commands_are_the_originals_up_to_paths(tmp_path):
    check_readme_commands()
    # the check fails when the README loses a command
    text = open(os.path.join(ROOT, "README.md")).read()
    for name in BRIEF_COMMANDS:
        stripped = tmp_path / f"README_without_{name}.md"
        stripped.write_text("\n".join(line for line in text.splitlines() if name not in line))
        with pytest.raises(AssertionError, match=f"lost its {name} command"):
            check_readme_commands(str(stripped))


# ----------------------------------------------------------------------------
# Bad inputs: one line on stderr, non-zero exit, nothing in the logging dir

BAD_INPUTS = {
    "missing_data_dir": ("edm_train.py", "--data_dir {tmp}/nowhere", "data directory not found"),
    "uniform_sampler": ("edm_train.py", "--data_dir {data} --schedule_sampler uniform", "as if they were noise levels"),
    "non_integer_flag": ("edm_train.py", "--data_dir {data} --num_channels abc", "invalid int value: 'abc'"),
    "unknown_choice": ("cm_train.py", "--data_dir {data} --training_mode foo", "invalid choice: 'foo'"),
    "edm_mode_in_cm_train": ("cm_train.py", "--data_dir {data} --training_mode edm", "edm_train.py"),
    "missing_class_prefix": ("edm_train.py", "--data_dir {noprefix} --class_cond True", "prefix"),
    "lpips_without_weights": (
        "cm_train.py",
        "--data_dir {data} --training_mode consistency_training --loss_norm lpips",
        "LPIPS",
    ),
    "resume_missing": ("edm_train.py", "--data_dir {data} --resume_checkpoint {tmp}/model000099.pt", "not found"),
    "resume_mismatch": (
        "edm_train.py",
        "--data_dir {data} --resume_checkpoint {edm}/model000002.pt --num_channels 64",
        "does not fit the model built from the flags: time_embed.0.weight has shape (128, 32) "
        "in the checkpoint, (256, 64) in the model",
    ),
}


@pytest.fixture(scope="module")
def bad_runs(edm_run, digits_dir, tmp_path_factory):
    """Every BAD_INPUTS case, run two at a time: {case: (CompletedProcess-like, logging dir)}."""
    tmp = tmp_path_factory.mktemp("bad")
    noprefix = tmp / "noprefix"
    noprefix.mkdir()
    shutil.copy(next(digits_dir.iterdir()), noprefix / "nolabel.png")
    pending, results = sorted(BAD_INPUTS), {}
    running = []
    while pending or running:
        while pending and len(running) < 2:
            case = pending.pop()
            name, flags, _ = BAD_INPUTS[case]
            log_dir = tmp / case / "logs"
            flags = flags.format(tmp=tmp / case, data=digits_dir, noprefix=noprefix, edm=edm_run[0])
            size = "--image_size 32 --num_channels 32 --num_res_blocks 1 --global_batch_size 4"
            if case == "resume_mismatch":
                size = "--image_size 32 --num_res_blocks 1 --global_batch_size 4 --class_cond True"
            proc = subprocess.Popen(
                script(name, size, flags, f"--logging_dir {log_dir}"),
                cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            running.append((case, log_dir, proc))
        case, log_dir, proc = running.pop(0)
        out, err = proc.communicate(timeout=300)
        results[case] = (proc.returncode, out, err, log_dir)
    return results


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(case, bad_runs):
    name, _, expected = BAD_INPUTS[case]
    returncode, _, stderr, log_dir = bad_runs[case]
    assert returncode != 0
    # one error line; only a one-line warning (fp16 on CPU) may precede it
    lines = [line for line in stderr.splitlines() if line.strip() and "Warning: " not in line]
    assert len(lines) == 1 and lines[0].startswith(f"{name}: error:"), stderr
    assert expected in lines[0]
    assert "Traceback" not in stderr
    assert not log_dir.exists()


def test_checkpoint_that_does_not_fit_names_key_and_shapes(edm_run, digits_dir, tmp_path):
    # the README's distillation flags (attention 16,8) against the EDM run's teacher (32,16,8)
    log_dir = tmp_path / "logs"
    log_dir.mkdir()  # an existing, empty logging dir stays empty
    teacher = edm_run[0] / TEACHER_EMA
    cmd = readme(
        "cm_train.py", f"{TINY} --loss_norm l2", cwd=SCRIPTS, data_dir=digits_dir, logging_dir=log_dir,
        teacher_model_path=teacher,
    )
    proc = run(cmd, cwd=SCRIPTS)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("cm_train.py: error:") and str(teacher) in last
    assert "unexpected key input_blocks.1.1.norm.weight (checkpoint: (32,))" in last
    assert os.listdir(log_dir) == []


# ----------------------------------------------------------------------------
# Consistency training, exact resume; progressive distillation


def test_consistency_training_resumes_exactly(digits_dir, tmp_path):
    """4 straight steps == 2 steps, stop, auto-resume, 2 steps: every file bit for bit.

    Batch 12 of 40 images: 3 steps per epoch, so the resume lands mid-epoch
    and the last step starts a new epoch.
    """
    common = f"{SMALL} {CT} --data_dir {digits_dir} --global_batch_size 12 --save_interval 2"
    straight, split = tmp_path / "straight", tmp_path / "split"
    ok(run(script("cm_train.py", common, f"--logging_dir {straight} --total_training_steps 4")))
    ok(run(script("cm_train.py", common, f"--logging_dir {split} --total_training_steps 2")))
    assert checkpoint_files(split, 4) == []
    resume = f"--logging_dir {split} --total_training_steps 4 --resume_checkpoint auto"
    proc = ok(run(script("cm_train.py", common, resume)))
    assert f"loading model from checkpoint: {split / 'model000002.pt'}" in proc.stdout
    files = checkpoint_files(straight, 4)
    assert files == [
        "ema_0.99_000004.pt", "ema_0.9_000004.pt", "model000004.pt", "opt000004.pt", "target_model000004.pt"
    ]
    assert checkpoint_files(split, 4) == files
    for name in files:
        a = torch.load(straight / name, weights_only=True)
        b = torch.load(split / name, weights_only=True)
        assert same_state(a, b), name
    # the resumed run logs steps 2 and 3 with the straight run's values
    def rows(d):
        lines = (d / "progress.csv").read_text().splitlines()
        header = lines[0].split(",")
        return [dict(zip(header, line.split(","))) for line in lines[1:]]

    assert [r["loss"] for r in rows(straight)][2:] == [r["loss"] for r in rows(split)]


def test_progdist_runs_and_saves(digits_dir, tmp_path):
    # an 8-pixel EDM "teacher" (random weights) in the checkpoint format: a plain state_dict
    from cm.script_util import create_model_and_diffusion, model_and_diffusion_defaults

    kw = model_and_diffusion_defaults()
    kw.update(
        image_size=8, channel_mult="1,2", attention_resolutions="4", num_channels=32, num_res_blocks=1, class_cond=True
    )
    teacher_model, _ = create_model_and_diffusion(**kw)
    with torch.no_grad():
        for p in teacher_model.parameters():
            p.normal_(0, 0.02)
    teacher = tmp_path / "teacher.pt"
    torch.save(teacher_model.state_dict(), teacher)

    log_dir = tmp_path / "pd"
    flags = (
        f"{SMALL} --data_dir {digits_dir} --logging_dir {log_dir} --teacher_model_path {teacher} "
        "--training_mode progdist --scale_mode progdist --start_ema 0.0 --start_scales 4 --distill_steps_per_iter 1 "
        "--loss_norm l2 --global_batch_size 4 --total_training_steps 2 --save_interval 1"
    )
    proc = ok(run(script("cm_train.py", flags)))
    assert "progdist: N 4 -> 2 at step 1" in proc.stdout
    for step in (1, 2):
        assert {f"model{step:06d}.pt", f"teacher_model{step:06d}.pt", f"opt{step:06d}.pt"} <= set(os.listdir(log_dir))
    assert not [n for n in os.listdir(log_dir) if n.startswith("target_model")]
    # step 1 started a new stage: the teacher saved after it is the student saved before it
    student1 = torch.load(log_dir / "model000001.pt", weights_only=True)
    teacher2 = torch.load(log_dir / "teacher_model000002.pt", weights_only=True)
    assert same_state(student1, teacher2)
    teacher1 = torch.load(log_dir / "teacher_model000001.pt", weights_only=True)
    assert same_state(teacher1, torch.load(teacher, weights_only=True))


# ----------------------------------------------------------------------------
# Crashes and signals


def wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early with {proc.returncode}: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out")


def test_sigkill_after_save_then_auto_resume_then_sigterm(digits_dir, tmp_path):
    log_dir = tmp_path / "logs"
    common = f"{SMALL} --data_dir {digits_dir} --global_batch_size 4 --logging_dir {log_dir}"
    # 1. killed with SIGKILL right after the checkpoint of step 2 appears
    first = subprocess.Popen(
        script("edm_train.py", common, "--save_interval 1 --total_training_steps 10000"),
        cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: (log_dir / "model000002.pt").exists(), first)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    steps = sorted(int(m.group(1)) for m in map(re.compile(r"model(\d+)\.pt$").match, os.listdir(log_dir)) if m)
    latest = steps[-1]
    assert latest >= 2
    for step in steps:  # every model file has its siblings and loads
        assert {f"opt{step:06d}.pt", f"ema_0.9999_{step:06d}.pt"} <= set(os.listdir(log_dir))
        torch.load(log_dir / f"model{step:06d}.pt", weights_only=True)

    # 2. auto-resume picks the newest complete checkpoint; SIGTERM saves the current step
    (log_dir / "progress.csv").unlink()  # rows appear again once the new run trains
    second = subprocess.Popen(
        script("edm_train.py", common, "--save_interval 1000 --total_training_steps 10000 --resume_checkpoint auto"),
        cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )

    def rows():
        csv = log_dir / "progress.csv"
        return len(csv.read_text().splitlines()) - 1 if csv.exists() else 0

    wait_for(lambda: rows() >= 2, second)
    second.send_signal(signal.SIGTERM)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert f"loading model from checkpoint: {log_dir / f'model{latest:06d}.pt'}" in out
    stopped = int(re.search(r"SIGTERM received: stopping after step (\d+)", out).group(1))
    assert stopped > latest + 1 and stopped % 1000 != 0
    assert checkpoint_files(log_dir, stopped) == [
        f"ema_0.9999_{stopped:06d}.pt",
        f"model{stopped:06d}.pt",
        f"opt{stopped:06d}.pt",
    ]


# ----------------------------------------------------------------------------
# Several processes


def two_process_run(launcher, out_dir, log_dir, digits_dir, **env_extra):
    flags = shlex.split(f"{SMALL} --data_dir {digits_dir} --global_batch_size 4 --total_training_steps 3 "
                        f"--save_interval 3 --logging_dir {log_dir}")
    if launcher == "mpiexec":
        prefix = [MPIEXEC, "-n", "2", sys.executable]
    else:  # torchrun
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = prefix + [DUMP, str(out_dir), "edm_train", *flags]
    ok(run(cmd, **env_extra))
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def identical(a, b):
    return all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))


@pytest.mark.skipif(MPIEXEC is None, reason="needs mpiexec (on PATH or next to sys.executable)")
def test_two_processes_sync_gradients_under_mpiexec_and_torchrun(digits_dir, tmp_path):
    mpi = two_process_run("mpiexec", tmp_path / "mpi", tmp_path / "mpi_logs", digits_dir)
    tr = two_process_run("torchrun", tmp_path / "tr", tmp_path / "tr_logs", digits_dir)
    unsynced = two_process_run(
        "mpiexec", tmp_path / "nosync", tmp_path / "nosync_logs", digits_dir, CM_NO_GRAD_SYNC="1"
    )
    for r0, r1 in (mpi, tr):
        assert r0["world"] == r1["world"] == 2 and r0["step"] == r1["step"] == 3
        assert r0["ddp"] == "DistributedDataParallel"
        assert identical(r0, r1)
        # only rank 0 writes checkpoints
        assert r1["saved"] == [] and len(r0["saved"]) == 3
    # the ranks see different images: without the all-reduce they drift apart
    assert unsynced[0]["ddp"] == "UNetModel"
    assert not identical(unsynced[0], unsynced[1])
    # both launchers compute the same training run
    assert identical(mpi[0], tr[0])
    assert sorted(os.listdir(tmp_path / "mpi_logs")) == [
        "args.json", "ema_0.9999_000003.pt", "log.txt", "meta000003.json", "model000003.pt", "opt000003.pt",
        "progress.csv", "samples_000003.png",
    ]
