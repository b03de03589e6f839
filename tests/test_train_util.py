"""Training loops in one process: steps, learning rate, micro-batches, EMAs, target,
progdist stages, checkpoints and resume. Tiny 8-pixel UNets, synthetic data."""

import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cm import logger
from cm.checkpoint import (
    CheckpointError,
    checkpoint_filename,
    find_latest_checkpoint,
    load_model_state,
    parse_resume_step,
    save_atomic,
)
from cm.image_datasets import ImageDataset
from cm.resample import UniformSampler
from cm.schedules import create_ema_and_scales_fn, get_sigmas_karras
from cm.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from cm.train_util import (
    CMTrainLoop,
    StepBatches,
    TrainLoop,
    noise_bins,
    parse_ema_rates,
    per_rank_batch_size,
)

BATCH = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is as fast, and does not stall when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(dropout=0.0, distillation=False, num_channels=32, time_inputs=1):
    kw = model_and_diffusion_defaults()
    kw.update(
        image_size=8,
        channel_mult="1,2",
        num_channels=num_channels,
        num_res_blocks=1,
        attention_resolutions="4",
        dropout=dropout,
        distillation=distillation,
        loss_norm="l2",
        time_inputs=time_inputs,
    )
    torch.manual_seed(0)
    return create_model_and_diffusion(**kw)


def synthetic_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.rand(BATCH, 3, 8, 8, generator=g) * 2 - 1, {}


def edm_loop(tmp_path, **kw):
    model, diffusion = build(dropout=kw.pop("dropout", 0.0))
    args = dict(
        model=model,
        diffusion=diffusion,
        data=synthetic_data(),
        batch_size=BATCH,
        microbatch=-1,
        lr=1e-3,
        ema_rate="0.9,0.99",
        log_interval=1,
        save_interval=2,
        resume_checkpoint="",
        logging_dir=str(tmp_path),
        seed=0,
    )
    args.update(kw)
    return TrainLoop(**args)


def cm_loop(tmp_path, training_mode="consistency_training", teacher=True, ema_scale_fn=None, **kw):
    model, diffusion = build(distillation=training_mode != "progdist")
    target = None if training_mode == "progdist" else build(distillation=True)[0]
    teacher_model = teacher_diffusion = None
    if teacher:
        teacher_model, teacher_diffusion = build(dropout=0.1)
        with torch.no_grad():
            for p in teacher_model.parameters():
                p.normal_(0, 0.02)
    args = dict(
        model=model,
        diffusion=diffusion,
        target_model=target,
        teacher_model=teacher_model,
        teacher_diffusion=teacher_diffusion,
        training_mode=training_mode,
        ema_scale_fn=ema_scale_fn or create_ema_and_scales_fn("fixed", 0.9, "fixed", 10, 10, 4, 1),
        total_training_steps=4,
        data=synthetic_data(),
        batch_size=BATCH,
        microbatch=-1,
        lr=1e-3,
        ema_rate="0.9,0.99",
        log_interval=1,
        save_interval=2,
        resume_checkpoint="",
        logging_dir=str(tmp_path),
        seed=0,
    )
    args.update(kw)
    return CMTrainLoop(**args)


def params(module_or_list):
    items = module_or_list.parameters() if hasattr(module_or_list, "parameters") else module_or_list
    return [p.detach().clone().float() for p in items]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# --- small helpers ------------------------------------------------------------


def test_parse_ema_rates_and_batch_split():
    assert parse_ema_rates("0.999,0.9999,0.9999432189950708") == [0.999, 0.9999, 0.9999432189950708]
    assert parse_ema_rates(0.5) == [0.5]
    with pytest.raises(ValueError, match="ema_rate"):
        parse_ema_rates("0.9,abc")
    assert per_rank_batch_size(512, -1, 2) == (256, None)
    size, note = per_rank_batch_size(10, -1, 4)
    assert size == 2 and "not divisible" in note
    assert per_rank_batch_size(512, 7, 2) == (7, None)
    with pytest.raises(ValueError):
        per_rank_batch_size(1, -1, 2)


def test_noise_bins_are_quarters_of_the_rho_ramp():
    sigmas = torch.tensor([0.002, 0.1, 0.2, 2.0, 3.0, 17.0, 18.0, 80.0, 1e-4, 200.0])
    assert noise_bins(sigmas, 0.002, 80.0).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 0, 3]


def test_checkpoint_names_and_latest_complete(tmp_path):
    assert checkpoint_filename("model", 12) == "model000012.pt"
    assert checkpoint_filename("ema", 3, 0.9999) == "ema_0.9999_000003.pt"
    assert parse_resume_step("/x/model000012.pt") == 12
    with pytest.raises(CheckpointError, match="model001000.pt"):
        parse_resume_step("/x/ema_0.9_000012.pt")
    assert find_latest_checkpoint(str(tmp_path)) is None
    save_atomic({"a": torch.zeros(1)}, str(tmp_path / "model000002.pt"))
    # a later checkpoint whose model file never made it is not complete
    save_atomic({}, str(tmp_path / "opt000004.pt"))
    (tmp_path / "model000004.pt.tmp123").write_bytes(b"partial")
    assert find_latest_checkpoint(str(tmp_path)) == str(tmp_path / "model000002.pt")
    assert sorted(os.listdir(tmp_path)) == ["model000002.pt", "model000004.pt.tmp123", "opt000004.pt"]


def test_load_model_state_names_the_first_mismatch():
    small, _ = build(num_channels=32)
    big, _ = build(num_channels=64)
    with pytest.raises(CheckpointError) as err:
        load_model_state(small, big.state_dict(), "/ckpt/model000001.pt")
    msg = str(err.value)
    assert "\n" not in msg and "/ckpt/model000001.pt" in msg
    assert "time_embed.0.weight" in msg and "(256, 64)" in msg and "(128, 32)" in msg
    # a DDP-saved state_dict (module. prefix) loads
    prefixed = {"module." + k: v for k, v in big.state_dict().items()}
    load_model_state(big, prefixed, "ddp.pt")
    missing = dict(small.state_dict())
    missing.pop("out.2.bias")
    with pytest.raises(CheckpointError, match="out.2.bias missing"):
        load_model_state(small, missing, "m.pt")
    extra = dict(small.state_dict(), extra=torch.zeros(2))
    with pytest.raises(CheckpointError, match="unexpected key extra"):
        load_model_state(small, extra, "m.pt")


# --- EDM loop -------------------------------------------------------------------


def test_edm_loop_trains_logs_saves_and_stops(tmp_path):
    loop = edm_loop(tmp_path, total_training_steps=3)
    with logger.scoped_configure(dir=str(tmp_path / "log"), format_strs=["csv"]):
        loop.run_loop()
    assert loop.step == 3
    files = sorted(os.listdir(tmp_path))
    for step in (2, 3):
        for name in (f"model{step:06d}.pt", f"opt{step:06d}.pt", f"ema_0.9_{step:06d}.pt", f"ema_0.99_{step:06d}.pt"):
            assert name in files
    assert not [f for f in files if ".tmp" in f]
    rows = read_csv(tmp_path / "log" / "progress.csv")
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert [int(r["samples"]) for r in rows] == [4, 8, 12]
    for key in ("loss", "mse", "xs_mse", "grad_norm", "param_norm", "lr"):
        assert all(r[key] != "" for r in rows), key
    bins = {k for r in rows for k, v in r.items() if k.startswith("loss_q") and v != ""}
    assert bins and bins <= {"loss_q0", "loss_q1", "loss_q2", "loss_q3"}
    # checkpoints are plain state_dicts that load with weights_only
    state = torch.load(tmp_path / "model000003.pt", weights_only=True)
    assert list(state) == list(loop.model.state_dict())


def test_lr_anneals_linearly_to_zero_and_stops(tmp_path):
    loop = edm_loop(tmp_path, lr_anneal_steps=4, save_interval=100)
    with logger.scoped_configure(dir=str(tmp_path / "log"), format_strs=["csv"]):
        loop.run_loop()
    assert loop.step == 4
    lrs = [float(r["lr"]) for r in read_csv(tmp_path / "log" / "progress.csv")]
    assert lrs == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert os.path.exists(tmp_path / "model000004.pt")  # the final save


def test_microbatches_accumulate_the_full_batch_gradient(tmp_path):
    full = edm_loop(tmp_path / "a", total_training_steps=1)
    micro = edm_loop(tmp_path / "b", total_training_steps=1, microbatch=1)
    for loop in (full, micro):
        loop.run_step(*next(loop.data))
    for p, q in zip(full.mp_trainer.master_params, micro.mp_trainer.master_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_ema_update_formula(tmp_path):
    loop = edm_loop(tmp_path)
    theta0 = params(loop.model)
    loop.run_step(*next(loop.data))
    theta1 = params(loop.model)
    assert any(not torch.equal(a, b) for a, b in zip(theta0, theta1))
    for rate, ema in zip(loop.ema_rate, loop.ema_params):
        for e, a, b in zip(ema, theta0, theta1):
            torch.testing.assert_close(e, rate * a + (1 - rate) * b)


def test_index_samplers_map_to_karras_sigmas(tmp_path):
    loop = edm_loop(tmp_path)
    loop.schedule_sampler = UniformSampler(loop.diffusion)
    sigmas, weights, indices = loop._sample_sigmas(64, "cpu")
    grid = get_sigmas_karras(40, 0.002, 80.0)
    assert torch.equal(sigmas, grid[indices])
    assert sigmas.min() >= 0.002 - 1e-6 and sigmas.max() <= 80.0 + 1e-3


def test_resume_restores_step_weights_emas_and_optimizer(tmp_path):
    first = edm_loop(tmp_path, total_training_steps=2)
    first.run_loop()
    resumed = edm_loop(tmp_path, resume_checkpoint=str(tmp_path / "model000002.pt"), total_training_steps=4)
    assert resumed.step == 2
    assert_same(params(resumed.model), params(first.model))
    for a, b in zip(resumed.ema_params, first.ema_params):
        assert_same(a, b)
    sa, sb = resumed.opt.state_dict()["state"], first.opt.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for key in sa[k]:
            assert torch.equal(torch.as_tensor(sa[k][key]), torch.as_tensor(sb[k][key]))
    # "auto" finds the same checkpoint
    auto = edm_loop(tmp_path, resume_checkpoint="auto")
    assert auto.resume_checkpoint == str(tmp_path / "model000002.pt") and auto.step == 2


def test_resume_with_a_mismatched_optimizer_is_one_line(tmp_path):
    first = edm_loop(tmp_path, total_training_steps=2)
    first.run_loop()
    other = edm_loop(tmp_path / "other")
    torch.save(other.opt.state_dict(), tmp_path / "opt000002.pt")  # empty state: still fits
    edm_loop(tmp_path, resume_checkpoint=str(tmp_path / "model000002.pt"))
    bad = first.opt.state_dict()
    bad["state"][0]["exp_avg"] = torch.zeros(3)
    torch.save(bad, tmp_path / "opt000002.pt")
    with pytest.raises(CheckpointError, match=r"optimiser exp_avg of time_embed.0.weight has shape \(3,\)"):
        edm_loop(tmp_path, resume_checkpoint=str(tmp_path / "model000002.pt"))


# --- consistency loop ---------------------------------------------------------------


def test_student_and_target_start_from_the_teacher(tmp_path):
    loop = cm_loop(tmp_path, training_mode="consistency_distillation")
    teacher = params(loop.teacher_model)
    assert_same(params(loop.model), teacher)
    assert_same(params(loop.target_model), teacher)
    assert not loop.teacher_model.training
    assert all(not p.requires_grad for p in loop.teacher_model.parameters())
    assert loop.teacher_model.input_blocks[1][0].out_layers[2].p == 0.1  # teacher_dropout


def test_target_follows_the_online_weights_with_mu(tmp_path):
    fn = create_ema_and_scales_fn("fixed", 0.7, "fixed", 6, 6, 4, 1)
    loop = cm_loop(tmp_path, ema_scale_fn=fn)
    theta0 = params(loop.model)
    loop.run_step(*next(loop.data))
    theta1 = params(loop.model)
    for t, a, b in zip(params(loop.target_model), theta0, theta1):
        torch.testing.assert_close(t, 0.7 * a + 0.3 * b)
    assert loop.step == 1


def test_consistency_training_without_teacher_saves_target(tmp_path):
    loop = cm_loop(tmp_path, teacher=False, total_training_steps=2)
    loop.run_loop()
    names = os.listdir(tmp_path)
    assert {"model000002.pt", "target_model000002.pt", "opt000002.pt", "ema_0.9_000002.pt"} <= set(names)
    state = torch.load(tmp_path / "target_model000002.pt", weights_only=True)
    assert_same([state[n] for n, _ in loop.target_model.named_parameters()], params(loop.target_model))


def test_cm_resume_restores_the_target(tmp_path):
    first = cm_loop(tmp_path, teacher=False, total_training_steps=2)
    first.run_loop()
    resumed = cm_loop(tmp_path, teacher=False, resume_checkpoint="auto")
    assert resumed.step == 2
    assert_same(params(resumed.target_model), params(first.target_model))
    assert_same(params(resumed.model), params(first.model))


def test_progdist_student_becomes_teacher_when_n_changes(tmp_path):
    # fixed/progdist from 4 scales, halving every step: N = 4, 2, 2, 1
    fn = create_ema_and_scales_fn("fixed", 0.0, "progdist", 4, 4, 4, 1)
    assert [fn(k)[1] for k in range(4)] == [4, 2, 2, 1]
    loop = cm_loop(tmp_path, training_mode="progdist", ema_scale_fn=fn, total_training_steps=1, save_interval=1)
    assert loop.target_model is None
    teacher0 = params(loop.teacher_model)
    loop.run_loop()
    theta1 = params(loop.model)
    opt_before = loop.opt
    loop.total_training_steps = 2
    loop.run_loop()  # step 1 starts a new stage: teacher <- student after step 0
    assert_same(params(loop.teacher_model), theta1)
    assert loop.opt is not opt_before
    saved = torch.load(tmp_path / "teacher_model000002.pt", weights_only=True)
    assert_same([saved[n] for n, _ in loop.teacher_model.named_parameters()], theta1)
    saved1 = torch.load(tmp_path / "teacher_model000001.pt", weights_only=True)
    assert_same([saved1[n] for n, _ in loop.teacher_model.named_parameters()], teacher0)
    # resuming restores the stage's teacher
    resumed = cm_loop(tmp_path, training_mode="progdist", ema_scale_fn=fn, resume_checkpoint="auto")
    assert resumed.step == 2
    assert_same(params(resumed.teacher_model), theta1)


# --- data that resumes exactly ------------------------------------------------------


def test_step_batches_seek_reproduces_the_stream(tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for i in range(10):
        path = tmp_path / f"{i % 3}_{i}.png"
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)
        files.append(str(path))
    dataset = ImageDataset(8, sorted(files), classes=[0] * 10, random_flip=False)
    straight = StepBatches(dataset, 3, seed=5, rank=0, num_workers=0)  # 3 batches per epoch
    stream = [next(straight) for _ in range(7)]
    resumed = StepBatches(dataset, 3, seed=5, rank=0, num_workers=0)
    resumed.seek(4)
    for k in range(4, 7):
        images, cond = next(resumed)
        assert torch.equal(images, stream[k][0]) and torch.equal(cond["y"], stream[k][1]["y"])
    # epochs are reshuffled, and another seed or rank sees another order
    assert straight.indices(0) != straight.indices(3) or straight.indices(1) != straight.indices(4)
    other = StepBatches(dataset, 3, seed=5, rank=1, num_workers=0)
    assert [other.indices(k) for k in range(3)] != [straight.indices(k) for k in range(3)]
    # within an epoch no image repeats
    seen = sum((straight.indices(k) for k in range(3)), [])
    assert len(set(seen)) == 9


def test_bf16_distillation_keeps_a_bf16_teacher_and_float32_student(tmp_path):
    """--precision bf16: the frozen teacher's weights are stored in bf16 once; everything trained stays float32."""
    logger.configure(dir=str(tmp_path))
    loop = cm_loop(tmp_path, "consistency_distillation", precision="bf16")
    teacher_dtypes = {p.dtype for p in loop.teacher_model.parameters()}
    assert torch.bfloat16 in teacher_dtypes and torch.float32 in teacher_dtypes  # norms stay float32
    for module in (loop.model, loop.target_model):
        assert all(p.dtype == torch.float32 for p in module.parameters())
    batch, cond = next(synthetic_data())
    loop.run_step(batch, cond)
    assert all(torch.isfinite(p).all() for p in loop.model.parameters())
    assert all(p.dtype == torch.float32 for p in loop.model.parameters())
