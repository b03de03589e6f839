"""Scripts on a JAX/Flax checkpoint: convert round trip, image_sample, cm_train teacher, bad input."""

import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cm.jax_checkpoint import read_jax_checkpoint
from cm.script_util import create_model_and_diffusion, model_and_diffusion_defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "tests", "data", "jax", "checkpoint_80")
SAMPLE = "--image_size 16 --num_samples 3 --batch_size 2"


def run(name, flags, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_LOGDIR", "CM_LPIPS_PATH")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.join(ROOT, "scripts", name), *shlex.split(flags)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def samples(folder):
    (name,) = [n for n in os.listdir(folder) if n.endswith(".npz")]
    return np.load(os.path.join(folder, name))["arr_0"]


def test_convert_round_trip_and_sampling(tmp_path):
    out = ok(run("convert_jax_checkpoint.py", f"--checkpoint {CKPT} --out {tmp_path}/cd.pt --image_size 16", tmp_path))
    flags = json.loads((tmp_path / "cd.json").read_text())["flags"]
    printed = out.stdout.split("flags: ", 1)[1].strip()
    assert "--arch ncsnpp" in printed and "--channel_mult 1,2" in printed and "--attention_resolutions 8" in printed

    # the .pt loads strict=True into --arch ncsnpp built from the printed flags
    model, _ = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **flags})
    model.load_state_dict(torch.load(tmp_path / "cd.pt", weights_only=True), strict=True)
    ref, _ = read_jax_checkpoint(CKPT, image_size=16)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())

    cd = "--training_mode consistency_distillation --sampler onestep"
    ok(run("image_sample.py", f"{cd} {SAMPLE} --model_path {CKPT} --logging_dir {tmp_path}/jax", tmp_path))
    ok(run("image_sample.py", f"{cd} {SAMPLE} --model_path {tmp_path}/cd.pt {printed} --logging_dir {tmp_path}/pt",
           tmp_path))
    direct, converted = samples(tmp_path / "jax"), samples(tmp_path / "pt")
    assert direct.shape == (3, 16, 16, 3) and np.array_equal(direct, converted)
    args = json.loads((tmp_path / "jax" / "args.json").read_text())
    assert args["arch"] == "ncsnpp" and args["num_channels"] == 8  # the file set the network flags

    # multistep with the consistency model and Heun with EDM scalings also run on the file
    multi = "--training_mode consistency_distillation --sampler multistep --ts 0,10,17 --steps 18"
    ok(run("image_sample.py", f"{multi} {SAMPLE} --model_path {CKPT} --logging_dir {tmp_path}/multi", tmp_path))
    ok(run("image_sample.py", f"--training_mode edm --sampler heun --steps 3 {SAMPLE} --model_path {CKPT} "
                              f"--logging_dir {tmp_path}/heun", tmp_path))
    assert not np.array_equal(samples(tmp_path / "multi"), direct)
    assert samples(tmp_path / "heun").shape == (3, 16, 16, 3)


def test_cm_train_distils_from_a_jax_teacher(tmp_path):
    from sklearn.datasets import load_digits

    data = tmp_path / "digits"
    data.mkdir()
    digits = load_digits()
    for i in range(4):
        img = Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8)).resize((16, 16))
        img.convert("RGB").save(data / f"{digits.target[i]}_{i}.png")
    flags = (
        f"--training_mode consistency_distillation --teacher_model_path {CKPT} --image_size 16 --data_dir {data} "
        f"--logging_dir {tmp_path}/cd --loss_norm l2 --global_batch_size 4 --total_training_steps 1 "
        "--save_interval 1 --weight_schedule uniform --scale_mode fixed --start_scales 18 --lr 0.000008"
    )
    ok(run("cm_train.py", flags, tmp_path))
    teacher, _ = read_jax_checkpoint(CKPT, image_size=16)
    student = torch.load(tmp_path / "cd" / "model000001.pt", weights_only=True)
    assert student.keys() == teacher.keys()
    diffs = [(student[k] - teacher[k]).abs().max().item() for k in teacher]
    assert 0 < max(diffs) < 1e-3  # started from the teacher, then trained one step


@pytest.mark.parametrize(
    "script, flags, message",
    [
        ("convert_jax_checkpoint.py", "--checkpoint {bad} --out {tmp}/x.pt",
         "{bad}: not a consistency-model state or NCSN++ parameter tree (top-level keys: step, opt)"),
        ("convert_jax_checkpoint.py", "--checkpoint {ckpt} --out {tmp}/nowhere/x.pt", "--out: folder"),
        ("image_sample.py", "--model_path {bad} --image_size 16 --logging_dir {tmp}/s",
         "--model_path: {bad}: not a consistency-model state"),
    ],
    ids=["not-a-state", "no-out-folder", "sample-not-a-state"],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, script, flags, message):
    import msgpack

    bad = tmp_path / "bad_state"
    bad.write_bytes(msgpack.packb({"step": 1, "opt": {"0": 2}}))
    fmt = dict(bad=bad, tmp=tmp_path, ckpt=CKPT)
    proc = run(script, flags.format(**fmt), tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message.format(**fmt) in lines[0], proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["bad_state"]
