"""iCT and ECT in the consistency loop and in cm_train.py: logging, checkpoints,
bit-exact resume across an N / stage change, presets, --init_from and bad input."""

import os
import subprocess
import sys

import pytest
import torch

from cm import logger
from cm.recipes import ect_ema_and_scales_fn, ict_ema_and_scales_fn
from cm.script_util import create_model_and_diffusion, model_and_diffusion_defaults

from test_train_util import cm_loop, one_thread  # noqa: F401  (one_thread: autouse fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 4
SMALL = dict(image_size=8, channel_mult="1,2", num_channels=32, num_res_blocks=1, attention_resolutions="4")


def build(mode, dropout=0.2):
    kw = dict(model_and_diffusion_defaults(), **SMALL, dropout=dropout, distillation=True, loss_norm="l2")
    torch.manual_seed(0)
    return create_model_and_diffusion(**kw)


class StepData:
    """Batch k is a function of k alone; `seek` is what the loop calls on resume."""

    def __init__(self):
        self.step = 0

    def seek(self, step):
        self.step = step

    def __next__(self):
        g = torch.Generator().manual_seed(1000 + self.step)
        self.step += 1
        return torch.rand(BATCH, 3, 8, 8, generator=g) * 2 - 1, {}


def recipe_loop(tmp_path, mode, **kw):
    """test_train_util's consistency loop, with no teacher and no target model, on `StepData`."""
    model, diffusion = build(mode)
    # iCT: K = 16 gives K' = 2, so N goes 11 -> 21 at step 2; ECT: a new stage every 2 steps
    fn = ict_ema_and_scales_fn(16) if mode == "ict" else ect_ema_and_scales_fn(2)
    kw = dict(model=model, diffusion=diffusion, target_model=None, data=StepData(), **kw)
    return cm_loop(tmp_path, mode, teacher=False, ema_scale_fn=fn, huber_c=0.01 if mode == "ict" else 0.0, **kw)


def files(d, step):
    return sorted(f for f in os.listdir(d) if f.endswith(f"{step:06d}.pt"))


@pytest.mark.parametrize("mode", ["ict", "ect"])
def test_resume_across_an_n_or_stage_change_is_bit_exact(tmp_path, mode):
    logger.configure(dir=str(tmp_path / "log"), format_strs=["csv"])
    try:
        straight = recipe_loop(tmp_path / "a", mode)
        assert [straight.ema_scale_fn(k)[1] for k in range(4)] == ([11, 11, 21, 21] if mode == "ict" else [0, 0, 1, 1])
        straight.run_loop()
        recipe_loop(tmp_path / "b", mode, total_training_steps=2).run_loop()
        resumed = recipe_loop(tmp_path / "b", mode, resume_checkpoint="auto")
        assert resumed.step == 2
        resumed.run_loop()
    finally:
        logger.reset()
    names = files(tmp_path / "a", 4)
    assert names == ["ema_0.99_000004.pt", "ema_0.9_000004.pt", "model000004.pt", "opt000004.pt"]
    assert files(tmp_path / "b", 4) == names
    for name in names:
        a = torch.load(tmp_path / "a" / name, weights_only=True)
        b = torch.load(tmp_path / "b" / name, weights_only=True)
        flat_a = a if "opt" not in name else {k: v for s in a["state"].values() for k, v in s.items()}
        flat_b = b if "opt" not in name else {k: v for s in b["state"].values() for k, v in s.items()}
        for k in flat_a:
            assert torch.equal(torch.as_tensor(flat_a[k]), torch.as_tensor(flat_b[k])), (name, k)
    progress = (tmp_path / "log" / "progress.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "t_mean", "r_over_t", "r_zero"} <= set(progress)
    assert any(k.startswith("loss_q") for k in progress)
    assert ("num_scales" if mode == "ict" else "stage") in progress


# ----------------------------------------------------------------------------
# cm_train.py


def script(*flags, log_dir):
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "cm_train.py"), *flags, "--logging_dir", str(log_dir)]
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_LOGDIR", "CM_LPIPS_PATH")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from PIL import Image

    out = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        pixels = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(out / f"{i % 2}_{i}.png")
    return out


@pytest.fixture(scope="module")
def edm_pt(tmp_path_factory):
    """An 'EDM checkpoint' of the small network (random weights, plain state_dict)."""
    path = tmp_path_factory.mktemp("edm") / "ema_0.9999_000002.pt"
    torch.save(build("ect")[0].state_dict(), path)
    return path


NET = "--image_size 8 --channel_mult 1,2 --num_channels 32 --num_res_blocks 1 --attention_resolutions 4"


def test_ect_run_starts_from_init_from_applies_the_preset_and_logs(data_dir, edm_pt, tmp_path):
    log_dir = tmp_path / "logs"
    flags = f"{NET} --training_mode ect --init_from {edm_pt} --data_dir {data_dir} --global_batch_size 4 "
    flags += "--total_training_steps 2 --save_interval 2 --log_interval 1 --ect_double 1"
    proc = script(*flags.split(), log_dir=log_dir)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "ect preset: dropout=0.2, ema_rate=0.9999, lr=0.0001, random_flip=False, sigma_min=0.003" in out  # batch, steps given
    header = (log_dir / "progress.csv").read_text().splitlines()[0].split(",")
    assert {"stage", "t_mean", "r_over_t", "r_zero", "loss_q1"} <= set(header)
    assert files(log_dir, 2) == ["ema_0.9999_000002.pt", "model000002.pt", "opt000002.pt"]
    # the tuned model moved away from its initialisation
    init = torch.load(edm_pt, weights_only=True)
    tuned = torch.load(log_dir / "model000002.pt", weights_only=True)
    assert any(not torch.equal(init[k], tuned[k]) for k in init)


BAD = {
    "ect_without_init": ("--training_mode ect", "give --init_from"),
    "init_not_fitting": ("--training_mode ect --init_from {edm} --num_channels 64", "does not fit the model"),
    "init_missing": ("--training_mode ict --init_from {tmp}/nothing.pt", "--init_from"),
    "init_for_cd": ("--training_mode consistency_training --init_from none", "--init_from is for"),
}


def test_bad_recipe_input_is_one_line_and_writes_nothing(data_dir, edm_pt, tmp_path):
    procs = {}
    for case, (flags, _) in BAD.items():
        flags = f"{NET} --data_dir {data_dir} --global_batch_size 4 " + flags.format(edm=edm_pt, tmp=tmp_path)
        procs[case] = script(*flags.split(), log_dir=tmp_path / case)
    for case, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 1 and len(lines) == 1, (case, err[-2000:])
        assert lines[0].startswith("cm_train.py: error:") and BAD[case][1] in lines[0], (case, lines)
        assert not (tmp_path / case).exists()


def cm_train_parser():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cm_train_script", os.path.join(ROOT, "scripts", "cm_train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.create_argparser()


def test_presets_fill_only_flags_not_given_and_leave_other_modes_alone():
    from cm.recipe_flags import apply_recipe_preset, explicit_flags
    from cm.recipes import pseudo_huber_c

    parser = cm_train_parser()

    def resolved(argv):
        args = parser.parse_args(argv)
        apply_recipe_preset(args, explicit_flags(parser, argv))
        return args

    ect = resolved(["--training_mode", "ect", "--lr=3e-5", "--global_batch", "64"])  # --k=v and an abbreviation
    assert (ect.lr, ect.global_batch_size, ect.dropout, ect.ema_rate) == (3e-5, 64, 0.2, "0.9999")
    assert (ect.total_training_steps, ect.ect_double, ect.huber_c, ect.sigma_min) == (200000, 25000, 0.0, 0.003)
    assert ect.random_flip is False and resolved(["--training_mode", "ect", "--random_flip", "True"]).random_flip
    ict = resolved(["--training_mode", "ict", "--image_size", "32"])
    assert (ict.dropout, ict.ema_rate, ict.global_batch_size, ict.start_scales, ict.end_scales) == (
        0.3, "0.99993", 1024, 10, 1280
    )
    assert ict.huber_c == pytest.approx(pseudo_huber_c(3 * 32 * 32))
    assert resolved(["--training_mode", "ict", "--huber_c", "0.5"]).huber_c == 0.5
    for mode in ("consistency_distillation", "consistency_training", "progdist"):
        args, plain = resolved(["--training_mode", mode]), parser.parse_args(["--training_mode", mode])
        assert vars(args) == vars(plain)


def test_ect_starts_from_an_edm_pkl_whose_flags_it_adopts(tmp_path, capsys, monkeypatch):
    from cm.cli import run_cli
    from cm.formats.edm_pickle import load_edm_pickle
    from song_helpers import EDM, image_folder, load_script

    monkeypatch.delenv("OPENAI_LOGDIR", raising=False)
    pkl = EDM / "snapshot_ddpmpp_cond_small.pkl"
    argv = (f"--training_mode ect --init_from {pkl} --lr 0 --global_batch_size 2 --total_training_steps 1 "
            f"--save_interval 1 --data_dir {image_folder(tmp_path / 'data', 16)} --logging_dir {tmp_path / 'ect'}")
    try:
        assert run_cli(load_script("cm_train").main, argv.split()) == 0, capsys.readouterr().err
    finally:
        logger.reset()  # the in-process run configured the logger: later tests must not write to its files
    tuned = torch.load(tmp_path / "ect" / "model000001.pt", weights_only=True)
    source, _ = load_edm_pickle(pkl)
    kept = {k: v for k, v in source.state_dict().items() if not k.startswith("map_augment.")}
    assert tuned.keys() == kept.keys()  # the file's augment_dim 9: built without map_augment (no augmentation)
    assert all(torch.equal(tuned[k], v) for k, v in kept.items())  # lr 0: still the EDM weights
    assert run_cli(load_script("cm_train").main, (argv + " --num_channels 64").split()) == 1
    assert "--num_channels 64 contradicts --init_from" in capsys.readouterr().err


def test_ect_run_stores_its_sigma_min_and_a_resume_keeps_it(tmp_path, capsys, monkeypatch):
    """σ_min (0.003 for ECT) rides in metaNNNNNN.json: a resume without --sigma_min keeps the run's, and
    image_sample.py's resolution reads it beside an EMA file."""
    import json

    from cm.cli import run_cli
    from cm.sample_util import create_argparser, resolve_sampling, sample_flag_defaults
    from song_helpers import EDM, image_folder, load_script

    monkeypatch.delenv("OPENAI_LOGDIR", raising=False)
    pkl = EDM / "snapshot_ddpmpp_cond_small.pkl"
    run = tmp_path / "ect"
    argv = (f"--training_mode ect --init_from {pkl} --global_batch_size 2 --save_interval 1 "
            f"--data_dir {image_folder(tmp_path / 'data', 16)} --logging_dir {run}")
    try:
        assert run_cli(load_script("cm_train").main, (argv + " --total_training_steps 1").split()) == 0
        assert json.loads((run / "meta000001.json").read_text())["flags"]["sigma_min"] == 0.003  # ECT's default
        assert run_cli(load_script("cm_train").main, (argv + " --total_training_steps 2 --sigma_min 0.0025 "
                                                      "--resume_checkpoint auto").split()) == 0
        assert json.loads((run / "meta000002.json").read_text())["flags"]["sigma_min"] == 0.0025  # given: taken
        assert run_cli(load_script("cm_train").main, (argv + " --total_training_steps 3 "
                                                      "--resume_checkpoint auto").split()) == 0, capsys.readouterr().err
    finally:
        logger.reset()
    assert json.loads((run / "meta000003.json").read_text())["flags"]["sigma_min"] == 0.0025  # kept on resume
    assert "--sigma_min 0.0025 from" in (run / "log.txt").read_text()
    args = create_argparser(dict(sample_flag_defaults(), sigmas="", quantize="")).parse_args(
        ["--training_mode", "ect", "--model_path", str(run / "ema_0.9999_000003.pt")])
    resolve_sampling(args)
    assert args.sigma_min == 0.0025
