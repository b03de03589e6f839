"""End-to-end demo on scikit-learn's 8×8 handwritten digits, a tiny CIFAR-10 stand-in.

The demo runs the whole method with the project's own scripts, on a CPU, in
under fifteen minutes (11.6 measured on 2 shared cores; the recipe stages,
each with CD's training compute, run at once):

1. data: the 1797 digits are split (stratified) into a training and a held-out
   part and written as RGB PNGs named like CIFAR-10 (``<class>_<index>.png``)
   into ``OUT/data/{train,heldout}``;
2. a small CNN digits classifier is trained on the training part (the judge
   of the samples: accuracy, and features for a Fréchet distance);
3. ``scripts/edm_train.py`` trains a class-conditional EDM teacher
   (subprocess; checkpoints and logs in ``OUT/edm``);
4. ``scripts/cm_train.py`` distils it with consistency distillation
   (subprocess; ``OUT/cd``), starting from the teacher's EMA weights;
4b. the later recipes, each with the CD stage's training compute (counted
   network passes, see `cm.tools.demo_recipes`: a fixed step count, the same
   on every machine; all at once, one thread each; their wall times are
   recorded), one row each of `cm.tools.demo_recipes.RECIPE_STAGES`: ECT and
   sCT tune the teacher's EMA weights, sCD distils the teacher, iCT trains
   from scratch, DMD2 (with and without its GAN head) tunes the CD model, MeanFlow
   trains a two-time network from scratch, sampled in one and two steps;
5. ``scripts/image_sample.py`` draws EDM-Heun, one-step CM and two-step CM
   samples of every model (ECT/iCT two-step at σ = 80, 0.821) (its ``main``
   is called in this process so that the wall time covers sampling and not
   Python/torch start-up); ``OUT/samples/<name>``;
6. the samples are judged: classifier accuracy against the requested labels
   and the Fréchet distance between real held-out and generated digits in
   the classifier's penultimate feature space (``cm.metrics.evaluation``).

While they train, stages 3-4b log the same Fréchet distance over their steps
(``--eval_interval``, `cm.train_eval`, with the judge's feature layers saved
as TorchScript and ``eval_num_samples`` fixed-noise samples); ``curves.png``
draws those curves and the losses of every stage on one figure.

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
``samples_*.npz`` and their grids, ``comparison.png`` (a row per sampler),
``curves.png``, ``table.txt`` and ``results.json``.
"""

import dataclasses
import json
import os
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..metrics.evaluation import feature_stats, save_stats
from .benchmark import text_table
from .demo_common import (  # noqa: F401  (judge, classify, ...: the demo's public helpers)
    NUM_CLASSES,
    DemoError,
    classify,
    comparison_grid,
    judge,
    latest_ema,
    load_digits_split,
    model_flags,
    run_budgeted,
    run_sampling,
    run_training,
    train_classifier,
    upscale_digits,
    write_image_folder,
)
from .demo_editing import run_editing
from .demo_recipes import RECIPE_STAGES, budget_steps, cd_budget, stage_samplers, stage_train_argv
from .progress_plot import write_progress_plot

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
    # every recipe stage (cm/tools/demo_recipes.py) gets the CD stage's training compute in counted passes
    recipe_steps: int = 0  # 0: from that budget (ECT, iCT 1200; DMD2 200, with GAN 84; sCT and MeanFlow 960, sCD 800); > 0: this many
    # ECT (tuned from the teacher) and iCT (from scratch)
    ect_lr: float = 2e-4
    ect_double: int = 400  # three whole stages in the budget's 1200 steps (ECT: 8 stages in 200k steps)
    ect_dropout: float = 0.2  # ECT's CIFAR-10 value; the teacher trained without
    ect_huber_c: float = 0.1  # pseudo-Huber c (ECT's CIFAR-10 run: 0)
    ect_p_mean: float = -0.2  # mean of ln t (ECT: -1.1): more of the 1200 steps at the noise levels one step starts from
    ict_lr: float = 1e-3
    # DMD2 (cm/dmd2.py) tuning the CD model, the teacher as the real score, with and without the GAN head
    dmd2_lr: float = 5e-5  # generator and fake score; untuned (DMD2 on CIFAR-10: 2e-6, the demo CD: 2e-4)
    dmd2_ratio: int = 5  # fake-score updates per generator update
    dmd2_warmup: int = 50  # lr warm-up iterations (DMD2: 500)
    dmd2_gan_max_step: int = 20  # diffusion-GAN noise levels: the lower 20 of the 40-point grid
    mf_lr: float = 6e-4  # Adam (the row's optimiser), the paper's CIFAR-10 value
    recipe_batch_size: int = 32
    recipe_ema_rate: float = 0.99
    two_step_sigmas: str = "80,0.821"
    # sCT and sCD (the same counted budget): the paper's two-step t_mid 1.1 is σ = 0.5·tan 1.1 = 0.982
    scm_lr: float = 2e-4
    scm_warmup_steps: int = 100  # sCM's 10k of ~400k steps; the demo's runs are a few hundred steps
    sct_dropout: float = 0.2  # sCT's CIFAR-10 value (sCD: 0)
    scm_two_step_sigmas: str = "80,0.982"
    # Fréchet distance during training (cm.train_eval with the judge's features), every this many steps
    edm_eval_interval: int = 250
    cm_eval_interval: int = 100  # CD and the recipe stages (one and two steps: cheap)
    eval_num_samples: int = 500
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
        ect_double=1,
        dmd2_ratio=2,
        dmd2_warmup=0,
        recipe_batch_size=8,
        num_samples=20,
        sample_batch_size=20,
        heun_steps=4,
        classifier_epochs=1,
        log_interval=2,
        edit_images=20,
        edm_eval_interval=3,
        cm_eval_interval=2,
        eval_num_samples=20,
    )


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


JUDGE_FEATURES, JUDGE_STATS = "judge_features.pt", "heldout_stats.npz"


def eval_argv(cfg, out, interval):
    """The training scripts' evaluation flags: the judge's features (TorchScript) against the held-out digits."""
    if interval <= 0:
        return []
    return [
        f"--eval_interval={interval}",
        f"--eval_num_samples={cfg.eval_num_samples}",
        f"--eval_batch_size={cfg.sample_batch_size}",
        f"--eval_steps={cfg.heun_steps}",
        f"--eval_ref={os.path.join(out, JUDGE_STATS)}",
        f"--eval_features={os.path.join(out, JUDGE_FEATURES)}",
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
    """The rows of every recipe stage (`cm.tools.demo_recipes`), in the shape of `samplers`."""
    return [row for stage in RECIPE_STAGES for row in stage_samplers(stage, cfg)]


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
        "--quantize=round",  # every row judged on the same uint8 conversion (truncation darkens by half a level)
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


# ----------------------------------------------------------------------------
# The whole run


def prepare_data(out, cfg):
    """Stage 1: the digits as PNG folders; returns (train dir, train images, labels, held-out images, labels)."""
    x_train, y_train, x_held, y_held = load_digits_split(cfg.heldout_fraction, cfg.seed)
    train_imgs = upscale_digits(x_train, cfg.image_size)
    held_imgs = upscale_digits(x_held, cfg.image_size)
    data_dir = write_image_folder(train_imgs, y_train, os.path.join(out, "data", "train"), "train PNGs")
    write_image_folder(held_imgs, y_held, os.path.join(out, "data", "heldout"), "held-out PNGs")
    tqdm.write(
        f"digits: {len(train_imgs)} training and {len(held_imgs)} held-out images, "
        f"{cfg.image_size}x{cfg.image_size} RGB PNGs in {os.path.dirname(data_dir)}"
    )
    return data_dir, train_imgs, y_train, held_imgs, y_held


def train_judge(out, cfg, train_imgs, y_train, held_imgs, y_held, progress):
    """Stage 2: the digits classifier; returns (classifier, held-out feature stats, the 'real' table row)."""
    clf = train_classifier(train_imgs, y_train, epochs=cfg.classifier_epochs, seed=cfg.seed, progress=progress)
    torch.save(clf.state_dict(), os.path.join(out, "classifier.pt"))
    ref_feats, ref_preds = classify(clf, held_imgs)
    ref_stats = feature_stats(ref_feats)
    # the training runs' in-loop judge: its feature layers as TorchScript, the held-out statistics
    example = torch.zeros(2, 3, cfg.image_size, cfg.image_size)
    torch.jit.save(torch.jit.trace(clf.body.eval(), example), os.path.join(out, JUDGE_FEATURES))
    save_stats(os.path.join(out, JUDGE_STATS), *ref_stats)
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
        accuracy=100.0 * float((ref_preds == y_held).mean()),
        frechet=real_fd,
    )
    tqdm.write(f"classifier: {real_row['accuracy']:.1f}% on the held-out digits")
    return clf, ref_stats, real_row


def train_base_models(out, cfg, data_dir, logs, commands, timings, progress):
    """Stages 3-4: the EDM teacher and its CD student; returns their EMA files."""
    edm_dir = os.path.join(out, "edm")
    argv = edm_train_argv(cfg, data_dir, edm_dir) + eval_argv(cfg, out, cfg.edm_eval_interval)
    commands["edm_train"] = ["python", "scripts/edm_train.py", *argv]
    timings["edm_train"] = run_training("EDM teacher", "edm_train.py", argv, os.path.join(logs, "edm_train.log"),
                                        cfg.edm_steps, progress)
    teacher = os.path.join(edm_dir, f"ema_{cfg.edm_ema_rate}_{cfg.edm_steps:06d}.pt")
    if not os.path.isfile(teacher):
        raise DemoError(f"edm_train.py finished without writing {teacher}")

    cd_dir = os.path.join(out, "cd")
    argv = cm_train_argv(cfg, data_dir, cd_dir, teacher) + eval_argv(cfg, out, cfg.cm_eval_interval)
    commands["cm_train"] = ["python", "scripts/cm_train.py", *argv]
    timings["cm_train"] = run_training("consistency distillation", "cm_train.py", argv,
                                       os.path.join(logs, "cm_train.log"), cfg.cd_steps, progress)
    student = os.path.join(cd_dir, f"ema_{cfg.cd_ema_rate}_{cfg.cd_steps:06d}.pt")
    if not os.path.isfile(student):
        raise DemoError(f"cm_train.py finished without writing {student}")
    return teacher, student


def train_recipes(out, cfg, data_dir, starts, logs, commands, timings):
    """Stage 4b: every recipe stage at once, one thread each, each with the CD stage's compute.

    ``starts`` maps a stage's start ("teacher", "student") to its file.
    Returns ({stage key: EMA file}, {stage key: steps reached}).
    """
    jobs = []
    for stage in RECIPE_STAGES:
        argv = stage_train_argv(stage, cfg, data_dir, os.path.join(out, stage.key), starts.get(stage.start),
                                starts.get("teacher"))
        argv += eval_argv(cfg, out, cfg.cm_eval_interval)
        commands[f"{stage.key}_train"] = ["python", "scripts/cm_train.py", *argv]
        jobs.append((stage.key, "cm_train.py", argv, os.path.join(logs, f"{stage.key}_train.log")))
    tqdm.write(f"recipes at CD's training compute ({cd_budget(cfg)} forward-pass equivalents): " + ", ".join(
        f"{stage.label} {budget_steps(stage, cfg)} steps" for stage in RECIPE_STAGES))
    for key, seconds in run_budgeted(jobs, None).items():
        timings[f"{key}_train"] = seconds
    files, steps = {}, {}
    for stage in RECIPE_STAGES:
        files[stage.key], steps[stage.key] = latest_ema(os.path.join(out, stage.key), cfg.recipe_ema_rate)
    return files, steps


def sample_and_judge(out, cfg, checkpoints, clf, ref_stats, logs, commands, timings):
    """Stages 5-6: every sampler row samples its model and is judged; returns (rows, panels, files)."""
    rows, panels, files = [], [], {}
    recipe_rows = [(row, stage.key) for stage in RECIPE_STAGES for row in stage_samplers(stage, cfg)]
    for (name, label, nfe, mode, flags), model in [(r, r[3]) for r in samplers(cfg)] + recipe_rows:
        folder = os.path.join(out, "samples", name)
        argv = sample_argv(cfg, checkpoints[model], folder, mode, flags)
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
    return rows, panels, files


def run_demo(out, cfg, progress=True):
    """Run every stage into folder ``out``; returns the results dict (also in results.json)."""
    t_start = time.perf_counter()
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    torch.manual_seed(cfg.seed)
    timings, commands = {}, {}

    t = time.perf_counter()
    data_dir, train_imgs, y_train, held_imgs, y_held = prepare_data(out, cfg)
    timings["data"] = time.perf_counter() - t
    t = time.perf_counter()
    clf, ref_stats, real_row = train_judge(out, cfg, train_imgs, y_train, held_imgs, y_held, progress)
    timings["classifier"] = time.perf_counter() - t

    teacher, student = train_base_models(out, cfg, data_dir, logs, commands, timings, progress)
    recipe_files, recipe_steps = train_recipes(
        out, cfg, data_dir, {"teacher": teacher, "student": student}, logs, commands, timings
    )
    checkpoints = {"edm": teacher, "consistency_distillation": student, **recipe_files}
    rows, panels, files = sample_and_judge(out, cfg, checkpoints, clf, ref_stats, logs, commands, timings)
    rows.append(real_row)
    edits, edit_files = run_editing(out, cfg, student, clf, held_imgs, y_held, ref_stats, logs, commands, timings)

    grid_path = os.path.join(out, "comparison.png")
    # PIL's default font has no Greek letters
    titles = [f"{r['label']}: {r['nfe']} NFE".replace("σ", "sigma") for r in rows if r["name"] != "real"]
    scale = max(1, 32 // cfg.image_size)
    Image.fromarray(comparison_grid(panels, scale=scale, titles=titles)).save(grid_path)
    curves = write_curves(out, cfg)
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
        files=dict(samples=files, editing=edit_files, comparison="comparison.png", table="table.txt", curves=curves,
                   classifier="classifier.pt", teacher=os.path.relpath(teacher, out),
                   student=os.path.relpath(student, out),
                   **{key: os.path.relpath(path, out) for key, path in recipe_files.items()}),
        recipe_steps=recipe_steps,
        torch_threads=torch.get_num_threads(),
    )
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print_summary(out, cfg, table, timings, recipe_steps, len(train_imgs), len(held_imgs))
    return results


CURVES = "curves.png"


def write_curves(out, cfg):
    """``curves.png``: each stage's Fréchet distance (and loss) over its steps; its name (None without matplotlib)."""
    runs = [("EDM teacher", "edm"), ("CD", "cd")] + [(stage.label, stage.key) for stage in RECIPE_STAGES]
    try:
        write_progress_plot(
            [os.path.join(out, key) for _, key in runs],
            os.path.join(out, CURVES),
            names=[name for name, _ in runs],
            only=("fid", "loss"),
            fid_title=f"Fréchet distance to the held-out digits during training ({cfg.eval_num_samples} samples)",
            fid_label="Fréchet distance (judge features)",
        )
    except ValueError as e:  # matplotlib missing: the rest of the demo stands
        tqdm.write(f"{CURVES} not written: {e}")
        return None
    return CURVES


def print_summary(out, cfg, table, timings, recipe_steps, n_train, n_held):
    print()
    print(table)
    print(
        f"\nclassifier: CNN trained on {n_train} real digits; accuracy = its agreement with the requested "
        f"class; Fréchet distance in its feature space to {n_held} held-out digits."
    )
    print(f"total wall time {timings['total']:.0f} s " + "(" + ", ".join(
        f"{k} {v:.0f} s" for k, v in timings.items() if k != "total") + ")")
    print("recipes reached steps " + ", ".join(f"{m} {n}" for m, n in recipe_steps.items()) + " in "
          + ", ".join(f"{timings[m + '_train']:.0f} s" for m in recipe_steps) + f" (CD: {cfg.cd_steps} steps)")
    print(f"everything is in {out} (table.txt, results.json, comparison.png, {CURVES}, samples/, logs/)")
