"""Training-loop behaviours pinned to the original's: progdist stage lr, the consistency
loop's stopping rule, resuming from a non-model file, the flip flag, and the real
float16 path (loss scaling, skipped and retried steps, the saved loss scale) run on
CPU with a tiny float16 UNet."""

import importlib.util
import os

import pytest
import torch

import test_train_util as base
from cm import fp16_util, logger, script_util
from cm.schedules import create_ema_and_scales_fn
from test_train_util import BATCH, assert_same, cm_loop, edm_loop, params, read_csv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def batch(seed=0):
    return next(base.synthetic_data(seed))


# --- progressive distillation ----------------------------------------------------------------


def test_progdist_new_stage_first_step_runs_at_the_annealed_lr(tmp_path):
    # N = 4, 2, 2, 1: step 1 starts a stage with a fresh optimiser
    fn = create_ema_and_scales_fn("fixed", 0.0, "progdist", 4, 4, 4, 1)
    loop = cm_loop(tmp_path, training_mode="progdist", ema_scale_fn=fn, lr_anneal_steps=4)
    seen, optimize = [], loop.mp_trainer.optimize
    loop.mp_trainer.optimize = lambda opt: seen.append((opt, opt.param_groups[0]["lr"])) or optimize(opt)
    for _ in range(2):
        loop.run_step(*batch())
    assert seen[0][0] is not seen[1][0]  # a fresh optimiser for the new stage
    seen = [lr for _, lr in seen]
    assert seen == pytest.approx([1e-3, 7.5e-4])  # lr·(1 − k/4), also for the stage's first step


# --- when the consistency loop stops ---------------------------------------------------------


def test_consistency_loop_runs_to_total_steps_with_lr_zero_after_annealing(tmp_path):
    with logger.scoped_configure(dir=str(tmp_path / "log"), format_strs=["csv", "log"]):
        loop = cm_loop(tmp_path, lr_anneal_steps=2, total_training_steps=4, save_interval=100)
        loop.run_loop()
    assert loop.step == 4
    lrs = [float(r["lr"]) for r in read_csv(tmp_path / "log" / "progress.csv")]
    assert lrs == pytest.approx([1e-3, 5e-4, 0.0, 0.0])
    log = (tmp_path / "log" / "log.txt").read_text()
    assert "--lr_anneal_steps 2 < --total_training_steps 4: the lr is 0 from step 2 on" in log


# --- resuming from a file that is not modelNNNNNN.pt -----------------------------------------


def test_resume_from_an_ema_file_initialises_at_step_zero_with_a_warning(tmp_path):
    first = edm_loop(tmp_path, total_training_steps=2)
    first.run_loop()
    ema_file = tmp_path / "ema_0.99_000002.pt"
    with logger.scoped_configure(dir=str(tmp_path / "log"), format_strs=["log"]):
        resumed = edm_loop(tmp_path / "b", resume_checkpoint=str(ema_file))
    assert resumed.step == 0
    saved = torch.load(ema_file, weights_only=True)
    assert_same(params(resumed.model), [saved[n] for n, _ in resumed.model.named_parameters()])
    # no siblings: EMAs start from the loaded weights, the optimiser is fresh
    assert_same(resumed.ema_params[0], params(resumed.model))
    assert resumed.opt.state_dict()["state"] == {}
    assert "is not a modelNNNNNN.pt file" in (tmp_path / "log" / "log.txt").read_text()


# --- flags -------------------------------------------------------------------------------------


class Stop(Exception):
    pass


@pytest.mark.parametrize("name", ["edm_train", "cm_train"])
@pytest.mark.parametrize("flag, expected", [([], True), (["--random_flip", "False"], False)])
def test_random_flip_flag_reaches_the_data(monkeypatch, tmp_path, name, flag, expected):
    module = load_script(name)
    seen = {}

    def fake_data(**kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(module, "load_training_data", fake_data)
    argv = ["--image_size", "8", "--channel_mult", "1,2", "--num_channels", "32", "--num_res_blocks", "1",
            "--attention_resolutions", "4", "--global_batch_size", "2", "--data_dir", str(tmp_path),
            "--training_mode", "consistency_training", "--loss_norm", "l2", *flag]
    if name == "edm_train":
        argv = argv[: argv.index("--training_mode")] + flag
    with pytest.raises(Stop):
        module.main(argv)
    assert seen["random_flip"] is expected


def test_demo_trains_without_flips(tmp_path):
    from cm import demo

    cfg = demo.quick_config()
    assert "--random_flip=False" in demo.edm_train_argv(cfg, tmp_path, tmp_path)
    assert "--random_flip=False" in demo.cm_train_argv(cfg, tmp_path, tmp_path, tmp_path / "t.pt")


def test_cm_train_refuses_a_schedule_sampler_it_would_ignore():
    with pytest.raises(ValueError, match="--schedule_sampler lognormal is not used by cm_train.py"):
        load_script("cm_train").main(["--schedule_sampler", "lognormal", "--training_mode", "consistency_training"])
