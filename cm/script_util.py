"""Flag defaults, model/denoiser factories and argparse helpers shared by the scripts."""

import argparse

from .fp16_util import resolve_use_fp16
from .karras_diffusion import KarrasDenoiser
from .losses import LOSS_NORMS
from .precond import WEIGHT_SCHEDULES
from .random_util import GENERATORS
from .recipes import CM_TRAINING_MODES
from .resample import SCHEDULE_SAMPLERS
from .samplers import CHURN_DEFAULTS, FLOW_SAMPLERS, SAMPLERS
from .schedules import create_ema_and_scales_fn  # noqa: F401  (public path of the original)
from .song_unet import song_unet_from_flags
from .unet import UNetModel

NUM_CLASSES = 10

# channel multipliers per level when --channel_mult is empty
CHANNEL_MULTS = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 1),
}

ARCHS = ("adm", "ddpmpp", "ncsnpp")

TRAINING_MODES = ("edm",) + CM_TRAINING_MODES  # --training_mode choices: EDM, then the recipe table's rows


def model_and_diffusion_defaults():
    """Network and denoiser flags shared by every script."""
    return dict(
        sigma_min=0.002,
        sigma_max=80.0,
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="32,16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
        learn_sigma=False,
        weight_schedule="karras",
        arch="adm",
        augment_dim=0,
        label_dropout=0.0,
        time_inputs=1,
    )


def train_defaults():
    """Flags of both training scripts."""
    return dict(
        data_dir="",
        schedule_sampler="uniform",
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,
        global_batch_size=2048,
        batch_size=-1,
        microbatch=-1,
        ema_rate="0.9999",
        log_interval=10,
        save_interval=10000,
        resume_checkpoint="",
        fp16_scale_growth=1e-3,
        logging_dir="",
        max_bad_steps=20,
        skip_bad_images=False,
        dist_timeout=300.0,
    )


def cm_train_defaults():
    """Flags of consistency distillation/training and progressive distillation."""
    return dict(
        teacher_model_path="",
        teacher_dropout=0.1,
        training_mode="consistency_distillation",
        target_ema_mode="fixed",
        scale_mode="fixed",
        total_training_steps=600000,
        start_ema=0.0,
        start_scales=40,
        end_scales=40,
        distill_steps_per_iter=50000,
        loss_norm="lpips",
    )


def sample_defaults():
    """Flags of the sampling script."""
    return dict(
        training_mode="edm",
        generator="determ",
        clip_denoised=True,
        num_samples=10000,
        batch_size=16,
        sampler="heun",
        **CHURN_DEFAULTS,
        steps=40,
        model_path="",
        seed=42,
        ts="",
        logging_dir="",
    )


FLAG_HELP = {
    "sigma_min": "smallest noise level σ_min",
    "sigma_max": "largest noise level σ_max",
    "image_size": "image side in pixels",
    "num_channels": "base channel count of the UNet",
    "num_res_blocks": "residual blocks per resolution level",
    "num_heads": "attention heads (when num_head_channels is -1)",
    "num_heads_upsample": "attention heads in the decoder (-1: same as num_heads)",
    "num_head_channels": "channels per attention head (-1: use num_heads)",
    "attention_resolutions": "comma list of resolutions (in pixels) that get attention",
    "channel_mult": "comma list of channel multipliers per level (empty: by image size)",
    "dropout": "dropout probability in the residual blocks",
    "class_cond": "condition on class labels (10 classes)",
    "use_checkpoint": "activation checkpointing (less memory, more compute)",
    "use_scale_shift_norm": "FiLM-style scale/shift conditioning in residual blocks",
    "resblock_updown": "resample with residual blocks instead of conv/pool layers",
    "use_fp16": "float16 model with float32 master weights (CUDA only; float32 on CPU)",
    "use_new_attention_order": "accepted for compatibility; the qkv layout is fixed",
    "learn_sigma": "output 6 channels instead of 3 (unused by the Karras denoiser)",
    "weight_schedule": "loss weighting λ(σ): " + ", ".join(WEIGHT_SCHEDULES),
    "arch": "network: adm (the original UNet), ddpmpp or ncsnpp (EDM's SongUNet configurations)",
    "augment_dim": "ddpmpp/ncsnpp: size of the augmentation-label input map_augment (9 in EDM's CIFAR-10 models; 0: none)",
    "label_dropout": "ddpmpp/ncsnpp: probability of zeroing a sample's class label in training",
    "time_inputs": "time inputs of the network: 1 (t), or 2 (t and r, MeanFlow's average velocity u(x, t, r))",
    "data_dir": "folder of training images (jpg/jpeg/png/gif, class = file-name prefix before '_')",
    "schedule_sampler": "training noise-level sampler: " + ", ".join(SCHEDULE_SAMPLERS),
    "lr": "learning rate of the optimiser (RAdam; a recipe row may name another: meanflow uses Adam)",
    "weight_decay": "weight decay of RAdam",
    "lr_anneal_steps": "decay the learning rate linearly to 0 over this many steps (0: constant)",
    "global_batch_size": "batch size summed over all processes",
    "batch_size": "per-process batch size (-1: global_batch_size / number of processes)",
    "microbatch": "split each batch into micro-batches of this size (-1: off)",
    "ema_rate": "comma list of EMA rates of the saved averaged weights",
    "log_interval": "steps between logged averages",
    "save_interval": "steps between checkpoints",
    "resume_checkpoint": "modelNNNNNN.pt to resume from, or 'auto' for the latest in logging_dir",
    "fp16_scale_growth": "log2 growth of the dynamic loss scale per good fp16 step",
    "max_bad_steps": "stop after this many consecutive steps with a non-finite loss or gradient (each is skipped)",
    "skip_bad_images": "leave unreadable images out of the epoch with a warning instead of stopping",
    "dist_timeout": "seconds a collective waits for the other processes before the run stops",
    "logging_dir": "directory for logs, checkpoints and samples (empty: $OPENAI_LOGDIR, else a new temp folder)",
    "teacher_model_path": "EDM teacher checkpoint (distillation; empty for consistency training)",
    "teacher_dropout": "dropout of the teacher network",
    "training_mode": "one of " + ", ".join(TRAINING_MODES),
    "target_ema_mode": "target network EMA: fixed or adaptive",
    "scale_mode": "discretisation steps N: fixed, progressive or progdist",
    "total_training_steps": "number of optimiser steps to run",
    "start_ema": "target EMA rate μ (adaptive: at the start)",
    "start_scales": "discretisation steps N at the start",
    "end_scales": "discretisation steps N at the end (progressive)",
    "distill_steps_per_iter": "steps per halving of N (progdist)",
    "loss_norm": "distance of the consistency loss: " + ", ".join(LOSS_NORMS),
    "generator": "noise generator: " + ", ".join(GENERATORS),
    "clip_denoised": "clamp denoised images to [-1, 1] while sampling",
    "num_samples": "number of samples to draw",
    "sampler": "sampler: " + ", ".join(SAMPLERS) + " (EDM/consistency models), " + ", ".join(FLOW_SAMPLERS)
    + " (--training_mode meanflow)",
    "s_churn": "stochasticity S_churn of heun/dpm",
    "s_tmin": "smallest σ that gets churn",
    "s_tmax": "largest σ that gets churn",
    "s_noise": "noise scale S_noise of the churn",
    "steps": "number of noise levels of the schedule",
    "model_path": "checkpoint to sample from",
    "seed": "seed of the noise and label generator",
    "ts": "comma list of schedule indices for the multistep sampler, e.g. 0,22,39",
}

CHOICES = {
    "arch": ARCHS,
    "time_inputs": (1, 2),
    "weight_schedule": WEIGHT_SCHEDULES,
    "schedule_sampler": SCHEDULE_SAMPLERS,
    "training_mode": TRAINING_MODES,
    "target_ema_mode": ("fixed", "adaptive"),
    "scale_mode": ("fixed", "progressive", "progdist"),
    "loss_norm": LOSS_NORMS,
    "generator": GENERATORS,
    "sampler": tuple(SAMPLERS) + tuple(FLOW_SAMPLERS),
}


def channel_mult_for(image_size, channel_mult=""):
    """Channel multipliers: parsed from the comma list, else the default for the size."""
    if channel_mult:
        try:
            return tuple(float(m) if "." in m else int(m) for m in channel_mult.split(","))
        except ValueError:
            raise ValueError(f"--channel_mult must be a comma list of numbers, got {channel_mult!r}") from None
    if image_size not in CHANNEL_MULTS:
        raise ValueError(
            f"no default channel_mult for image_size {image_size}; "
            f"use one of {sorted(CHANNEL_MULTS)} or pass --channel_mult"
        )
    return CHANNEL_MULTS[image_size]


def create_model_and_diffusion(
    image_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    channel_mult,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    use_new_attention_order,
    weight_schedule,
    sigma_min=0.002,
    sigma_max=80.0,
    distillation=False,
    loss_norm="lpips",
    lpips_path=None,
    arch="adm",
    augment_dim=0,
    label_dropout=0.0,
    time_inputs=1,
    train_scalings=None,
):
    """Build the network and its `KarrasDenoiser`. `loss_norm` reaches the denoiser.

    ``distillation`` (the original's keyword): use the boundary-condition
    scalings, as every consistency model does (the table's ``"boundary"`` rows);
    ``train_scalings``: "edm"/"boundary" for the training losses when they differ
    from sampling's (ECT), None: the same.
    """
    model = create_model(
        image_size,
        num_channels,
        num_res_blocks,
        channel_mult=channel_mult,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        use_new_attention_order=use_new_attention_order,
        arch=arch,
        augment_dim=augment_dim,
        label_dropout=label_dropout,
        time_inputs=time_inputs,
    )
    diffusion = KarrasDenoiser(
        sigma_data=0.5,
        sigma_max=sigma_max,
        sigma_min=sigma_min,
        distillation=distillation,
        weight_schedule=weight_schedule,
        loss_norm=loss_norm,
        lpips_path=lpips_path,
        train_scalings=train_scalings,
    )
    return model, diffusion


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    arch="adm",
    augment_dim=0,
    label_dropout=0.0,
    time_inputs=1,
):
    """Build the UNet (``arch`` adm) or EDM's SongUNet (ddpmpp/ncsnpp) from flag values.

    float16 only when CUDA is present.
    """
    mult = channel_mult_for(image_size, channel_mult)
    try:
        attention_res = [int(res) for res in attention_resolutions.split(",") if res]
    except ValueError:
        raise ValueError(
            f"--attention_resolutions must be a comma list of integers, got {attention_resolutions!r}"
        ) from None
    attention_ds = [image_size // res for res in attention_res]
    use_fp16 = resolve_use_fp16(use_fp16)
    if arch != "adm":
        if learn_sigma:
            raise ValueError(f"--learn_sigma True needs --arch adm, got --arch {arch}")
        return song_unet_from_flags(
            arch, image_size, num_channels, mult, num_res_blocks, attention_res, dropout=dropout,
            class_cond=class_cond, augment_dim=augment_dim, label_dropout=label_dropout,
            use_fp16=use_fp16, num_classes=NUM_CLASSES, time_inputs=time_inputs,
        )
    if augment_dim or label_dropout:
        raise ValueError("--augment_dim and --label_dropout need --arch ddpmpp or ncsnpp")
    model = UNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=6 if learn_sigma else 3,
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(attention_ds),
        dropout=dropout,
        channel_mult=mult,
        num_classes=NUM_CLASSES if class_cond else None,
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        time_inputs=time_inputs,
    )
    return model


def model_and_diffusion_kwargs(args, distillation=False):
    """Keyword arguments of `create_model_and_diffusion` from parsed flags.

    Passes ``loss_norm`` (and ``lpips_path``) through when the parser has them,
    which the original forgot to do.
    """
    kwargs = args_to_dict(args, model_and_diffusion_defaults().keys())
    kwargs["distillation"] = distillation
    if hasattr(args, "loss_norm"):
        kwargs["loss_norm"] = args.loss_norm
    if getattr(args, "lpips_path", ""):
        kwargs["lpips_path"] = args.lpips_path
    return kwargs


def add_dict_to_argparser(parser, default_dict, help=None):
    """Add ``--key`` for every entry, typed by its default, with help and choices."""
    help = {**FLAG_HELP, **(help or {})}
    for k, v in default_dict.items():
        v_type = type(v)
        if v is None:
            v_type = str
        elif isinstance(v, bool):
            v_type = str2bool
        text = help.get(k, k.replace("_", " "))
        kwargs = dict(default=v, type=v_type, help=f"{text} (default: %(default)s)")
        if k in CHOICES:
            kwargs["choices"] = CHOICES[k]
        parser.add_argument(f"--{k}", **kwargs)


def args_to_dict(args, keys):
    return {k: getattr(args, k) for k in keys}


def str2bool(v):
    """Parse yes/true/t/y/1 and no/false/f/n/0 (any case); anything else is an argparse error."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")
