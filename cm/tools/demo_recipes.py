"""The demo's recipe rows: one `RecipeStage` per later recipe trained with ``cm_train.py``.

Each stage is a row of `RECIPE_STAGES`: its training mode, where its weights
start (the EDM teacher's EMA, the distilled CD model, or random), its own
cm_train.py flags, its network passes per training image, and the samplers of
its table rows (one step, and two steps through ``two_step`` flags).
`cm.tools.demo` trains every stage with the same budget rule and samples and
judges each row the same way, so a new recipe joins the demo as one row here
and nothing else.

The budget rule: equal training compute, counted, not equal wall time (which
depends on the machine's load). A step's compute is counted in forward-pass
equivalents per training image: every network forward pass counts 1 (with or
without gradients, student, target or teacher alike) and every backward pass
counts 2 (`BACKWARD_PASSES`: it computes gradients with respect to both the
activations and the weights, about twice a forward pass's FLOPs). CD's stage
spends `CD_PASSES_PER_IMAGE` = 6 per image (student forward + backward 3,
target forward 1, the teacher's Heun step 2) × ``cd_batch_size`` ×
``cd_steps``; a recipe runs that budget divided by its own passes per image
× ``recipe_batch_size`` steps (`budget_steps`), whatever the machine. The
wall times are recorded beside, as information.
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
    passes_per_image: object  # forward-pass equivalents per training image per step, or cfg -> that (see above)
    flags: Callable  # cfg -> the stage's own cm_train.py flags (lr, recipe flags)
    dropout: Callable = lambda cfg: 0.0  # cfg -> --dropout
    one_step: Callable = lambda cfg: ["--sampler=onestep"]
    teacher: bool = False  # also pass the EDM teacher's EMA file as --teacher_model_path (DMD2's real score)
    two_step: Callable = lambda cfg: ["--sampler=multistep", f"--sigmas={cfg.two_step_sigmas}"]
    network: Callable = lambda cfg: []  # cfg -> network flags beyond model_flags, for training and sampling
    start_flag: str = "init_from"  # the cm_train.py flag its start file goes to (sCD: its teacher)

    def __post_init__(self):
        if self.start not in STARTS:
            raise ValueError(f"stage {self.key}: start must be one of {STARTS}, got {self.start!r}")


BACKWARD_PASSES = 2  # a backward pass counts as two forward passes


def passes(forward, backward):
    """Forward-pass equivalents of ``forward`` forward and ``backward`` backward passes."""
    return forward + BACKWARD_PASSES * backward


# CD: student (forward + backward), target (forward), teacher (a Heun step: two forwards)
CD_PASSES_PER_IMAGE = passes(forward=4, backward=1)


def cd_budget(cfg):
    """Forward-pass equivalents of the CD stage: what every recipe stage gets."""
    return CD_PASSES_PER_IMAGE * cfg.cd_batch_size * cfg.cd_steps


def budget_steps(stage, cfg):
    """Steps of ``stage`` at CD's compute (rounded; at least 1), or ``cfg.recipe_steps`` when that is set."""
    if cfg.recipe_steps > 0:
        return cfg.recipe_steps
    per_image = stage.passes_per_image(cfg) if callable(stage.passes_per_image) else stage.passes_per_image
    return max(1, round(cd_budget(cfg) / (per_image * cfg.recipe_batch_size)))


ECT = RecipeStage(
    key="ect",
    mode="ect",
    label="ECT",
    start="teacher",
    passes_per_image=passes(forward=2, backward=1),  # D(x_t, t) forward + backward, the no-grad r-call
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
    passes_per_image=passes(forward=2, backward=1),  # student forward + backward, the no-grad target call
    flags=lambda cfg: [f"--lr={cfg.ict_lr}"],
)

# sCM (Lu & Song 2024): sCT tuned from the teacher, sCD distilled from it (the student starts as the teacher)
SCM_TWO_STEP = lambda cfg: ["--sampler=multistep", f"--sigmas={cfg.scm_two_step_sigmas}"]  # noqa: E731

SCT = RecipeStage(
    key="sct",
    mode="sct",
    label="sCT",
    start="teacher",
    passes_per_image=passes(forward=3, backward=1),  # training pass forward + backward, the JVP (two forwards)
    flags=lambda cfg: [f"--lr={cfg.scm_lr}", f"--tangent_warmup_steps={cfg.scm_warmup_steps}"],
    dropout=lambda cfg: cfg.sct_dropout,
    two_step=SCM_TWO_STEP,
)

SCD = RecipeStage(
    key="scd",
    mode="scd",
    label="sCD",
    start="teacher",
    start_flag="teacher_model_path",
    passes_per_image=passes(forward=4, backward=1),  # as sCT, and the teacher's forward for dx/dt
    flags=lambda cfg: [f"--lr={cfg.scm_lr}", f"--tangent_warmup_steps={cfg.scm_warmup_steps}"],
    two_step=SCM_TWO_STEP,
)

MEANFLOW = RecipeStage(
    key="mf",
    mode="meanflow",
    label="MeanFlow",
    start="none",
    passes_per_image=passes(forward=3, backward=1),  # the JVP pass for du/dt (two forwards), u forward + backward
    flags=lambda cfg: [f"--lr={cfg.mf_lr}"],
    one_step=lambda cfg: ["--sampler=meanflow", "--flow_times=0.999,0"],
    two_step=lambda cfg: ["--sampler=meanflow", "--flow_times=0.999,0.5,0"],
    # the demo's ADM network (the row's preset would pick DDPM++), with the second time input r
    network=lambda cfg: ["--arch=adm", "--time_inputs=2"],
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


def dmd2_passes(ratio, gan):
    """DMD2's passes per image of one loop step: one generator update and ``ratio`` critic updates.

    Generator turn: G forward + backward, real and fake score forwards (no grad); with the GAN
    (bottleneck head) the fake score also runs on noised x_g with a backward to x_g. Each critic
    update: the fake score's denoising loss, forward + backward (the GAN adds real and generated
    images through the fake score, forward + backward each); updates after the first draw a fresh
    one-step batch (one G forward, no grad).
    """
    generator_turn = passes(forward=3, backward=1) + (passes(forward=1, backward=1) if gan else 0)
    critic_update = passes(forward=1, backward=1) + (passes(forward=2, backward=2) if gan else 0)
    return generator_turn + ratio * critic_update + (ratio - 1) * passes(forward=1, backward=0)


# DMD2 tunes the distilled CD model, the EDM teacher as the real score (with and without the GAN head)
DMD2 = RecipeStage(
    key="dmd2",
    mode="dmd2",
    label="CD + DMD2",
    start="student",
    passes_per_image=lambda cfg: dmd2_passes(cfg.dmd2_ratio, gan=False),
    flags=_dmd2_flags(gan=False),
    teacher=True,
)

DMD2_GAN = RecipeStage(
    key="dmd2_gan",
    mode="dmd2",
    label="CD + DMD2 + GAN",
    start="student",
    passes_per_image=lambda cfg: dmd2_passes(cfg.dmd2_ratio, gan=True),
    flags=_dmd2_flags(gan=True),
    teacher=True,
)

RECIPE_STAGES = (ECT, ICT, DMD2, DMD2_GAN, SCT, SCD, MEANFLOW)


def stage_train_argv(stage, cfg, data_dir, log_dir, start_path, teacher_path=None):
    """cm_train.py flags of ``stage``; ``start_path`` is the file its weights start from (unused for 'none').

    ``teacher_path``: the EDM teacher's file, passed when the stage has ``teacher``.
    """
    steps = budget_steps(stage, cfg)  # also iCT's K of its N(k) doubling schedule
    init = ["--init_from=none"] if stage.start == "none" else [f"--{stage.start_flag}={start_path}"]
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
        *stage.network(cfg),
        *stage.flags(cfg),
    ]


def stage_samplers(stage, cfg):
    """The stage's table rows (name, label, NFE, training mode, sampler flags), in the shape of demo.samplers."""
    two = stage.two_step(cfg)
    sigmas = next((a.split("=", 1)[1] for a in two if a.startswith("--sigmas=")), None)
    times = next((a.split("=", 1)[1] for a in two if a.startswith("--flow_times=")), None)
    n_two = len(sigmas.split(",")) if sigmas else 2
    two_label = f"two steps (σ {sigmas})" if sigmas else f"two steps (t {times})" if times else "two steps"
    net = stage.network(cfg)
    return [
        (f"{stage.key}_onestep", f"{stage.label}, one step", 1, stage.mode, [*stage.one_step(cfg), *net]),
        (f"{stage.key}_twostep", f"{stage.label}, {two_label}", n_two, stage.mode, [*two, *net]),
    ]
