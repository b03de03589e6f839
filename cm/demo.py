"""End-to-end demo on scikit-learn's 8×8 handwritten digits, a tiny CIFAR-10 stand-in.

The demo runs the whole method with the project's own scripts, on a CPU, in
under fifteen minutes (ten without the ECT/iCT stage, which adds the CD
stage's wall time once):

1. data: the 1797 digits are split (stratified) into a training and a held-out
   part and written as RGB PNGs named like CIFAR-10 (``<class>_<index>.png``)
   into ``OUT/data/{train,heldout}``;
2. a small CNN digits classifier is trained on the training part (the judge
   of the samples: accuracy, and features for a Fréchet distance);
3. ``scripts/edm_train.py`` trains a class-conditional EDM teacher
   (subprocess; checkpoints and logs in ``OUT/edm``);
4. ``scripts/cm_train.py`` distils it with consistency distillation
   (subprocess; ``OUT/cd``), starting from the teacher's EMA weights;
4b. the later recipes, each for the CD stage's wall time (both at once, one
   thread each, stopped by SIGTERM when the time is up: the training loop
   finishes its step and saves): ECT tunes the teacher's EMA weights into a
   consistency model (``OUT/ect``), iCT trains one from scratch (``OUT/ict``);
5. ``scripts/image_sample.py`` draws EDM-Heun, one-step CM and two-step CM
   samples of every model (ECT/iCT two-step at σ = 80, 0.821) (its ``main``
   is called in this process so that the wall time covers sampling and not
   Python/torch start-up); ``OUT/samples/<name>``;
6. the samples are judged: classifier accuracy against the requested labels
   and the Fréchet distance between real held-out and generated digits in
   the classifier's penultimate feature space (``cm.evaluation``).

Image size. The UNet handles the digits' native 8×8 with ``--channel_mult 1,2``
(levels 8 and 4, attention at 4), and that is the default: on 2 CPU cores an
EDM step of batch 64 takes about 0.16 s at 8 px against 0.45–0.5 s at 16 px,
and the teacher needs some 2000 steps to draw digits its judge reads
correctly 90% of the time, which only the 8 px model fits into the budget.
``--image_size 16 --channel_mult 1,2,2`` upscales the digits (bicubic) instead.

Digits are not mirror-symmetric, so every model here trains without the
original's random left-right flips (``--random_flip False``), the classifier
too, and the Fréchet reference is the held-out part as it is: the
distribution the generative models are taught.

Everything goes to one folder: PNG data, checkpoints, logs of every command,
``samples_*.npz`` and their grids, ``comparison.png``, ``table.txt`` and
``results.json``.
"""

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .benchmark import text_table
from .evaluation import feature_stats, frechet_distance

NUM_CLASSES = 10
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS_DIR = os.path.join(REPO_ROOT, "scripts")


class DemoError(RuntimeError):
    """A stage of the demo failed; the message says which and where its log is."""


# ----------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass
class DemoConfig:
    """Sizes of every stage. `default_config()` and `quick_config()` are the two presets."""

    image_size: int = 8
    # UNet (teacher and student share it)
    num_channels: int = 32
    num_res_blocks: int = 1
    channel_mult: str = "1,2"
    attention_resolutions: str = "4"
    num_head_channels: int = 32
    # EDM teacher
    edm_steps: int = 2000
    edm_batch_size: int = 64
    edm_lr: float = 1e-3
    edm_ema_rate: float = 0.99
    # consistency distillation
    cd_steps: int = 800
    cd_batch_size: int = 32
    cd_lr: float = 2e-4
    cd_ema_rate: float = 0.99
    start_scales: int = 18
    start_ema: float = 0.95
    loss_norm: str = "l2"
    # ECT (tuned from the teacher) and iCT (from scratch): the CD stage's wall time each
    recipe_budget_s: float = 0.0  # 0: the CD stage's wall time; < 0: no time limit (run the steps)
    ect_steps: int = 100000  # an upper bound: the time budget stops it first
    ect_lr: float = 2e-4
    ect_double: int = 350  # stage 2 from step 700 of the ~850-1000 the budget allows (ECT: 4 stages in 100k steps)
    ect_dropout: float = 0.2  # ECT's CIFAR-10 value; the teacher trained without
    ect_huber_c: float = 0.1  # pseudo-Huber c (ECT's CIFAR-10 run: 0)
    ect_p_mean: float = -0.2  # mean of ln t (ECT: -1.1): more of the ~1000 steps at the noise levels one step starts from
    ict_steps: int = 2000  # K of iCT's N(k) doubling schedule; the time budget may stop it first
    ict_lr: float = 1e-3
    recipe_batch_size: int = 32
    recipe_ema_rate: float = 0.99
    two_step_sigmas: str = "80,0.821"
    # sampling and evaluation
    num_samples: int = 2000  # per row; 500 left the Fréchet distance ±0.5 from seed to seed
    sample_batch_size: int = 500
    heun_steps: int = 18
    cm_steps: int = 40
    two_step_ts: str = "0,22,39"
    # editing panel (cm/demo_editing.py)
    edit_images: int = 200
    edit_ts: str = "0,10,20,30,39"
    classifier_epochs: int = 12
    heldout_fraction: float = 0.2
    log_interval: int = 10
    seed: int = 0
    # network arithmetic of training and sampling (cm.precision): fp32 or bf16
    precision: str = "fp32"

    def as_dict(self):
        return dataclasses.asdict(self)


def default_config():
    """The README's run: about ten minutes on a 2-core CPU (see the module docstring for the sizes)."""
    return DemoConfig()


def quick_config():
    """A smoke run for CI (~1 minute): every stage and file, no quality to speak of."""
    return DemoConfig(
        edm_steps=6,
        edm_batch_size=16,
        cd_steps=4,
        cd_batch_size=8,
        start_scales=8,
        recipe_budget_s=-1.0,
        ect_steps=3,
        ect_double=1,
        ict_steps=3,
        recipe_batch_size=8,
        num_samples=20,
        sample_batch_size=20,
        heun_steps=4,
        classifier_epochs=1,
        log_interval=2,
        edit_images=20,
    )


# ----------------------------------------------------------------------------
# Data: digits → CIFAR-10-style PNG folder


def load_digits_split(heldout_fraction=0.2, seed=0):
    """scikit-learn's digits as (train images, train labels, held-out images, held-out labels).

    Images are float in [0, 1], shape [N, 8, 8]; the split is stratified by class.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DemoError('the demo needs scikit-learn for its data: pip install -e ".[demo]"') from None
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    heldout = np.zeros(len(labels), dtype=bool)
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        heldout[rng.permutation(idx)[: int(round(heldout_fraction * len(idx)))]] = True
    return images[~heldout], labels[~heldout], images[heldout], labels[heldout]


def upscale_digits(images, size):
    """[N, 8, 8] floats in [0, 1] → uint8 RGB [N, size, size, 3], white ink on black (bicubic when size > 8)."""
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(np.round(img * 255).astype(np.uint8), mode="L")
        big = np.asarray(pil.resize((size, size), Image.BICUBIC) if size != img.shape[0] else pil)
        out[i] = big[:, :, None]
    return out


DIGIT_PNG = re.compile(r"^\d+_\d{5}\.png$")


def write_image_folder(images, labels, folder, desc="writing PNGs"):
    """Write uint8 NHWC images as ``<class>_<index>.png`` (CIFAR-10 naming); returns the folder.

    PNGs of that pattern left by an earlier run are removed first, so a rerun
    with another split or size never trains on a mixture.
    """
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if DIGIT_PNG.match(name):
            os.remove(os.path.join(folder, name))
    for i, (img, y) in enumerate(tqdm(list(zip(images, labels)), desc=desc, unit="img", leave=False)):
        Image.fromarray(img).save(os.path.join(folder, f"{int(y)}_{i:05d}.png"))
    return folder


# ----------------------------------------------------------------------------
# The judge: a small CNN digits classifier


class DigitClassifier(nn.Module):
    """Three conv layers (batch norm, ReLU, max pooling) and a 64-d feature layer.

    ``features`` (the penultimate layer) feed the Fréchet distance.
    """

    def __init__(self, image_size=8, feature_dim=64, dropout=0.3):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"the digits classifier needs an image size divisible by 4, got {image_size}")

        def conv(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(
            *conv(3, 32),
            *conv(32, 32),
            nn.MaxPool2d(2),
            *conv(32, 64),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(64 * (image_size // 4) ** 2, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def to_tensor(images):
    """uint8 NHWC → float NCHW in [−1, 1] (the models' convention)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_classifier(images, labels, epochs=12, batch_size=64, lr=3e-3, seed=0, progress=True):
    """Train `DigitClassifier` on uint8 NHWC images (one-cycle LR; no flips: digits are not mirror-symmetric)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier(images.shape[1])
    x_all, y_all = to_tensor(images), torch.from_numpy(np.asarray(labels, dtype=np.int64))
    n = len(x_all)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs) * -(-n // batch_size))
    model.train()
    for _ in tqdm(range(epochs), desc="classifier", unit="epoch", disable=not progress):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            x, y = x_all[idx], y_all[idx]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def classify(model, images, batch_size=500):
    """(features [N, 64], predicted classes [N]) of uint8 NHWC images."""
    feats, preds = [], []
    for i in range(0, len(images), batch_size):
        f = model.features(to_tensor(images[i : i + batch_size]))
        feats.append(f.numpy())
        preds.append(model.head(f).argmax(1).numpy())
    return np.concatenate(feats), np.concatenate(preds)


def judge(model, images, labels, ref_stats):
    """Accuracy (%) of ``model`` against ``labels`` and Fréchet distance to ``ref_stats`` (μ, Σ)."""
    feats, preds = classify(model, images)
    acc = 100.0 * float((preds == np.asarray(labels)).mean())
    return acc, frechet_distance(*feature_stats(feats), *ref_stats)


# ----------------------------------------------------------------------------
# Running the project's scripts

# a logger table row "| step | 123 |"
STEP_ROW = re.compile(r"^\|\s*step\s*\|\s*(\d+)\s*\|")


def script_path(name):
    path = os.path.join(SCRIPTS_DIR, name)
    if not os.path.isfile(path):
        raise DemoError(f"{path} not found: the demo runs the scripts of a source checkout (pip install -e .)")
    return path


def _tail(path, n=15):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def run_training(name, script, argv, log_path, total_steps, progress=True):
    """Run a training script as a subprocess; a progress bar follows its logged steps.

    stdout and stderr go to ``log_path``. Returns the wall time in seconds.
    """
    cmd = [sys.executable, "-u", script_path(script), *argv]
    tqdm.write(f"$ {shlex.join(['python', os.path.join('scripts', script), *argv])}")
    start = time.perf_counter()
    with open(log_path, "w") as log, tqdm(total=total_steps, desc=name, unit="step", disable=not progress) as bar:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            match = STEP_ROW.match(line)
            if match:
                bar.update(min(total_steps, int(match.group(1)) + 1) - bar.n)
        rc = proc.wait()
    if rc != 0:
        raise DemoError(f"{script} failed with exit status {rc}; end of {log_path}:\n{_tail(log_path)}")
    return time.perf_counter() - start


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"_cm_demo_{name[:-3]}", script_path(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_sampling(name, argv, log_path, script="image_sample.py"):
    """Call ``scripts/<script>``'s ``main(argv)`` in this process; returns the wall time.

    Its log lines go to ``log_path``; its progress bar (stderr) stays visible.
    """
    tqdm.write(f"$ {shlex.join(['python', 'scripts/' + script, *argv])}")
    module = _load_script(script)
    from . import logger

    buf = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buf):
            module.main(argv)
    finally:
        seconds = time.perf_counter() - start
        logger.reset()
        with open(log_path, "w") as f:
            f.write(buf.getvalue())
    return seconds


def model_flags(cfg, dropout=0.0):
    """Model flags shared by the three scripts."""
    return [
        f"--image_size={cfg.image_size}",
        f"--num_channels={cfg.num_channels}",
        f"--num_res_blocks={cfg.num_res_blocks}",
        f"--channel_mult={cfg.channel_mult}",
        f"--attention_resolutions={cfg.attention_resolutions}",
        f"--num_head_channels={cfg.num_head_channels}",
        "--class_cond=True",
        "--use_scale_shift_norm=True",
        "--resblock_updown=True",
        "--use_fp16=False",
        f"--precision={cfg.precision}",
        f"--dropout={dropout}",
    ]


def edm_train_argv(cfg, data_dir, log_dir):
    return [
        f"--data_dir={data_dir}",
        f"--logging_dir={log_dir}",
        *model_flags(cfg),
        f"--global_batch_size={cfg.edm_batch_size}",
        f"--lr={cfg.edm_lr}",
        f"--ema_rate={cfg.edm_ema_rate}",
        f"--total_training_steps={cfg.edm_steps}",
        f"--save_interval={cfg.edm_steps}",
        f"--log_interval={cfg.log_interval}",
        f"--seed={cfg.seed}",
        "--random_flip=False",  # digits are not mirror-symmetric
    ]


def cm_train_argv(cfg, data_dir, log_dir, teacher_path):
    return [
        "--training_mode=consistency_distillation",
        f"--teacher_model_path={teacher_path}",
        "--teacher_dropout=0.0",
        f"--data_dir={data_dir}",
        f"--logging_dir={log_dir}",
        *model_flags(cfg),
        f"--global_batch_size={cfg.cd_batch_size}",
        f"--lr={cfg.cd_lr}",
        f"--ema_rate={cfg.cd_ema_rate}",
        f"--total_training_steps={cfg.cd_steps}",
        f"--save_interval={cfg.cd_steps}",
        f"--log_interval={cfg.log_interval}",
        "--target_ema_mode=fixed",
        "--scale_mode=fixed",
        f"--start_ema={cfg.start_ema}",
        f"--start_scales={cfg.start_scales}",
        f"--end_scales={cfg.start_scales}",
        f"--loss_norm={cfg.loss_norm}",
        "--weight_schedule=uniform",
        f"--seed={cfg.seed + 1}",
        "--random_flip=False",
    ]


def samplers(cfg):
    """(name, label, network evaluations, training mode, sampler flags) of the compared samplers."""
    return [
        ("heun", f"EDM teacher, Heun {cfg.heun_steps} steps", 2 * cfg.heun_steps - 1, "edm",
         ["--sampler=heun", f"--steps={cfg.heun_steps}"]),
        ("onestep", "CD, one step", 1, "consistency_distillation", ["--sampler=onestep", f"--steps={cfg.cm_steps}"]),
        ("twostep", f"CD, two steps (ts {cfg.two_step_ts})", len(cfg.two_step_ts.split(",")) - 1,
         "consistency_distillation", ["--sampler=multistep", f"--steps={cfg.cm_steps}", f"--ts={cfg.two_step_ts}"]),
    ]


def recipe_samplers(cfg):
    """The ECT and iCT rows, in the shape of `samplers`."""
    two = ["--sampler=multistep", f"--sigmas={cfg.two_step_sigmas}"]
    n_two = len(cfg.two_step_sigmas.split(","))
    rows = []
    for mode, name in (("ect", "ECT"), ("ict", "iCT")):
        rows.append((f"{mode}_onestep", f"{name}, one step", 1, mode, ["--sampler=onestep"]))
        rows.append((f"{mode}_twostep", f"{name}, two steps (σ {cfg.two_step_sigmas})", n_two, mode, two))
    return rows


def recipe_train_argv(cfg, mode, data_dir, log_dir, init_from):
    """cm_train.py flags of the demo's ECT (from ``init_from``) or iCT (from scratch) run."""
    steps = cfg.ect_steps if mode == "ect" else cfg.ict_steps  # iCT: also K of its N(k) doubling
    argv = [
        f"--training_mode={mode}",
        f"--data_dir={data_dir}",
        f"--logging_dir={log_dir}",
        *model_flags(cfg, dropout=cfg.ect_dropout if mode == "ect" else 0.0),
        f"--global_batch_size={cfg.recipe_batch_size}",
        f"--ema_rate={cfg.recipe_ema_rate}",
        f"--total_training_steps={steps}",
        f"--save_interval={steps}",
        f"--log_interval={cfg.log_interval}",
        f"--seed={cfg.seed + 2}",
        "--random_flip=False",
    ]
    if mode == "ect":
        return argv + [
            f"--init_from={init_from}",
            f"--lr={cfg.ect_lr}",
            f"--ect_double={cfg.ect_double}",
            f"--huber_c={cfg.ect_huber_c}",
            f"--p_mean={cfg.ect_p_mean}",
        ]
    return argv + ["--init_from=none", f"--lr={cfg.ict_lr}"]


def run_budgeted(jobs, budget_s, poll_s=0.2):
    """Run training commands at once, one thread each; SIGTERM each after ``budget_s`` (None: no limit).

    ``jobs`` is [(name, script, argv, log path)]. A SIGTERMed run finishes its
    step and saves (see cm.train_util); the signal waits for the run's first
    logged step row, so even a budget shorter than start-up gets a checkpoint.
    Returns {name: wall seconds}.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {}
    for name, script, argv, log_path in jobs:
        tqdm.write(f"$ {shlex.join(['python', os.path.join('scripts', script), *argv])}")
        log = open(log_path, "w")
        cmd = [sys.executable, "-u", script_path(script), *argv]
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, log_path, script)
    start = time.perf_counter()
    seconds, stopped = {}, set()
    while len(seconds) < len(procs):
        time.sleep(poll_s)
        elapsed = time.perf_counter() - start
        for name, (proc, log, log_path, script) in procs.items():
            if name in seconds:
                continue
            if proc.poll() is not None:
                seconds[name] = elapsed
                log.close()
                if proc.returncode != 0:
                    for other, _, _, _ in procs.values():
                        if other.poll() is None:
                            other.kill()
                    raise DemoError(f"{script} ({name}) failed with exit status {proc.returncode}; "
                                    f"end of {log_path}:\n{_tail(log_path)}")
            elif budget_s is not None and elapsed >= budget_s and name not in stopped and _loop_started(log_path):
                proc.send_signal(signal.SIGTERM)
                stopped.add(name)
    return seconds


def _loop_started(log_path):
    """True once a training run has logged a step row (its loop, and SIGTERM handling, is running)."""
    with open(log_path, errors="replace") as f:
        return any(STEP_ROW.match(line) for line in f)


def latest_ema(log_dir, rate):
    """(EMA checkpoint path, step) of the latest checkpoint a training run left in ``log_dir``."""
    from .checkpoint import find_latest_checkpoint, parse_resume_step

    model = find_latest_checkpoint(log_dir)
    if model is None:
        raise DemoError(f"no checkpoint in {log_dir}")
    step = parse_resume_step(model)
    path = os.path.join(log_dir, f"ema_{rate}_{step:06d}.pt")
    if not os.path.isfile(path):
        raise DemoError(f"cm_train.py finished without writing {path}")
    return path, step


def sample_argv(cfg, model_path, log_dir, training_mode, sampler_flags):
    return [
        f"--model_path={model_path}",
        f"--training_mode={training_mode}",
        f"--logging_dir={log_dir}",
        *model_flags(cfg),
        *sampler_flags,
        f"--num_samples={cfg.num_samples}",
        f"--batch_size={cfg.sample_batch_size}",
        "--class_labels=" + ",".join(str(c) for c in range(NUM_CLASSES)),
        f"--seed={cfg.seed}",
    ]


def sample_files(folder, cfg):
    """Paths of the .npz and PNG grid image_sample.py writes: samples_{N}x{H}x{W}x3.*"""
    stem = os.path.join(folder, f"samples_{cfg.num_samples}x{cfg.image_size}x{cfg.image_size}x3")
    for path in (stem + ".npz", stem + ".png"):
        if not os.path.isfile(path):
            raise DemoError(f"image_sample.py finished without writing {path}")
    return stem + ".npz", stem + ".png"


# ----------------------------------------------------------------------------
# Output: table, grids, results


def format_table(rows):
    """The results table as text (one header, one line per row)."""
    header = ("sampler", "NFE", "wall s", "img/s", "accuracy %", "Fréchet dist.")
    lines = []
    for r in rows:
        lines.append(
            (
                r["label"],
                "-" if r["nfe"] is None else str(r["nfe"]),
                "-" if r["seconds"] is None else f"{r['seconds']:.1f}",
                "-" if r["seconds"] is None else f"{r['images'] / r['seconds']:.1f}",
                f"{r['accuracy']:.1f}",
                f"{r['frechet']:.2f}",
            )
        )
    return text_table(header, lines)


def comparison_grid(named_images, per_class=4, scale=2, gap=6, line=1, titles=None):
    """One RGB array: a panel per sampler, one column per class, ``per_class`` rows.

    ``named_images`` is [(uint8 NHWC images, labels)]. Cells are ``line`` px
    apart on a grey ground; panels ``gap`` px apart on white; ``titles`` (one
    per panel) are written in a white strip above the panels.
    """
    panels = []
    for images, labels in named_images:
        h, w = images.shape[1:3]
        ph, pw = h + line, w + line
        panel = np.full((per_class * ph + line, NUM_CLASSES * pw + line, 3), 96, dtype=np.uint8)
        for c in range(NUM_CLASSES):
            for r, i in enumerate(np.flatnonzero(np.asarray(labels) == c)[:per_class]):
                panel[line + r * ph : line + r * ph + h, line + c * pw : line + c * pw + w] = images[i]
        panels.append(panel)
    sep = np.full((panels[0].shape[0], gap, 3), 255, dtype=np.uint8)
    grid = np.concatenate([x for p in panels for x in (p, sep)][:-1], axis=1)
    grid = grid.repeat(scale, 0).repeat(scale, 1)
    if not titles:
        return grid
    from PIL import ImageDraw, ImageFont

    strip = Image.new("RGB", (grid.shape[1], 16), "white")
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default()
    for k, title in enumerate(titles):
        draw.text((k * (panels[0].shape[1] + gap) * scale + 2, 2), title, fill="black", font=font)
    return np.concatenate([np.asarray(strip), grid], axis=0)


# ----------------------------------------------------------------------------
# The whole run


def run_demo(out, cfg, progress=True):
    """Run every stage into folder ``out``; returns the results dict (also in results.json)."""
    t_start = time.perf_counter()
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    torch.manual_seed(cfg.seed)
    timings = {}
    commands = {}

    # 1. data
    t = time.perf_counter()
    x_train, y_train, x_held, y_held = load_digits_split(cfg.heldout_fraction, cfg.seed)
    train_imgs = upscale_digits(x_train, cfg.image_size)
    held_imgs = upscale_digits(x_held, cfg.image_size)
    data_dir = write_image_folder(train_imgs, y_train, os.path.join(out, "data", "train"), "train PNGs")
    write_image_folder(held_imgs, y_held, os.path.join(out, "data", "heldout"), "held-out PNGs")
    tqdm.write(
        f"digits: {len(train_imgs)} training and {len(held_imgs)} held-out images, "
        f"{cfg.image_size}x{cfg.image_size} RGB PNGs in {os.path.dirname(data_dir)}"
    )
    timings["data"] = time.perf_counter() - t

    # 2. the judge
    t = time.perf_counter()
    clf = train_classifier(train_imgs, y_train, epochs=cfg.classifier_epochs, seed=cfg.seed, progress=progress)
    torch.save(clf.state_dict(), os.path.join(out, "classifier.pt"))
    ref_imgs, ref_labels = held_imgs, y_held
    ref_feats, ref_preds = classify(clf, ref_imgs)
    ref_stats = feature_stats(ref_feats)
    rng = np.random.default_rng(cfg.seed)
    pick = rng.choice(len(train_imgs), size=min(cfg.num_samples, len(train_imgs)), replace=False)
    real = train_imgs[pick]
    _, real_fd = judge(clf, real, y_train[pick], ref_stats)
    real_row = dict(
        name="real",
        label="real digits (held-out; FD: train subset)",
        nfe=None,
        seconds=None,
        images=len(real),
        accuracy=100.0 * float((ref_preds == ref_labels).mean()),
        frechet=real_fd,
    )
    timings["classifier"] = time.perf_counter() - t
    tqdm.write(f"classifier: {real_row['accuracy']:.1f}% on the held-out digits")

    # 3. EDM teacher
    edm_dir = os.path.join(out, "edm")
    argv = edm_train_argv(cfg, data_dir, edm_dir)
    commands["edm_train"] = ["python", "scripts/edm_train.py", *argv]
    timings["edm_train"] = run_training("EDM teacher", "edm_train.py", argv, os.path.join(logs, "edm_train.log"),
                                        cfg.edm_steps, progress)
    teacher = os.path.join(edm_dir, f"ema_{cfg.edm_ema_rate}_{cfg.edm_steps:06d}.pt")
    if not os.path.isfile(teacher):
        raise DemoError(f"edm_train.py finished without writing {teacher}")

    # 4. consistency distillation
    cd_dir = os.path.join(out, "cd")
    argv = cm_train_argv(cfg, data_dir, cd_dir, teacher)
    commands["cm_train"] = ["python", "scripts/cm_train.py", *argv]
    timings["cm_train"] = run_training("consistency distillation", "cm_train.py", argv,
                                       os.path.join(logs, "cm_train.log"), cfg.cd_steps, progress)
    student = os.path.join(cd_dir, f"ema_{cfg.cd_ema_rate}_{cfg.cd_steps:06d}.pt")
    if not os.path.isfile(student):
        raise DemoError(f"cm_train.py finished without writing {student}")

    # 4b. ECT and iCT, each for the CD stage's wall time
    budget = None if cfg.recipe_budget_s < 0 else (cfg.recipe_budget_s or timings["cm_train"])
    jobs = []
    for mode in ("ect", "ict"):
        argv = recipe_train_argv(cfg, mode, data_dir, os.path.join(out, mode), teacher)
        commands[f"{mode}_train"] = ["python", "scripts/cm_train.py", *argv]
        jobs.append((mode, "cm_train.py", argv, os.path.join(logs, f"{mode}_train.log")))
    tqdm.write(f"ECT and iCT: {'until their steps are done' if budget is None else f'{budget:.0f} s each'}")
    for mode, seconds in run_budgeted(jobs, budget).items():
        timings[f"{mode}_train"] = seconds
    checkpoints = {"edm": teacher, "consistency_distillation": student}
    recipe_steps = {}
    for mode in ("ect", "ict"):
        checkpoints[mode], recipe_steps[mode] = latest_ema(os.path.join(out, mode), cfg.recipe_ema_rate)

    # 5. sampling, 6. judging
    rows, panels, files = [], [], {}
    for name, label, nfe, mode, flags in samplers(cfg) + recipe_samplers(cfg):
        folder = os.path.join(out, "samples", name)
        argv = sample_argv(cfg, checkpoints[mode], folder, mode, flags)
        commands[f"sample_{name}"] = ["python", "scripts/image_sample.py", *argv]
        seconds = run_sampling(name, argv, os.path.join(logs, f"sample_{name}.log"))
        timings[f"sample_{name}"] = seconds
        npz, grid = sample_files(folder, cfg)
        with np.load(npz) as f:
            images, labels = f["arr_0"], f["arr_1"]
        acc, fd = judge(clf, images, labels, ref_stats)
        rows.append(
            dict(name=name, label=label, nfe=nfe, seconds=seconds, images=len(images), accuracy=acc, frechet=fd)
        )
        panels.append((images, labels))
        files[name] = dict(npz=os.path.relpath(npz, out), grid=os.path.relpath(grid, out))
    rows.append(real_row)
    from .demo_editing import run_editing

    edits, edit_files = run_editing(out, cfg, student, clf, held_imgs, y_held, ref_stats, logs, commands, timings)

    grid_path = os.path.join(out, "comparison.png")
    titles = [f"{r['label']}: {r['nfe']} NFE" for r in rows if r["name"] != "real"]
    scale = max(1, 32 // cfg.image_size)
    Image.fromarray(comparison_grid(panels, scale=scale, titles=titles)).save(grid_path)
    table = format_table(rows + edits)
    with open(os.path.join(out, "table.txt"), "w") as f:
        f.write(table + "\n")
    timings["total"] = time.perf_counter() - t_start
    results = dict(
        config=cfg.as_dict(),
        rows=rows,
        editing=edits,
        timings_s=timings,
        commands=commands,
        files=dict(samples=files, editing=edit_files, comparison="comparison.png", table="table.txt",
                   classifier="classifier.pt", teacher=os.path.relpath(teacher, out),
                   student=os.path.relpath(student, out),
                   **{mode: os.path.relpath(checkpoints[mode], out) for mode in ("ect", "ict")}),
        recipe_steps=recipe_steps,
        torch_threads=torch.get_num_threads(),
    )
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print()
    print(table)
    print(
        f"\nclassifier: CNN trained on {len(train_imgs)} real digits; accuracy = its agreement with the requested "
        f"class; Fréchet distance in its {ref_feats.shape[1]}-d feature space to {len(ref_imgs)} held-out digits."
    )
    print(f"total wall time {timings['total']:.0f} s " + "(" + ", ".join(
        f"{k} {v:.0f} s" for k, v in timings.items() if k != "total") + ")")
    print("ECT and iCT reached steps " + ", ".join(f"{m} {n}" for m, n in recipe_steps.items()) + " in "
          + ", ".join(f"{timings[m + '_train']:.0f} s" for m in recipe_steps) + f" (CD: {cfg.cd_steps} steps)")
    print(f"everything is in {out} (table.txt, results.json, comparison.png, samples/, logs/)")
    return results
