"""The demo's recipe rows: one `RecipeStage` per later recipe trained with ``cm_train.py``.

Each stage is a row of `RECIPE_STAGES`: its training mode, where its weights
start (the EDM teacher's EMA, the distilled CD model, or random), its own
cm_train.py flags and step count, and the samplers of its table rows (one
step, and two steps through ``two_step`` flags). `cm.tools.demo` trains every
stage with the same budget rule and samples and judges each row the same way,
so a new recipe joins the demo as one row here and nothing else.
"""

import dataclasses
from typing import Callable

from .demo_common import model_flags

# where a stage's weights start: the teacher's EMA file, the CD student's EMA file, or random weights
STARTS = ("teacher", "student", "none")


@dataclasses.dataclass(frozen=True)
class RecipeStage:
    """One recipe of the demo (see the module docstring)."""

    key: str  # names its folder, log, table rows and results entries
    mode: str  # --training_mode of cm_train.py (and of image_sample.py)
    label: str  # table label prefix
    start: str  # one of STARTS
    steps: Callable  # cfg -> --total_training_steps (an upper bound when the demo budgets by time)
    flags: Callable  # cfg -> the stage's own cm_train.py flags (lr, recipe flags)
    dropout: Callable = lambda cfg: 0.0  # cfg -> --dropout
    teacher: bool = False  # also pass the EDM teacher's EMA file as --teacher_model_path (DMD2's real score)
    two_step: Callable = lambda cfg: ["--sampler=multistep", f"--sigmas={cfg.two_step_sigmas}"]

    def __post_init__(self):
        if self.start not in STARTS:
            raise ValueError(f"stage {self.key}: start must be one of {STARTS}, got {self.start!r}")


ECT = RecipeStage(
    key="ect",
    mode="ect",
    label="ECT",
    start="teacher",
    steps=lambda cfg: cfg.ect_steps,
    flags=lambda cfg: [
        f"--lr={cfg.ect_lr}",
        f"--ect_double={cfg.ect_double}",
        f"--huber_c={cfg.ect_huber_c}",
        f"--p_mean={cfg.ect_p_mean}",
    ],
    dropout=lambda cfg: cfg.ect_dropout,
)

ICT = RecipeStage(
    key="ict",
    mode="ict",
    label="iCT",
    start="none",
    steps=lambda cfg: cfg.ict_steps,  # also K of iCT's N(k) doubling schedule
    flags=lambda cfg: [f"--lr={cfg.ict_lr}"],
)



def _dmd2_flags(gan):
    def flags(cfg):
        out = [
            f"--lr={cfg.dmd2_lr}",
            f"--fake_lr={cfg.dmd2_lr}",
            f"--dfake_gen_update_ratio={cfg.dmd2_ratio}",
            f"--lr_warmup_steps={cfg.dmd2_warmup}",
        ]
        return out + (["--dmd_gan=True", f"--gan_max_step={cfg.dmd2_gan_max_step}"] if gan else [])

    return flags


# DMD2 tunes the distilled CD model, the EDM teacher as the real score (with and without the GAN head)
DMD2 = RecipeStage(
    key="dmd2",
    mode="dmd2",
    label="CD + DMD2",
    start="student",
    steps=lambda cfg: cfg.dmd2_steps,
    flags=_dmd2_flags(gan=False),
    teacher=True,
)

DMD2_GAN = RecipeStage(
    key="dmd2_gan",
    mode="dmd2",
    label="CD + DMD2 + GAN",
    start="student",
    steps=lambda cfg: cfg.dmd2_steps,
    flags=_dmd2_flags(gan=True),
    teacher=True,
)

RECIPE_STAGES = (ECT, ICT, DMD2, DMD2_GAN)


def stage_train_argv(stage, cfg, data_dir, log_dir, start_path, teacher_path=None):
    """cm_train.py flags of ``stage``; ``start_path`` is the file its weights start from (unused for 'none').

    ``teacher_path``: the EDM teacher's file, passed when the stage has ``teacher``.
    """
    steps = stage.steps(cfg)
    init = ["--init_from=none"] if stage.start == "none" else [f"--init_from={start_path}"]
    if stage.teacher:
        init.append(f"--teacher_model_path={teacher_path}")
    return [
        f"--training_mode={stage.mode}",
        f"--data_dir={data_dir}",
        f"--logging_dir={log_dir}",
        *model_flags(cfg, dropout=stage.dropout(cfg)),
        f"--global_batch_size={cfg.recipe_batch_size}",
        f"--ema_rate={cfg.recipe_ema_rate}",
        f"--total_training_steps={steps}",
        f"--save_interval={steps}",
        f"--log_interval={cfg.log_interval}",
        f"--seed={cfg.seed + 2}",
        "--random_flip=False",
        *init,
        *stage.flags(cfg),
    ]


def stage_samplers(stage, cfg):
    """The stage's table rows (name, label, NFE, training mode, sampler flags), in the shape of demo.samplers."""
    two = stage.two_step(cfg)
    sigmas = next((a.split("=", 1)[1] for a in two if a.startswith("--sigmas=")), None)
    n_two = len(sigmas.split(",")) if sigmas else 2
    two_label = f"two steps (σ {sigmas})" if sigmas else "two steps"
    return [
        (f"{stage.key}_onestep", f"{stage.label}, one step", 1, stage.mode, ["--sampler=onestep"]),
        (f"{stage.key}_twostep", f"{stage.label}, {two_label}", n_two, stage.mode, two),
    ]
