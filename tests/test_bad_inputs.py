"""Every script's bad inputs, through its in-process ``main(argv)`` under `run_cli`: exit
status non-zero, ONE line on stderr naming the flag or the file, nothing written.
(test_train_scripts.py runs a few of these as real processes; test_train_processes.py the
multi-process ones.)"""

import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cm.cli import run_cli
from cm.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from cm.train_util import per_rank_batch_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NET = dict(image_size=8, channel_mult="1,2", attention_resolutions="4", num_channels=32, num_res_blocks=1)
EDM = [x for k, v in NET.items() for x in (f"--{k}", str(v))] + ["--global_batch_size", "2"]
TRAIN = EDM + ["--loss_norm", "l2"]
CT = ["--training_mode", "consistency_training"]

_scripts = {}


def script(name):
    if name not in _scripts:
        spec = importlib.util.spec_from_file_location(f"_bad_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _scripts[name] = module
    return _scripts[name]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    (d / "data").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(d / "data" / f"{i}.png")
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **NET})
    torch.save(model.state_dict(), d / "teacher.pt")
    wrong = {k: v for k, v in model.state_dict().items() if not k.startswith("out.")}
    torch.save(wrong, d / "model000002.pt")
    np.savez(d / "stats.npz", mu=np.zeros(4), sigma=np.eye(4))
    return d


CASES = {
    # cm_train.py
    "cm_teacher_missing_flag": ("cm_train", TRAIN + ["--data_dir", "{d}/data"],
                                "--training_mode consistency_distillation needs --teacher_model_path"),
    "cm_teacher_not_found": ("cm_train", TRAIN + ["--data_dir", "{d}/data", "--teacher_model_path", "{d}/nope.pt"],
                             "{d}/nope.pt"),
    "cm_total_steps_zero": ("cm_train", TRAIN + CT + ["--data_dir", "{d}/data", "--total_training_steps", "0"],
                            "--total_training_steps"),
    "cm_mode_pair": ("cm_train", TRAIN + CT + ["--data_dir", "{d}/data", "--target_ema_mode", "adaptive",
                                               "--scale_mode", "fixed"], "target_ema_mode"),
    "cm_data_dir_missing": ("cm_train", TRAIN + CT + ["--data_dir", "{d}/nowhere"], "{d}/nowhere"),
    "cm_resume_mismatch": ("cm_train", TRAIN + CT + ["--data_dir", "{d}/data", "--resume_checkpoint",
                                                     "{d}/model000002.pt"], "{d}/model000002.pt"),
    "cm_schedule_sampler": ("cm_train", TRAIN + CT + ["--data_dir", "{d}/data", "--schedule_sampler",
                                                      "loss-second-moment"], "--schedule_sampler"),
    # edm_train.py
    "edm_ema_rate_text": ("edm_train", EDM + ["--data_dir", "{d}/data", "--ema_rate", "0.9,abc"], "--ema_rate"),
    "edm_ema_rate_range": ("edm_train", EDM + ["--data_dir", "{d}/data", "--ema_rate", "1.5"], "--ema_rate"),
    "edm_image_size": ("edm_train", ["--image_size", "48", "--data_dir", "{d}/data"], "channel_mult"),
    "edm_batch_size": ("edm_train", EDM + ["--data_dir", "{d}/data", "--batch_size", "-3"], "--batch_size"),
    # fid.py
    "fid_sample_missing": ("fid", ["--sample_npz", "{d}/nope.npz", "--ref", "{d}/stats.npz"], "{d}/nope.npz"),
    "fid_no_sample": ("fid", ["--ref", "{d}/stats.npz"], "--sample_npz"),
    # ternary_search.py
    "ternary_no_model": ("ternary_search", ["--ref", "{d}/stats.npz"], "--model_path"),
    "ternary_model_missing": ("ternary_search", ["--model_path", "{d}/nope.pt", "--ref", "{d}/stats.npz"],
                              "{d}/nope.pt"),
    "ternary_no_ref": ("ternary_search", ["--model_path", "{d}/teacher.pt"], "--ref"),
    "ternary_bad_begin": ("ternary_search", ["--model_path", "{d}/teacher.pt", "--ref", "{d}/stats.npz",
                                             "--begin", "3,1"], "--begin"),
    # demo.py
    "demo_bad_number": ("demo", ["--out", "{d}/demo", "--edm_steps", "many"], "--edm_steps"),
    "demo_unknown_flag": ("demo", ["--out", "{d}/demo", "--bogus", "1"], "--bogus"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_naming_the_flag_or_file(case, files, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_LOGDIR", raising=False)
    name, argv, expected = CASES[case]
    argv = [a.format(d=files) for a in argv]
    out_dir = files / "out" / case
    if name in ("cm_train", "edm_train", "ternary_search"):
        argv += ["--logging_dir", str(out_dir)]
    try:
        code = run_cli(script(name).main, argv)
    except SystemExit as exc:  # argparse errors exit directly (status 2)
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None) and len(lines) == 1, err
    assert "error:" in lines[0] and expected.format(d=files) in lines[0], lines[0]
    assert not out_dir.exists() and not (files / "demo").exists()


def test_a_global_batch_below_the_world_size_is_one_line():
    with pytest.raises(ValueError, match="--global_batch_size 1 is smaller than the 2 processes"):
        per_rank_batch_size(1, -1, 2)
