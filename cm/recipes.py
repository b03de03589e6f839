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
  "unwrapped": the bare student module, no DDP and no autocast, for a
  forward-mode (JVP) pass; "none"), ``init_from`` ("required" / "optional" /
  "unused"); ``time_inputs`` (1, or 2 for a network of u(x, t, r));
  ``frozen_bf16_teacher`` (store the teacher's weights in bf16 once under
  --precision bf16), ``teacher_follows_student`` (progdist: at a new level the
  student becomes the teacher, optimiser and EMAs restart);
- ``train_scalings`` / ``sample_scalings``: "edm" (c_skip, c_out of EDM) or
  "boundary" (the consistency models' boundary-condition scalings, f(x, σ_min)
  = x; the original's ``distillation=True``) or "none" (the raw output is the
  quantity: MeanFlow's u, sampled by a flow sampler); ``sigma_min`` (where a new run's
  boundary condition sits, stored in its metadata for the sampler),
  ``fewstep`` (what ``--sigmas`` samples: "cm", CM's Alg. 1, or "ect", ECT's
  generator) and ``quantize`` (the uint8 of its samples: "truncate", the
  original's, or "round", EDM's and ECT's);
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

from .meanflow import (
    MEANFLOW_FLAG_CHECKS,
    MEANFLOW_FLAG_DEFAULTS,
    MEANFLOW_FLAG_HELP,
    MEANFLOW_PRESETS,
    meanflow_optimizer,
    meanflow_schedule,
    meanflow_step_loss,
)
from .precond import SCALINGS  # noqa: F401  ("edm", "boundary", "none": the row's scalings names)
from .schedules import RHO, SIGMA_MAX, SIGMA_MIN, create_ema_and_scales_fn, karras_sigma

P_MEAN, P_STD = -1.1, 2.0  # log-normal of both recipes


ECT_SIGMA_MIN = 0.003  # ECT's ECMPrecond default: its networks' boundary condition sits there


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
    # θ⁻: the EMA target ("ema"), the student without DDP ("online"), or the bare student module ("unwrapped")
    target: Optional[Callable] = None
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


def _meanflow(diffusion, nets, x_start, warmup, model_kwargs, options):
    # du/dt by a JVP pass on the bare module (no DDP, no autocast), then u with gradients (cm.meanflow)
    return meanflow_step_loss(nets.student, nets.target, x_start, warmup, model_kwargs, options)


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


def _meanflow_schedule(args):
    return meanflow_schedule(args.tangent_warmup_steps)


def _meanflow_presets(args):
    return dict(MEANFLOW_PRESETS)


def _no_presets(args):
    return {}


def _ect_presets(args):
    # ECT's CIFAR-10 run (Geng et al. 2024, its run_ecm.sh): 25.6 Mimg = 200k steps at batch 128, RAdam 1e-4,
    # dropout 0.2, no augmentation; its networks' boundary condition at σ_min 0.003 (ECMPrecond's default)
    return dict(
        lr=1e-4, global_batch_size=128, dropout=0.2, ema_rate="0.9999", total_training_steps=200000, random_flip=False,
        sigma_min=ECT_SIGMA_MIN,
    )


def _ict_presets(args):
    # iCT's CIFAR-10 run (Song & Dhariwal 2023): 400k steps at batch 1024, dropout 0.3, EMA 0.99993, s0 10, s1 1280
    return dict(
        lr=1e-4, global_batch_size=1024, dropout=0.3, ema_rate="0.99993", total_training_steps=400000,
        start_scales=10, end_scales=1280, random_flip=False, huber_c=pseudo_huber_c(3 * args.image_size**2),
    )


# ----------------------------------------------------------------------------
# sCM (Lu & Song 2024): sCT and sCD, continuous-time, in TrigFlow (cm.scm, cm.trigflow)

SCM_EMA_RATE = f"{0.5 ** (512 / 500_000):.8f}"  # EMA half-life 0.5 Mimg at the preset batch 512


def _scm_settings(options):
    from .scm import ScmSettings, ScmVariant

    variant = ScmVariant(
        bool(options.get("g_norm_spatial_invariance")), bool(options.get("divide_x_0_spatial_dim")),
        bool(options.get("prior_weighting")),
    )
    return ScmSettings(
        sigma_max=options["scm_sigma_max"], warmup_steps=options["tangent_warmup_steps"], jvp=options["jvp"],
        variant=variant, p_mean=options["p_mean"], p_std=options["p_std"],
    )


def _scm(diffusion, nets, x_start, r, model_kwargs, options):
    """sCT (no teacher) or sCD: ``r`` is the tangent warm-up factor of this step (the row's level)."""
    from .scm import scm_training_losses

    return scm_training_losses(
        nets.student, nets.target, x_start, r, _scm_settings(options), teacher=nets.teacher,
        model_kwargs=model_kwargs,
    )


def _scm_schedule(args):
    """step ↦ (0, r): no EMA target (F⁻ = stopgrad F), r = min(1, step/--tangent_warmup_steps)."""
    from .scm import tangent_warmup

    return lambda step: (0.0, tangent_warmup(step, args.tangent_warmup_steps))


def _scm_prepare_student(args, model):
    """The sCM student: the log-variance head (kept when --init_from has one), and forward-mode AD checked."""
    from .nn import attach_logvar_head, has_logvar_head
    from .scm import probe_forward_ad

    if not has_logvar_head(model):
        attach_logvar_head(model)
    if args.jvp == "ad":
        kwargs = {"y": torch.zeros(1, dtype=torch.long)} if args.class_cond else {}
        device = next(model.parameters()).device
        probe_forward_ad(model, args.image_size, device, {k: v.to(device) for k, v in kwargs.items()})


def _sct_presets(args):
    # sCM's CIFAR-10 settings (Lu & Song 2024, Table 3; FastGen's config_sct_cifar10): RAdam 1e-4,
    # betas (0.9, 0.99), batch 512, EMA half-life 0.5 Mimg, dropout 0.2, σ up to 800, ln σ ~ N(−1.0, 1.4²)
    return dict(
        lr=1e-4, adam_beta2=0.99, global_batch_size=512, ema_rate=SCM_EMA_RATE, dropout=0.2, scm_sigma_max=800.0,
        p_mean=-1.0, p_std=1.4, random_flip=False,
    )


def _scd_presets(args):
    # as sCT, with dropout 0 and σ up to EDM's 80 (FastGen's config_scd_cifar10)
    return dict(_sct_presets(args), dropout=0.0, scm_sigma_max=80.0)




@dataclass(frozen=True)
class Recipe:
    """One training mode of `cm.train_util.CMTrainLoop` (see the module docstring)."""

    name: str
    loss: Callable
    schedule: Callable
    teacher: str  # "required" | "optional" | "unused"
    target: str  # "ema" | "online" | "unwrapped" (the bare module: forward-mode passes) | "none"
    init_from: str = "unused"  # "required" | "optional" | "unused"
    train_scalings: str = "boundary"
    sample_scalings: str = "boundary"
    sigma_min: float = SIGMA_MIN  # where a new run's (and a file-less sampler's) boundary condition sits
    fewstep: str = "cm"  # what --sigmas sample: "cm" (CM's Alg. 1) or "ect" (no clamp between, x + σ·z)
    quantize: str = "truncate"  # uint8 of its samples: "truncate" (the original's) or "round" (EDM's/ECT's FID)
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
    time_inputs: int = 1  # the network's time inputs (--time_inputs): 2 for MeanFlow's u(x, t, r)
    prepare_student: Optional[Callable] = None  # hook(args, model) in cm_train.py after --init_from, before writing
    monitors: tuple = ()  # per-sample keys of the loss's dict the loop logs (their means) beside the loss
    consistency_function: Optional[bool] = None  # samples in one step / edits; None: iff boundary scalings

    @property
    def is_consistency_function(self):
        if self.consistency_function is not None:
            return self.consistency_function
        return self.sample_scalings == "boundary"
    # two-step sampling of the in-training evaluation (cm.train_eval) and of the grids: indices of the
    # 40-point grid (the original's CD command), or noise levels (ECT's mid_t 0.821, used for iCT too)
    two_step_ts: tuple = (0, 22, 39)
    two_step_sigmas: tuple = ()
    flow_times: tuple = ()  # a flow model's (one-step, two-step) times of --sampler meanflow

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
        # ECT's ECMPrecond trains with EDM's scalings and samples with the boundary condition at σ_min 0.003;
        # its few-step generator clamps nothing and re-noises with x + σ·z; its FID pipeline rounds
        Recipe(
            "ect", _ect, _ect_schedule, init_from="required", presets=_ect_presets, level_name="stage",
            train_scalings="edm", sample_scalings="boundary", sigma_min=ECT_SIGMA_MIN, fewstep="ect",
            quantize="round",
            flags=("init_from", "ect_double", "ect_q", "huber_c", "p_mean", "p_std"),
            loss_options=("huber_c", "ect_q", "p_mean", "p_std"), **_LATER_ROW,
        ),
        Recipe(
            "ict", _ict, _ict_schedule, init_from="optional", presets=_ict_presets,
            flags=("init_from", "huber_c", "p_mean", "p_std"), loss_options=("huber_c", "p_mean", "p_std"),
            **_LATER_ROW,
        ),
        Recipe(
            "meanflow", _meanflow, _meanflow_schedule, teacher="unused", target="unwrapped", init_from="optional",
            train_scalings="none", sample_scalings="none", presets=_meanflow_presets,
            flags=("init_from", "mf_times", "tangent_warmup_steps", "jvp"), loss_options=("mf_times", "jvp"),
            level_name="tangent_warmup", uses_loss_norm=False, time_inputs=2, new_optimizer=meanflow_optimizer,
            flag_defaults=dict(MEANFLOW_FLAG_DEFAULTS), flag_help=dict(MEANFLOW_FLAG_HELP),
            flag_checks=dict(MEANFLOW_FLAG_CHECKS), monitors=("v_loss", "adaptive_weight", "du_dt_norm"),
            flow_times=((0.999, 0.0), (0.999, 0.5, 0.0)),
        ),
        _dmd2_row(),
    )
}
_SCM_FLAGS = (
    "tangent_warmup_steps", "scm_sigma_max", "jvp", "g_norm_spatial_invariance", "divide_x_0_spatial_dim",
    "prior_weighting", "p_mean", "p_std", "adam_beta2",
)
_SCM_FLAG_DEFAULTS = dict(  # --tangent_warmup_steps and --jvp (shared with meanflow): cm.recipe_flags
    scm_sigma_max=800.0, g_norm_spatial_invariance=False, divide_x_0_spatial_dim=False, prior_weighting=False,
    adam_beta2=0.999,
)
_SCM_FLAG_HELP = {
    "scm_sigma_max": "sct/scd: the training σ's log-normal is truncated to [0.002, this] (presets: sCT 800, sCD 80)",
    "g_norm_spatial_invariance": "sct/scd (FastGen's default, not the paper's): normalise g by ‖g‖/√D + 0.1",
    "divide_x_0_spatial_dim": "sct/scd (FastGen's default, not the paper's): divide the loss by D once more",
    "prior_weighting": "sct/scd (FastGen's default, not the paper's): weight the loss by 1/σ",
    "adam_beta2": "sct/scd: RAdam's β2 (sCM: 0.99; the other modes keep torch's 0.999)",
}
_SCM_FLAG_CHECKS = {
    "scm_sigma_max": (lambda v: v > 0.002, "must be larger than σ_min 0.002"),
    "adam_beta2": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
}
_SCM_ROW = dict(
    flag_defaults=_SCM_FLAG_DEFAULTS, flag_help=_SCM_FLAG_HELP, flag_checks=_SCM_FLAG_CHECKS,
    loss=_scm, schedule=_scm_schedule, target="unwrapped", train_scalings="edm", sample_scalings="edm",
    level_name="tangent_warmup", uses_loss_norm=False, loss_options=_SCM_FLAGS[:-1],
    prepare_student=_scm_prepare_student, monitors=("loss_unweighted", "g_norm", "logvar", "jvp_norm"),
    consistency_function=True,  # an EDM-scaled denoiser that is a consistency function
    two_step_ts=(), two_step_sigmas=(80.0, 0.982),  # sCM's two-step t_mid 1.1: σ = 0.5·tan 1.1
)
RECIPES["sct"] = Recipe(
    "sct", teacher="unused", init_from="required", presets=_sct_presets, flags=("init_from",) + _SCM_FLAGS,
    **_SCM_ROW,
)
RECIPES["scd"] = Recipe(
    "scd", teacher="required", frozen_bf16_teacher=True, presets=_scd_presets, flags=_SCM_FLAGS, **_SCM_ROW,
)
CM_TRAINING_MODES = tuple(RECIPES)  # what cm_train.py / CMTrainLoop train
# models that sample with the boundary-condition scalings ("is a consistency model"); edm, progdist: EDM's
CONSISTENCY_MODES = tuple(m for m, r in RECIPES.items() if r.sample_scalings == "boundary")
# models whose raw output is sampled by a flow sampler (cm.samplers.FLOW_SAMPLERS): MeanFlow
FLOW_MODES = tuple(m for m, r in RECIPES.items() if r.sample_scalings == "none")
# models that are consistency functions (one-step sampling, zero-shot editing): those and sCT/sCD
CONSISTENCY_FUNCTION_MODES = tuple(m for m, r in RECIPES.items() if r.is_consistency_function)


def get_recipe(training_mode):
    """The row of ``training_mode``; a one-line ValueError for a mode the consistency loop does not train."""
    if training_mode not in RECIPES:
        raise ValueError(
            f"--training_mode {training_mode} is not trained by cm_train.py; "
            f"use one of {', '.join(CM_TRAINING_MODES)} (EDM: edm_train.py)"
        )
    return RECIPES[training_mode]


# edm_train.py's models (not a row: the consistency loop does not train them)
EDM_SAMPLING = dict(train_scalings="edm", sample_scalings="edm", sigma_min=SIGMA_MIN, fewstep="cm", quantize="truncate")


def precond_row(training_mode):
    """How a model of ``training_mode`` is called: its row's scalings, σ_min, few-step sampler and uint8
    conversion as a dict ("edm": EDM's scalings and the original's sampling)."""
    if training_mode == "edm":
        return dict(EDM_SAMPLING)
    r = get_recipe(training_mode)
    keys = ("train_scalings", "sample_scalings", "sigma_min", "fewstep", "quantize")
    return {k: getattr(r, k) for k in keys}


def samples_with_boundary_scalings(training_mode):
    """True for the consistency models (the table's boundary rows); edm and progdist use EDM's scalings."""
    return training_mode in CONSISTENCY_MODES


def modes_using_flag(flag):
    """The training modes whose row lists ``flag``."""
    return tuple(m for m, r in RECIPES.items() if flag in r.flags)

