"""The recipe table: one row per training mode of the consistency loop.

A row (`Recipe`) says everything the loop and ``cm_train.py`` need to know
about a mode, so neither ever compares a mode name:

- ``loss(diffusion, nets, x_start, level, model_kwargs, options)``: the loss
  terms of a micro-batch, a dict with per-sample "loss" and "sigmas" (the noise
  level t each sample is logged under) and optionally "r" (the second level of
  a pair, which the loop logs as t_mean / r_over_t / r_zero). The adapters here
  call the `KarrasDenoiser` methods, which draw the noise levels and call the
  pure losses of `cm.losses`; ``nets`` are the networks, each wrapped once by
  the loop (precision, DDP); ``options`` the loss flags (``huber_c``,
  ``ect_q``, ``p_mean``, ``p_std``, ...);
- ``schedule(args)``: step ↦ (target EMA μ, level), the level being N or
  ECT's stage (``level_name`` is what the loop logs it as);
- the networks: ``teacher`` ("required": the loss calls it; "optional": it
  only gives the initial weights; "unused"), ``target`` ("ema": its own
  network θ⁻ ← μθ⁻ + (1−μ)θ; "online": the student itself under no_grad;
  "none"), ``init_from`` ("required" / "optional" / "unused");
  ``frozen_bf16_teacher`` (store the teacher's weights in bf16 once under
  --precision bf16), ``teacher_follows_student`` (progdist: at a new level the
  student becomes the teacher, optimiser and EMAs restart);
- ``train_scalings`` / ``sample_scalings``: "edm" (c_skip, c_out of EDM) or
  "boundary" (the consistency models' boundary-condition scalings, f(x, σ_min)
  = x; the original's ``distillation=True``);
- ``presets(args)``: its paper's values for the flags the user did not give;
  ``flags``: the cm_train.py flags only it (or a few rows) uses: giving one to
  another mode is an error; ``loss_options``: the flags its loss reads;
- ``checkpoint_files``: the extra files of its checkpoint sets (besides model,
  EMAs, opt), written and resumed by the loop;
- ``two_step_ts`` / ``two_step_sigmas``: the two-step sampler of the
  in-training evaluation (`cm.train_eval`; one step is always the other):
  indices of the 40-point grid, or noise levels when given.

Adding a recipe: one pure loss in `cm.losses` (denoiser callables and tensors
in, per-sample values out), one adapter here (draw the noise levels, wrap the
networks with `denoiser`, call the loss) and one row in `RECIPES`; its own
flags, if any, in `cm.recipe_flags`.

Extension point for recipes with more trainable networks (e.g. DMD2's fake
score and discriminator with their own optimiser): ``extra_networks`` names
them; the loop takes them as ``CMTrainLoop(extra_networks={name: module})``, wraps each
once under the chosen precision into ``nets.extra`` for the loss (gradients
reach them through the same backward), saves and resumes each as checkpoint
kind ``name``, and calls the row's ``after_step(loop)`` after each taken step:
their optimiser steps there (tests/test_recipe_extension.py is a worked
example). Not there yet: DDP for them and checkpointing their optimiser state.

The schedules of iCT (Song & Dhariwal 2023, "Improved techniques for training
consistency models") and ECT (Geng et al. 2024, "Consistency models made
easy") are pure functions below; they train the same network with the same
loop as CD/CT, only the noise levels drawn per sample, the loss weights and
the distance differ.
"""

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .schedules import RHO, SIGMA_MAX, SIGMA_MIN, create_ema_and_scales_fn, karras_sigma

P_MEAN, P_STD = -1.1, 2.0  # log-normal of both recipes


# ----------------------------------------------------------------------------
# iCT


def ict_num_scales(step, total_steps, s0=10, s1=1280):
    """N(k) = min(s0·2^⌊k/K′⌋, s1) + 1 with K′ = ⌊K/(log2⌊s1/s0⌋ + 1)⌋ (iCT eq. 6).

    K′ is at least 1, so runs shorter than the number of doublings still work.
    """
    k_prime = max(1, math.floor(total_steps / (math.log2(s1 // s0) + 1)))
    return int(min(s0 * 2 ** (step // k_prime), s1) + 1)


def ict_sigmas(num_points, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
    """The ascending Karras grid σ_1 < ... < σ_N (float64 tensor)."""
    u = torch.linspace(1, 0, num_points, dtype=torch.float64)
    return karras_sigma(u, sigma_min, sigma_max, rho)


def ict_index_probs(sigmas, p_mean=P_MEAN, p_std=P_STD):
    """p(i) ∝ erf((ln σ_{i+1} − P_mean)/(√2 P_std)) − erf((ln σ_i − P_mean)/(√2 P_std)) (iCT §3.5).

    ``sigmas`` ascending; one probability per adjacent pair (i, i+1).
    """
    cdf = torch.erf((torch.log(sigmas.double()) - p_mean) / (math.sqrt(2) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


def ict_weights(sigmas):
    """λ(σ_i) = 1/(σ_{i+1} − σ_i) per adjacent pair of the ascending grid (iCT §3.4)."""
    return 1.0 / (sigmas[1:] - sigmas[:-1])


def pseudo_huber_c(dim):
    """iCT's pseudo-Huber constant c = 0.00054·√d for d = C·H·W values per sample."""
    return 0.00054 * math.sqrt(dim)


def ict_draw(
    num_points, n, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO, device="cpu", generator=None,
    p_mean=P_MEAN, p_std=P_STD,
):
    """(σ_i, σ_{i+1}, weight) for n samples: i from the discretised log-normal on the N-point grid."""
    sigmas = ict_sigmas(num_points, sigma_min, sigma_max, rho)
    i = torch.multinomial(ict_index_probs(sigmas, p_mean, p_std), n, replacement=True, generator=generator)
    weights = ict_weights(sigmas)[i]
    return tuple(v.float().to(device) for v in (sigmas[i], sigmas[i + 1], weights))


def ict_ema_and_scales_fn(total_steps, s0=10, s1=1280):
    """step ↦ (target EMA μ, N): iCT has no EMA target (μ = 0, θ⁻ = stopgrad θ)."""
    return lambda step: (0.0, ict_num_scales(step, total_steps, s0, s1))


# ----------------------------------------------------------------------------
# ECT


def ect_stage(step, double):
    """The stage ⌊step / double⌋ of ECT's halving of t − r."""
    return int(step // double)


ECT_MIN_SHRINK = 1e-6  # (t − r)/t never below this: float32 would round r to t and t − r to 0


def ect_r(t, stage, q=2.0, k=8.0, b=1.0):
    """r = max(0, t·(1 − (1 + k·σ(−b·t))/q^(stage+1))) (ECT, 'sigmoid' mapping); t a tensor.

    (t − r)/t is kept at least `ECT_MIN_SHRINK`, which only late stages of a
    large q (e.g. the 1-hour preset's 256 from stage 2 on) ever reach.
    """
    shrink = (1 + k * torch.sigmoid(-b * t)) * q ** -(stage + 1)
    return torch.clamp(t * (1 - shrink.clamp(min=ECT_MIN_SHRINK)), min=0.0)


def ect_draw_t(n, p_mean=P_MEAN, p_std=P_STD, device="cpu", generator=None):
    """t = exp(P_mean + P_std·n), n ~ N(0, 1), per sample."""
    return torch.exp(p_mean + p_std * torch.randn(n, generator=generator)).to(device)


def ect_ema_and_scales_fn(double):
    """step ↦ (target EMA μ, stage): ECT has no EMA target either (μ = 0)."""
    return lambda step: (0.0, ect_stage(step, double))



# ----------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Networks:
    """What a loss calls, each wrapped once by the loop (precision; DDP for the student)."""

    student: Callable
    target: Optional[Callable] = None  # θ⁻: the EMA target ("ema") or the unwrapped student ("online")
    teacher: Optional[Callable] = None
    teacher_diffusion: object = None  # the teacher's KarrasDenoiser (EDM scalings)
    extra: dict = field(default_factory=dict)  # a row's extra_networks by name


def denoiser(diffusion, net, model_kwargs):
    """``net`` as the pure losses take it: (x, σ) ↦ D(x, σ) with ``diffusion``'s scalings.

    What a new row's adapter passes to its loss in `cm.losses` after drawing
    the noise levels itself (the rows below leave both to `KarrasDenoiser`'s
    methods, the original's API).
    """
    return lambda x, t: diffusion.denoise(net, x, t, **model_kwargs)[1]


def _consistency_distillation(diffusion, nets, x_start, num_scales, model_kwargs, options):
    return diffusion.consistency_losses(
        nets.student, x_start, num_scales, model_kwargs=model_kwargs, target_model=nets.target,
        teacher_model=nets.teacher, teacher_diffusion=nets.teacher_diffusion,
    )


def _consistency_training(diffusion, nets, x_start, num_scales, model_kwargs, options):
    # a teacher, when given, only supplied the initial weights
    return diffusion.consistency_losses(
        nets.student, x_start, num_scales, model_kwargs=model_kwargs, target_model=nets.target
    )


def _progdist(diffusion, nets, x_start, num_scales, model_kwargs, options):
    return diffusion.progdist_losses(
        nets.student, x_start, num_scales, model_kwargs=model_kwargs,
        teacher_model=nets.teacher, teacher_diffusion=nets.teacher_diffusion,
    )


def _ict(diffusion, nets, x_start, num_scales, model_kwargs, options):
    return diffusion.ict_losses(
        nets.student, x_start, num_scales, model_kwargs=model_kwargs, target_model=nets.target,
        huber_c=options.get("huber_c"), p_mean=options.get("p_mean", P_MEAN), p_std=options.get("p_std", P_STD),
    )


def _ect(diffusion, nets, x_start, stage, model_kwargs, options):
    return diffusion.ect_losses(
        nets.student, x_start, stage, model_kwargs=model_kwargs, target_model=nets.target,
        q=options.get("ect_q", 2.0), huber_c=options.get("huber_c") or 0.0,
        p_mean=options.get("p_mean", P_MEAN), p_std=options.get("p_std", P_STD),
    )


def _original_schedule(args):
    """The original's create_ema_and_scales_fn from its flags."""
    return create_ema_and_scales_fn(
        target_ema_mode=args.target_ema_mode,
        start_ema=args.start_ema,
        scale_mode=args.scale_mode,
        start_scales=args.start_scales,
        end_scales=args.end_scales,
        total_steps=args.total_training_steps,
        distill_steps_per_iter=args.distill_steps_per_iter,
    )


def _ict_schedule(args):
    return ict_ema_and_scales_fn(args.total_training_steps, args.start_scales, args.end_scales)


def _ect_schedule(args):
    return ect_ema_and_scales_fn(args.ect_double)


def _no_presets(args):
    return {}


def _ect_presets(args):
    # ECT's CIFAR-10 run (Geng et al. 2024): 12.8 Mimg at batch 128, RAdam 1e-4, dropout 0.2, no augmentation
    return dict(
        lr=1e-4, global_batch_size=128, dropout=0.2, ema_rate="0.9999", total_training_steps=100000, random_flip=False
    )


def _ict_presets(args):
    # iCT's CIFAR-10 run (Song & Dhariwal 2023): 400k steps at batch 1024, dropout 0.3, EMA 0.99993, s0 10, s1 1280
    return dict(
        lr=1e-4, global_batch_size=1024, dropout=0.3, ema_rate="0.99993", total_training_steps=400000,
        start_scales=10, end_scales=1280, random_flip=False, huber_c=pseudo_huber_c(3 * args.image_size**2),
    )


SCALINGS = ("edm", "boundary")


@dataclass(frozen=True)
class Recipe:
    """One training mode of `cm.train_util.CMTrainLoop` (see the module docstring)."""

    name: str
    loss: Callable
    schedule: Callable
    teacher: str  # "required" | "optional" | "unused"
    target: str  # "ema" | "online" | "none"
    init_from: str = "unused"  # "required" | "optional" | "unused"
    train_scalings: str = "boundary"
    sample_scalings: str = "boundary"
    presets: Callable = _no_presets
    flags: tuple = ()
    loss_options: tuple = ()
    level_name: str = "num_scales"
    frozen_bf16_teacher: bool = False
    teacher_follows_student: bool = False
    checkpoint_files: tuple = ()
    uses_loss_norm: bool = True  # the loss measures with --loss_norm (lpips loads up front)
    extra_networks: tuple = ()
    after_step: Optional[Callable] = None  # hook(loop) after each taken step (e.g. extra optimisers)
    # build_extra_networks(args, teacher, make_network(dropout), batch_size) -> {name: module} (cm_train.py)
    build_extra_networks: Optional[Callable] = None
    new_optimizer: Optional[Callable] = None  # (params, lr, weight_decay) -> the student's optimiser; None: RAdam
    lr_factor: Optional[Callable] = None  # (step, loss options) -> factor on --lr (a warm-up); None: 1
    grad_clip_option: str = ""  # the loss option holding the student's max gradient norm; "": no clipping
    flag_defaults: dict = field(default_factory=dict)  # cm_train.py flags the row adds, with their defaults
    flag_help: dict = field(default_factory=dict)
    flag_checks: dict = field(default_factory=dict)  # flag -> (test, what it must be)
    check_args: Optional[Callable] = None  # (args) -> raises a one-line ValueError
    # two-step sampling of the in-training evaluation (cm.train_eval) and of the grids: indices of the
    # 40-point grid (the original's CD command), or noise levels (ECT's mid_t 0.821, used for iCT too)
    two_step_ts: tuple = (0, 22, 39)
    two_step_sigmas: tuple = ()

    @property
    def needs_teacher(self):
        return self.teacher == "required"


_ORIGINAL_FLAGS = ("target_ema_mode", "start_ema", "scale_mode", "distill_steps_per_iter")
_ORIGINAL_ROW = dict(flags=_ORIGINAL_FLAGS, schedule=_original_schedule)
_LATER_ROW = dict(target="online", teacher="unused", uses_loss_norm=False, two_step_ts=(), two_step_sigmas=(80.0, 0.821))

def _dmd2_schedule(args):
    return lambda step: (0.0, step)  # no target; the level is the step (it seeds the per-sample draws)


def _dmd2_row():
    from . import dmd2_train as d

    flags = ("init_from",) + tuple(d.FLAG_DEFAULTS)
    return Recipe(
        "dmd2", d.dmd2_loss, _dmd2_schedule, teacher="required", target="none", init_from="required",
        train_scalings="boundary", sample_scalings="boundary", presets=d.presets, flags=flags,
        loss_options=tuple(d.FLAG_DEFAULTS), level_name="generator_step", frozen_bf16_teacher=True,
        uses_loss_norm=False, extra_networks=("dmd2_critic",), after_step=d.dmd2_after_step,
        build_extra_networks=d.build_critic, new_optimizer=d.new_optimizer, lr_factor=d.lr_factor,
        grad_clip_option="max_grad_norm", flag_defaults=dict(d.FLAG_DEFAULTS), flag_help=dict(d.FLAG_HELP),
        flag_checks=dict(d.FLAG_CHECKS), check_args=d.check_args, two_step_ts=(), two_step_sigmas=(80.0, 0.821),
    )


RECIPES = {
    r.name: r
    for r in (
        Recipe(
            "consistency_distillation", _consistency_distillation, teacher="required", target="ema",
            frozen_bf16_teacher=True, checkpoint_files=("target_model",), **_ORIGINAL_ROW,
        ),
        Recipe(
            "consistency_training", _consistency_training, teacher="optional", target="ema",
            checkpoint_files=("target_model",), **_ORIGINAL_ROW,
        ),
        Recipe(
            "progdist", _progdist, teacher="required", target="none", train_scalings="edm", sample_scalings="edm",
            teacher_follows_student=True, checkpoint_files=("teacher_model",), **_ORIGINAL_ROW,
        ),
        Recipe(
            "ect", _ect, _ect_schedule, init_from="required", presets=_ect_presets, level_name="stage",
            flags=("init_from", "ect_double", "ect_q", "huber_c", "p_mean", "p_std"),
            loss_options=("huber_c", "ect_q", "p_mean", "p_std"), **_LATER_ROW,
        ),
        Recipe(
            "ict", _ict, _ict_schedule, init_from="optional", presets=_ict_presets,
            flags=("init_from", "huber_c", "p_mean", "p_std"), loss_options=("huber_c", "p_mean", "p_std"),
            **_LATER_ROW,
        ),
        _dmd2_row(),
    )
}
CM_TRAINING_MODES = tuple(RECIPES)  # what cm_train.py / CMTrainLoop train
# models that sample with the boundary-condition scalings ("is a consistency model"); edm, progdist: EDM's
CONSISTENCY_MODES = tuple(m for m, r in RECIPES.items() if r.sample_scalings == "boundary")


def get_recipe(training_mode):
    """The row of ``training_mode``; a one-line ValueError for a mode the consistency loop does not train."""
    if training_mode not in RECIPES:
        raise ValueError(
            f"--training_mode {training_mode} is not trained by cm_train.py; "
            f"use one of {', '.join(CM_TRAINING_MODES)} (EDM: edm_train.py)"
        )
    return RECIPES[training_mode]


def samples_with_boundary_scalings(training_mode):
    """True for the consistency models (the table's boundary rows); edm and progdist use EDM's scalings."""
    return training_mode in CONSISTENCY_MODES


def modes_using_flag(flag):
    """The training modes whose row lists ``flag``."""
    return tuple(m for m, r in RECIPES.items() if flag in r.flags)

