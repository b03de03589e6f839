"""sCT and sCD in the consistency loop and in cm_train.py: bit-exact resume across the end of the
tangent warm-up, logging, the head in checkpoints, sampling an sCM checkpoint, bf16, bad input."""

import os
import subprocess
import sys
import types

import pytest
import torch

from cm import logger
from cm.nn import attach_logvar_head, has_logvar_head
from cm.recipes import get_recipe
from cm.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from cm.train_util import CMTrainLoop

from test_recipe_training import NET, SMALL, StepData, data_dir, edm_pt, files, script  # noqa: F401
from test_train_util import one_thread  # noqa: F401  (autouse fixture)

OPTIONS = dict(
    tangent_warmup_steps=3, scm_sigma_max=80.0, jvp="ad", g_norm_spatial_invariance=False,
    divide_x_0_spatial_dim=False, prior_weighting=False, p_mean=-1.0, p_std=1.4,
)


def _build(dropout):
    kw = dict(model_and_diffusion_defaults(), **SMALL, dropout=dropout, distillation=False, loss_norm="l2")
    torch.manual_seed(0)
    return create_model_and_diffusion(**kw)


def scm_loop(tmp_path, mode, jvp="ad", **kw):
    model, diffusion = _build(0.2 if mode == "sct" else 0.0)
    attach_logvar_head(model)
    teacher = teacher_diffusion = None
    if mode == "scd":
        teacher, teacher_diffusion = _build(0.0)
        with torch.no_grad():
            for p in teacher.parameters():
                p.add_(0.02 * torch.randn_like(p))
    options = dict(OPTIONS, jvp=jvp)
    args = dict(
        model=model, diffusion=diffusion, target_model=None, teacher_model=teacher, teacher_diffusion=teacher_diffusion,
        training_mode=mode, ema_scale_fn=get_recipe(mode).schedule(types.SimpleNamespace(**options)),
        total_training_steps=4, data=StepData(), batch_size=4, microbatch=-1, lr=1e-3, ema_rate="0.9,0.99",
        log_interval=1, save_interval=2, resume_checkpoint="", logging_dir=str(tmp_path), seed=0,
        loss_options=options, adam_betas=(0.9, 0.99),
    )
    args.update(kw)
    return CMTrainLoop(**args)


@pytest.mark.parametrize("mode,jvp", [("sct", "ad"), ("scd", "ad"), ("sct", "fd")])
def test_resume_across_the_end_of_the_warmup_is_bit_exact(tmp_path, mode, jvp):
    """Warm-up r = 0, 1/3, 2/3, 1 over steps 0..3: resuming at step 2 crosses its end, bit for bit."""
    logger.configure(dir=str(tmp_path / "log"), format_strs=["csv"])
    try:
        straight = scm_loop(tmp_path / "a", mode, jvp)
        assert [straight.ema_scale_fn(k) for k in range(4)] == [(0.0, 0.0), (0.0, 1 / 3), (0.0, 2 / 3), (0.0, 1.0)]
        straight.run_loop()
        scm_loop(tmp_path / "b", mode, jvp, total_training_steps=2).run_loop()
        resumed = scm_loop(tmp_path / "b", mode, jvp, resume_checkpoint="auto")
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
        if name.startswith("model"):
            assert has_logvar_head(a) and float(a["logvar_linear.bias"].abs()) > 0  # the head trained
    progress = (tmp_path / "log" / "progress.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "loss_unweighted", "g_norm", "logvar", "jvp_norm", "tangent_warmup"} <= set(progress)


def test_scd_student_starts_as_the_teacher_with_a_fresh_head(tmp_path):
    loop = scm_loop(tmp_path, "scd")
    teacher = loop.teacher_model.state_dict()
    student = loop.model.state_dict()
    assert all(torch.equal(student[k], v) for k, v in teacher.items())
    assert torch.equal(student["logvar_linear.weight"], torch.zeros_like(student["logvar_linear.weight"]))


def test_bf16_run_keeps_float32_weights_and_a_float32_tangent(tmp_path):
    """--precision bf16: the training pass autocasts, the JVP runs on the float32 module (no autocast)."""
    logger.configure(dir=str(tmp_path / "log"), format_strs=["csv"])
    try:
        loop = scm_loop(tmp_path / "run", "sct", precision="bf16", total_training_steps=2)
        loop.run_loop()
    finally:
        logger.reset()
    state = torch.load(tmp_path / "run" / "model000002.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    rows = (tmp_path / "log" / "progress.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    assert all(torch.isfinite(torch.tensor(float(last[header.index(k)]))) for k in ("loss", "jvp_norm"))


# ----------------------------------------------------------------------------
# cm_train.py and image_sample.py


def test_sct_from_init_from_applies_the_preset_logs_and_samples(data_dir, edm_pt, tmp_path):  # noqa: F811
    flags = (f"{NET} --training_mode sct --init_from {edm_pt} --data_dir {data_dir} --global_batch_size 4 "
             "--total_training_steps 2 --save_interval 2 --log_interval 1").split()
    proc = script(*flags, log_dir=tmp_path / "sct")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    log = (tmp_path / "sct" / "log.txt").read_text()
    assert ("sct preset: adam_beta2=0.99, dropout=0.2, ema_rate=0.99929047, lr=0.0001, p_mean=-1.0, p_std=1.4, "
            "random_flip=False, scm_sigma_max=800.0") in log
    assert "tangent J by forward-mode AD" in log
    state = torch.load(tmp_path / "sct" / "model000002.pt", weights_only=True)
    edm = torch.load(edm_pt, weights_only=True)
    assert has_logvar_head(state) and set(state) - set(edm) == {"logvar_linear.weight", "logvar_linear.bias"}
    ema = tmp_path / "sct" / "ema_0.99929047_000002.pt"
    for sampler in (["--sampler", "onestep"], ["--sampler", "multistep", "--sigmas", "80,0.982"]):
        import subprocess
        import sys

        cmd = [sys.executable, "scripts/image_sample.py", *NET.split(), "--training_mode", "sct", *sampler,
               "--model_path", str(ema), "--num_samples", "3", "--batch_size", "2",
               "--logging_dir", str(tmp_path / f"samples_{len(sampler)}")]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root)
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        import numpy as np

        (npz,) = [f for f in os.listdir(tmp_path / f"samples_{len(sampler)}") if f.endswith(".npz")]
        images = np.load(tmp_path / f"samples_{len(sampler)}" / npz)["arr_0"]
        assert images.shape == (3, 8, 8, 3)
    # image_edit.py takes it as a consistency function too
    np.savez(tmp_path / "inputs.npz", images)
    cmd = [sys.executable, "scripts/image_edit.py", *NET.split(), "--training_mode", "sct", "--task", "inpaint",
           "--input", str(tmp_path / "inputs.npz"), "--model_path", str(ema), "--sigmas", "80,0.982",
           "--logging_dir", str(tmp_path / "edit")]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert any(f.startswith("inpaint_") and f.endswith(".npz") for f in os.listdir(tmp_path / "edit"))


BAD = {
    "scd_without_teacher": ("--training_mode scd", "--training_mode scd needs --teacher_model_path"),
    "bad_jvp": ("--training_mode sct --init_from none --jvp forward", "--jvp must be ad or fd"),
    "sigma_max": ("--training_mode sct --init_from none --scm_sigma_max 0.001", "--scm_sigma_max must be larger"),
    "scm_flag_elsewhere": ("--training_mode ect --init_from none --jvp fd", "--jvp is for --training_mode meanflow or sct or scd"),
}


def test_bad_scm_input_is_one_line_and_writes_nothing(data_dir, edm_pt, tmp_path):  # noqa: F811
    procs = {}
    for name, (flags, _) in BAD.items():
        argv = f"{NET} {flags} --data_dir {data_dir}".split()
        procs[name] = script(*argv, log_dir=tmp_path / name)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode != 0, name
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and BAD[name][1] in lines[0], (name, err)
        assert not (tmp_path / name).exists(), name


@pytest.mark.parametrize("mode", ["sct", "scd"])
def test_scm_from_an_nvidia_edm_pkl(tmp_path, capsys, monkeypatch, mode):
    """sCT --init_from / sCD --teacher_model_path an EDM .pkl (DDPM++, class-conditional): flags adopted,
    the student is the EDM network plus a zero head (lr 0)."""
    from cm.cli import run_cli
    from cm.formats.edm_pickle import load_edm_pickle
    from song_helpers import EDM, image_folder, load_script

    monkeypatch.delenv("OPENAI_LOGDIR", raising=False)
    pkl = EDM / "snapshot_ddpmpp_cond_small.pkl"
    start = f"--init_from {pkl}" if mode == "sct" else f"--teacher_model_path {pkl}"
    argv = (f"--training_mode {mode} {start} --lr 0 --global_batch_size 2 --total_training_steps 1 "
            f"--save_interval 1 --data_dir {image_folder(tmp_path / 'data', 16)} --logging_dir {tmp_path / mode}")
    try:
        assert run_cli(load_script("cm_train").main, argv.split()) == 0, capsys.readouterr().err
    finally:
        logger.reset()
    tuned = torch.load(tmp_path / mode / "model000001.pt", weights_only=True)
    source, _ = load_edm_pickle(pkl)
    # an --init_from file with augment_dim > 0 starts a run without augmentation minus map_augment (issue 20)
    kept = {k: v for k, v in source.state_dict().items() if not (mode == "sct" and k.startswith("map_augment"))}
    assert all(torch.equal(tuned[k], v) for k, v in kept.items())
    assert float(tuned["logvar_linear.weight"].abs().max()) == 0.0


# The network's attention swapped, in the script's own process, for a kernel without a forward-mode rule
# (as torch's fused attention was before cm.nn.explicit_attention); then cm_train.py runs as __main__.
_NO_FORWARD_AD = """
import runpy, sys, torch
import cm.unet

class FusedKernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

def forward(self, qkv):
    bs, width, length = qkv.shape
    ch = width // (3 * self.n_heads)
    q, k, v = qkv.reshape(bs, 3, self.n_heads, ch, length).transpose(-1, -2).unbind(1)
    return FusedKernel.apply(q, k, v).transpose(-1, -2).reshape(bs, self.n_heads * ch, length)

cm.unet.QKVAttention.forward = forward
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sct_run_with_a_layer_without_forward_ad_is_one_line_naming_it(data_dir, tmp_path):  # noqa: F811
    from test_recipe_training import ROOT

    log_dir = tmp_path / "logs"
    argv = f"{NET} --training_mode sct --init_from none --data_dir {data_dir} --global_batch_size 4 "
    argv += f"--total_training_steps 1 --logging_dir {log_dir}"
    cmd = [sys.executable, "-c", _NO_FORWARD_AD, os.path.join(ROOT, "scripts", "cm_train.py"), *argv.split()]
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_LOGDIR", "CM_LPIPS_PATH")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "--jvp ad: layer " in lines[0] and "(QKVAttention) cannot take forward-mode AD" in lines[0], lines[0]
    assert "--jvp fd works without it" in lines[0]
    assert not log_dir.exists()
