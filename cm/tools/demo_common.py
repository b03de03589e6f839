"""What the digits demo's stages share: the data, the judge, running the project's scripts, grids.

Imported by `cm.tools.demo` (the stages), `cm.tools.demo_recipes` (the recipe
rows) and `cm.tools.demo_editing` (the editing panel); it imports none of them.
"""

import contextlib
import importlib.util
import io
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

from ..metrics.evaluation import feature_stats, frechet_distance

NUM_CLASSES = 10
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS_DIR = os.path.join(REPO_ROOT, "scripts")


class DemoError(RuntimeError):
    """A stage of the demo failed; the message says which and where its log is."""


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
    from .. import logger

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
    from ..checkpoint import find_latest_checkpoint, parse_resume_step

    model = find_latest_checkpoint(log_dir)
    if model is None:
        raise DemoError(f"no checkpoint in {log_dir}")
    step = parse_resume_step(model)
    path = os.path.join(log_dir, f"ema_{rate}_{step:06d}.pt")
    if not os.path.isfile(path):
        raise DemoError(f"cm_train.py finished without writing {path}")
    return path, step


def _font(size):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable with FreeType (Pillow >= 10.1)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def comparison_grid(named_images, per_class=2, scale=2, gap=6, line=1, titles=None, font_size=13):
    """One RGB array: one row per sampler, one column per class, ``per_class`` samples of each class.

    ``named_images`` is [(uint8 NHWC images, labels)]. Cells are ``line`` px
    apart on a grey ground; rows ``gap`` px apart on white. With ``titles``
    (one per row) each row's title stands at its left and the class ids head
    the columns, so the figure reads at README width.
    """
    panels = []
    for images, labels in named_images:
        h, w = images.shape[1:3]
        ph, pw = h + line, w + line
        panel = np.full((per_class * ph + line, NUM_CLASSES * pw + line, 3), 96, dtype=np.uint8)
        for c in range(NUM_CLASSES):
            for r, i in enumerate(np.flatnonzero(np.asarray(labels) == c)[:per_class]):
                panel[line + r * ph : line + r * ph + h, line + c * pw : line + c * pw + w] = images[i]
        panels.append(panel.repeat(scale, 0).repeat(scale, 1))
    sep = np.full((gap, panels[0].shape[1], 3), 255, dtype=np.uint8)
    grid = np.concatenate([x for p in panels for x in (p, sep)][:-1], axis=0)
    if not titles:
        return grid
    from PIL import ImageDraw

    font = _font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max(measure.textlength(t, font=font) for t in titles)) + 12
    header_h = font_size + 8
    canvas = Image.new("RGB", (label_w + grid.shape[1], header_h + grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (label_w, header_h))
    draw = ImageDraw.Draw(canvas)
    cell_w = (panels[0].shape[1] - line * scale) / NUM_CLASSES
    for c in range(NUM_CLASSES):
        x = label_w + line * scale + (c + 0.5) * cell_w
        draw.text((x, header_h / 2), str(c), fill="black", font=font, anchor="mm")
    y = header_h
    for title, panel in zip(titles, panels):
        draw.text((label_w - 8, y + panel.shape[0] / 2), title, fill="black", font=font, anchor="rm")
        y += panel.shape[0] + gap
    return np.asarray(canvas)
