"""Scripts on a JAX/Flax checkpoint: convert round trip, image_sample, cm_train teacher, bad input (in-process)."""

import json
import os

import msgpack
import numpy as np
import pytest
import torch

from cm.cli import run_cli
from cm.formats.jax_checkpoint import read_jax_checkpoint
from cm.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from song_helpers import ROOT, image_folder, load_script, one_thread  # noqa: F401  (autouse fixture)

CKPT = ROOT / "tests" / "data" / "jax" / "checkpoint_80"
SAMPLE = "--image_size 16 --num_samples 3 --batch_size 2"


def run_script(name, argv, capsys):
    rc = run_cli(load_script(name).main, argv.split())
    out = capsys.readouterr()
    return rc, out.out, out.err


def samples(folder):
    (name,) = [n for n in os.listdir(folder) if n.endswith(".npz")]
    return np.load(os.path.join(folder, name))["arr_0"]


def test_convert_round_trip_and_sampling(tmp_path, capsys):
    rc, out, err = run_script("convert_jax_checkpoint", f"--checkpoint {CKPT} --out {tmp_path}/cd.pt --image_size 16",
                              capsys)
    assert rc == 0, err
    flags = json.loads((tmp_path / "cd.json").read_text())["flags"]
    printed = out.split("flags: ", 1)[1].strip()
    assert "--arch ncsnpp" in printed and "--channel_mult 1,2" in printed and "--attention_resolutions 8" in printed

    # the .pt loads strict=True into --arch ncsnpp built from the printed flags
    model, _ = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **flags})
    model.load_state_dict(torch.load(tmp_path / "cd.pt", weights_only=True), strict=True)
    ref, _ = read_jax_checkpoint(CKPT, image_size=16)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())

    cd = "--training_mode consistency_distillation --sampler onestep"
    rc, _, err = run_script("image_sample", f"{cd} {SAMPLE} --model_path {CKPT} --logging_dir {tmp_path}/jax", capsys)
    assert rc == 0, err
    rc, _, err = run_script(
        "image_sample", f"{cd} {SAMPLE} --model_path {tmp_path}/cd.pt {printed} --logging_dir {tmp_path}/pt", capsys
    )
    assert rc == 0, err
    direct, converted = samples(tmp_path / "jax"), samples(tmp_path / "pt")
    assert direct.shape == (3, 16, 16, 3) and np.array_equal(direct, converted)
    args = json.loads((tmp_path / "jax" / "args.json").read_text())
    assert args["arch"] == "ncsnpp" and args["num_channels"] == 8  # the file set the network flags

    # multistep with the consistency model and Heun with EDM scalings also run on the file
    multi = "--training_mode consistency_distillation --sampler multistep --ts 0,10,17 --steps 18"
    rc, _, err = run_script("image_sample", f"{multi} {SAMPLE} --model_path {CKPT} --logging_dir {tmp_path}/multi",
                            capsys)
    assert rc == 0, err
    heun = "--training_mode edm --sampler heun --steps 3"
    rc, _, err = run_script("image_sample", f"{heun} {SAMPLE} --model_path {CKPT} --logging_dir {tmp_path}/heun",
                            capsys)
    assert rc == 0, err
    assert not np.array_equal(samples(tmp_path / "multi"), direct)
    assert samples(tmp_path / "heun").shape == (3, 16, 16, 3)


def test_cm_train_distils_from_a_jax_teacher(tmp_path, capsys):
    data = image_folder(tmp_path / "images", 16)
    argv = (
        f"--training_mode consistency_distillation --teacher_model_path {CKPT} --image_size 16 --data_dir {data} "
        f"--logging_dir {tmp_path}/cd --loss_norm l2 --global_batch_size 4 --total_training_steps 1 "
        "--save_interval 1 --weight_schedule uniform --scale_mode fixed --start_scales 18 --lr 0.000008"
    )
    rc, _, err = run_script("cm_train", argv, capsys)
    assert rc == 0, err
    teacher, _ = read_jax_checkpoint(CKPT, image_size=16)
    student = torch.load(tmp_path / "cd" / "model000001.pt", weights_only=True)
    assert student.keys() == teacher.keys()
    diffs = [(student[k] - teacher[k]).abs().max().item() for k in teacher]
    assert 0 < max(diffs) < 1e-3  # started from the teacher, then trained one step


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("convert_jax_checkpoint", "--checkpoint {bad} --out {tmp}/x.pt",
         "{bad}: not a consistency-model state or NCSN++ parameter tree (top-level keys: step, opt)"),
        ("convert_jax_checkpoint", "--checkpoint {ckpt} --out {tmp}/nowhere/x.pt", "--out: folder"),
        ("image_sample", "--model_path {bad} --image_size 16 --logging_dir {tmp}/s",
         "--model_path: {bad}: not a consistency-model state"),
        ("image_sample", "--model_path {ckpt} --image_size 16 --num_channels 64 --logging_dir {tmp}/s",
         "--num_channels 64 contradicts --model_path"),
    ],
    ids=["not-a-state", "no-out-folder", "sample-not-a-state", "contradicting-flag"],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, script, argv, message):
    bad = tmp_path / "bad_state"
    bad.write_bytes(msgpack.packb({"step": 1, "opt": {"0": 2}}))
    fmt = dict(bad=bad, tmp=tmp_path, ckpt=CKPT)
    rc, _, err = run_script(script, argv.format(**fmt), capsys)
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and message.format(**fmt) in lines[0], err
    assert sorted(os.listdir(tmp_path)) == ["bad_state"]
