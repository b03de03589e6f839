"""Training-loop behaviours pinned to the original's: progdist stage lr, the consistency
loop's stopping rule, resuming from a non-model file, the flip flag, and the real
float16 path (loss scaling, skipped and retried steps, the saved loss scale) run on
CPU with a tiny float16 UNet."""

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import test_train_util as base
from cm import fp16_util, logger, script_util, step_data
from cm.tools import demo
from cm.opt_layout import is_original_fp16_layout, main, to_original, to_per_parameter
from cm.schedules import create_ema_and_scales_fn
from launchers import find_mpiexec
from test_train_util import assert_same, cm_loop, edm_loop, one_thread, params, read_csv  # noqa: F401 (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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

    monkeypatch.setattr(step_data, "load_training_data", fake_data)  # what both scripts' shared builder calls
    argv = ["--image_size", "8", "--channel_mult", "1,2", "--num_channels", "32", "--num_res_blocks", "1",
            "--attention_resolutions", "4", "--global_batch_size", "2", "--data_dir", str(tmp_path),
            "--training_mode", "consistency_training", "--loss_norm", "l2", *flag]
    if name == "edm_train":
        argv = argv[: argv.index("--training_mode")] + flag
    with pytest.raises(Stop):
        module.main(argv)
    assert seen["random_flip"] is expected


def test_demo_trains_without_flips(tmp_path):
    cfg = demo.quick_config()
    assert "--random_flip=False" in demo.edm_train_argv(cfg, tmp_path, tmp_path)
    assert "--random_flip=False" in demo.cm_train_argv(cfg, tmp_path, tmp_path, tmp_path / "t.pt")


def test_cm_train_refuses_a_schedule_sampler_it_would_ignore():
    with pytest.raises(ValueError, match="--schedule_sampler lognormal is not used by cm_train.py"):
        load_script("cm_train").main(["--schedule_sampler", "lognormal", "--training_mode", "consistency_training"])


# --- the float16 path on CPU ------------------------------------------------------------------
# float16 math is what matters, not the device: the fixture lets --use_fp16 through on a CPU and
# builds the tiny UNets with use_fp16=True (float16 torso, float32 masters, loss scale 2^20).


@pytest.fixture
def fp16(monkeypatch):
    keep = lambda use_fp16: bool(use_fp16)  # noqa: E731
    monkeypatch.setattr(fp16_util, "resolve_use_fp16", keep)
    monkeypatch.setattr(script_util, "resolve_use_fp16", keep)
    real_build = base.build

    def build(dropout=0.0, distillation=False, num_channels=32):
        kw = base.model_and_diffusion_defaults()
        kw.update(image_size=8, channel_mult="1,2", num_channels=num_channels, num_res_blocks=1,
                  attention_resolutions="4", dropout=dropout, distillation=distillation, loss_norm="l2",
                  use_fp16=True)
        torch.manual_seed(0)
        return script_util.create_model_and_diffusion(**kw)

    monkeypatch.setattr(base, "build", build)
    return real_build


def overflow(loop):
    """Make the next step's scaled gradients overflow (2^200 · loss is inf in float32)."""
    loop.mp_trainer.lg_loss_scale = 200.0


def test_fp16_loops_step_float16_models_through_float32_masters(fp16, tmp_path):
    makers = (
        lambda d: edm_loop(d, use_fp16=True),
        lambda d: cm_loop(d, training_mode="consistency_distillation", use_fp16=True),
    )
    for make in makers:
        loop = make(tmp_path / "a")
        assert loop.use_fp16 and loop.mp_trainer.loss_scaling
        assert loop.model.input_blocks[1][0].in_layers[2].weight.dtype == torch.float16
        assert all(p.dtype == torch.float32 for p in loop.mp_trainer.master_params)
        assert loop.mp_trainer.lg_loss_scale == 20.0
        assert loop.run_step(*batch())
        assert loop.mp_trainer.lg_loss_scale == pytest.approx(20.001)
        # the float16 model holds the rounded masters
        for p, m in zip(loop.mp_trainer.model_params, loop.mp_trainer.master_params):
            assert torch.equal(p, m.to(p.dtype))
    # the update is the float32 one up to float16 rounding: the 2^20 scale is undone
    with_fp16 = edm_loop(tmp_path / "b", use_fp16=True)
    with_fp16.run_step(*batch())
    base.build, real = fp16, base.build
    try:
        plain = edm_loop(tmp_path / "c")
    finally:
        base.build = real
    before = params(plain.model)
    plain.run_step(*batch())
    for a, b, p0 in zip(with_fp16.mp_trainer.master_params, plain.mp_trainer.master_params, before):
        step32 = (b - p0).norm()
        if step32 > 0:
            assert (a - p0 - (b - p0)).norm() <= 0.05 * step32 + 1e-6


def test_fp16_edm_overflow_skips_the_update_and_the_step(fp16, tmp_path):
    loop = edm_loop(tmp_path, use_fp16=True)
    before = params(loop.mp_trainer.master_params)
    overflow(loop)
    assert not loop.run_step(*batch())
    assert loop.step == 0  # the original's EDM loop counts only taken steps
    assert loop.mp_trainer.lg_loss_scale == 199.0
    assert_same(params(loop.mp_trainer.master_params), before)
    assert_same(loop.ema_params[0], before)


def test_fp16_consistency_overflow_is_retried_as_the_same_step(fp16, tmp_path):
    loop = cm_loop(tmp_path / "a", training_mode="consistency_distillation", use_fp16=True)
    fresh = cm_loop(tmp_path / "b", training_mode="consistency_distillation", use_fp16=True)
    before, target_before = params(loop.mp_trainer.master_params), params(loop.target_model)
    overflow(loop)
    assert not loop.run_step(*batch())
    assert loop.step == 0 and loop.mp_trainer.lg_loss_scale == 199.0
    assert_same(params(loop.mp_trainer.master_params), before)
    assert_same(params(loop.target_model), target_before)
    # the retry is step 0 again: same seed, noise and levels as a run that never overflowed
    loop.mp_trainer.lg_loss_scale = 20.0
    assert loop.run_step(*batch()) and fresh.run_step(*batch())
    assert loop.step == fresh.step == 1
    assert_same(params(loop.mp_trainer.master_params), params(fresh.mp_trainer.master_params))
    assert_same(params(loop.target_model), params(fresh.target_model))


def test_fp16_loss_scale_is_saved_and_resumed(fp16, tmp_path):
    loop = cm_loop(tmp_path, training_mode="consistency_distillation", total_training_steps=2, use_fp16=True)
    loop.mp_trainer.lg_loss_scale = 17.5
    loop.run_loop()
    assert loop.mp_trainer.lg_loss_scale == pytest.approx(17.502)
    assert torch.load(tmp_path / "opt000002.pt", weights_only=True)["lg_loss_scale"] == pytest.approx(17.502)
    resumed = cm_loop(tmp_path, training_mode="consistency_distillation", resume_checkpoint="auto", use_fp16=True)
    assert resumed.step == 2
    assert resumed.mp_trainer.lg_loss_scale == loop.mp_trainer.lg_loss_scale
    # a resumed distillation run keeps its student: it is not reset from the teacher
    assert_same(params(resumed.mp_trainer.master_params), params(loop.mp_trainer.master_params))
    assert not all(torch.equal(a, b) for a, b in zip(params(resumed.model), params(resumed.teacher_model)))


# --- optimiser files in the original's float16 layout ----------------------------------------


def flat_like_the_original(tensors, shapes):
    """The original's fp16 masters: ndim <= 1 params as one vector, the rest as one [1, M] row."""
    small = torch.cat([t.reshape(-1) for t, s in zip(tensors, shapes) if len(s) <= 1])
    large = torch.cat([t.reshape(-1) for t, s in zip(tensors, shapes) if len(s) > 1]).view(1, -1)
    return [small, large]


def assert_same_opt_state(a, b):
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].keys() == b["state"][k].keys()
        for key in a["state"][k]:
            torch.testing.assert_close(torch.as_tensor(a["state"][k][key]), torch.as_tensor(b["state"][k][key]),
                                       rtol=0, atol=0)
    assert [g["params"] for g in a["param_groups"]] == [g["params"] for g in b["param_groups"]]


def test_optimizer_files_convert_between_the_original_fp16_layout_and_ours(tmp_path):
    model, _ = base.build()
    shapes = [tuple(p.shape) for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(2)]
    ours = [p.detach().clone().requires_grad_() for p in model.parameters()]
    flat = [t.detach().clone().requires_grad_() for t in flat_like_the_original(ours, shapes)]
    opt_ours, opt_flat = torch.optim.RAdam(ours, lr=1e-3), torch.optim.RAdam(flat, lr=1e-3)
    for step_grads in grads:
        for p, gr in zip(ours, step_grads):
            p.grad = gr
        for p, gr in zip(flat, flat_like_the_original(step_grads, shapes)):
            p.grad = gr
        opt_ours.step()
        opt_flat.step()
    assert is_original_fp16_layout(opt_flat.state_dict(), shapes)
    assert not is_original_fp16_layout(opt_ours.state_dict(), shapes)
    assert_same_opt_state(to_per_parameter(opt_flat.state_dict(), shapes), opt_ours.state_dict())
    assert_same_opt_state(to_original(opt_ours.state_dict(), shapes), opt_flat.state_dict())
    # and on disk, through the command-line converter
    torch.save(opt_ours.state_dict(), tmp_path / "opt.pt")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    main([str(tmp_path / "opt.pt"), str(tmp_path / "model.pt"), str(tmp_path / "flat.pt")])
    assert_same_opt_state(torch.load(tmp_path / "flat.pt", weights_only=True), opt_flat.state_dict())


def test_training_resumes_from_an_original_fp16_optimizer_file(tmp_path):
    first = edm_loop(tmp_path, total_training_steps=2)
    first.run_loop()
    shapes = [tuple(p.shape) for p in first.model.parameters()]
    torch.save(to_original(first.opt.state_dict(), shapes), tmp_path / "opt000002.pt")
    resumed = edm_loop(tmp_path, resume_checkpoint=str(tmp_path / "model000002.pt"))
    assert_same_opt_state(resumed.opt.state_dict(), first.opt.state_dict())


# --- test plumbing ------------------------------------------------------------------------------


def test_mpiexec_is_found_next_to_the_running_python(tmp_path):
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "mpiexec").write_text("#!/bin/sh\n")
    (bin_dir / "mpiexec").chmod(0o755)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert find_mpiexec(path=str(empty), executable=str(bin_dir / "python")) == str(bin_dir / "mpiexec")
    assert find_mpiexec(path=str(empty), executable=str(empty / "python")) is None


# --- SIGTERM in cm_train.py --------------------------------------------------------------------


def test_sigterm_stops_cm_train_after_a_step_and_saves_it(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        pixels = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(data / f"{i}.png")
    logs = tmp_path / "logs"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "cm_train.py"), "--image_size", "8", "--channel_mult", "1,2",
           "--attention_resolutions", "4", "--num_channels", "32", "--num_res_blocks", "1",
           "--training_mode", "consistency_training", "--loss_norm", "l2", "--start_scales", "10",
           "--end_scales", "10", "--global_batch_size", "2", "--total_training_steps", "100000",
           "--save_interval", "100000", "--log_interval", "1", "--ema_rate", "0.9",
           "--data_dir", str(data), "--logging_dir", str(logs)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_LOGDIR", "RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    csv = logs / "progress.csv"
    deadline = time.time() + 240
    while not (csv.exists() and len(csv.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    stopped = int(re.search(r"SIGTERM received: stopping after step (\d+)", out).group(1))
    assert stopped >= 2
    names = sorted(f for f in os.listdir(logs) if f.endswith(".pt"))
    assert names == [f"ema_0.9_{stopped:06d}.pt", f"model{stopped:06d}.pt", f"opt{stopped:06d}.pt",
                     f"target_model{stopped:06d}.pt"]  # fmt: skip
