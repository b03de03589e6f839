"""Consistency distillation, consistency training or progressive distillation on a folder of images.

Distillation starts from an EDM checkpoint (--teacher_model_path); consistency
training needs no teacher. The later recipes: --training_mode ect tunes a
pretrained model (--init_from) into a consistency model, --training_mode ict
trains one from scratch; each applies its paper's CIFAR-10 settings to the
flags you do not give (cm/recipe_flags.py). Launch plainly, with
`mpiexec -n K`, or with `torchrun --nproc_per_node K`. Checkpoints, log.txt, progress.csv and
args.json go to --logging_dir.
"""

import copy
import os
import sys

try:
    import cm  # noqa: F401
except ImportError:  # a checkout that is not pip-installed: use the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from cm import dist_util, logger
from cm.cli import OneLineArgumentParser, UsageError, on_all_ranks, run_cli
from cm.formats.model_files import adopt_network_flags, load_network_weights
from cm.precision import add_speed_flags, prepare_from_args, resolve_speed_args
from cm.recipe_flags import (
    RECIPE_FLAG_HELP,
    RECIPE_MODES,
    apply_recipe_preset,
    check_recipe_args,
    explicit_flags,
    load_init_weights,
    recipe_flag_defaults,
)
from cm.recipes import recipe_ema_and_scales_fn
from cm.script_util import (
    add_dict_to_argparser,
    cm_train_defaults,
    create_ema_and_scales_fn,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    model_and_diffusion_kwargs,
    train_defaults,
)
from cm.train_eval import EVAL_HELP, build_evaluator, eval_flag_defaults
from cm.train_util import (
    CM_TRAINING_MODES,
    CMTrainLoop,
    load_training_data,
    parse_ema_rates,
    per_rank_batch_size,
)

HELP = {
    "schedule_sampler": "only uniform: the consistency losses draw their own noise levels (the original "
    "accepted and ignored other samplers); kept so the original's commands run",
    "lpips_path": "LPIPS weights file for --loss_norm lpips (empty: $CM_LPIPS_PATH)",
    "random_flip": "flip training images left-right with probability 1/2 (the original's load_data default)",
    "seed": "seed of the initial weights and of the per-(rank, step) noise, dropout and data order; "
    "makes a resumed run continue exactly",
}


def create_argparser():
    defaults = dict(model_and_diffusion_defaults())
    defaults.update(train_defaults())
    defaults.update(cm_train_defaults())
    defaults.update(lpips_path="", seed=0, random_flip=True)
    defaults.update(recipe_flag_defaults())
    defaults.update(eval_flag_defaults())
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    add_dict_to_argparser(parser, defaults, help={**HELP, **RECIPE_FLAG_HELP, **EVAL_HELP})
    add_speed_flags(parser)
    return parser


def main(argv=None):
    parser = create_argparser()
    args = parser.parse_args(argv)
    preset = apply_recipe_preset(args, explicit_flags(parser, argv))
    check_recipe_args(args)
    resolve_speed_args(args)
    if args.training_mode not in CM_TRAINING_MODES:
        raise ValueError(
            f"--training_mode {args.training_mode} is not trained by cm_train.py; "
            f"use one of {', '.join(CM_TRAINING_MODES)} (EDM: edm_train.py)"
        )
    if args.schedule_sampler != "uniform":
        raise ValueError(
            f"--schedule_sampler {args.schedule_sampler} is not used by cm_train.py: the consistency losses draw "
            "their own noise levels (the original ignored it); leave it at uniform"
        )
    if args.training_mode in ("consistency_distillation", "progdist") and not args.teacher_model_path:
        raise ValueError(f"--training_mode {args.training_mode} needs --teacher_model_path (an EDM checkpoint)")
    # an EDM .pkl teacher fixes the architecture flags (teacher and student share it)
    teacher_file = adopt_network_flags(args, "teacher_model_path", model_and_diffusion_defaults())
    if teacher_file and teacher_file[1].get("training_mode", "edm") != "edm":  # JAX files do not say
        raise UsageError(f"--teacher_model_path {args.teacher_model_path} is a consistency model, not an EDM teacher")
    # ... and so does an --init_from file of ect/ict
    init_file = None
    if args.training_mode in RECIPE_MODES and args.init_from != "none":
        init_file = adopt_network_flags(args, "init_from", model_and_diffusion_defaults())
    if args.training_mode in RECIPE_MODES:
        ema_scale_fn = recipe_ema_and_scales_fn(
            args.training_mode, args.total_training_steps, args.start_scales, args.end_scales, args.ect_double
        )
    else:
        ema_scale_fn = create_ema_and_scales_fn(
            target_ema_mode=args.target_ema_mode,
            start_ema=args.start_ema,
            scale_mode=args.scale_mode,
            start_scales=args.start_scales,
            end_scales=args.end_scales,
            total_steps=args.total_training_steps,
            distill_steps_per_iter=args.distill_steps_per_iter,
        )
    log_dir = os.path.expanduser(args.logging_dir or os.environ.get("OPENAI_LOGDIR", "")) or None

    # Build and check everything before anything is written to the logging dir.
    dist_util.setup_dist(timeout=args.dist_timeout)
    batch_size, batch_note = per_rank_batch_size(args.global_batch_size, args.batch_size, dist_util.get_world_size())
    torch.manual_seed(args.seed)
    # consistency models (ECT and iCT too) use the boundary-condition scalings; progdist students are EDM denoisers
    distillation = args.training_mode != "progdist"
    model_kwargs = model_and_diffusion_kwargs(args, distillation=distillation)
    model, diffusion = create_model_and_diffusion(**model_kwargs)
    load_init_weights(model, args.init_from, init_file)
    model.to(dist_util.dev())
    eval_net = copy.deepcopy(model)  # the evaluator samples its own copy, loaded with the EMA weights
    if args.loss_norm == "lpips" and args.training_mode not in RECIPE_MODES:
        diffusion.lpips_loss  # load the LPIPS weights now: fail before training, not at step 1

    teacher_model = teacher_diffusion = None
    if args.teacher_model_path:
        teacher_kwargs = dict(model_kwargs, dropout=args.teacher_dropout, distillation=False)
        teacher_model, teacher_diffusion = create_model_and_diffusion(**teacher_kwargs)
        load_network_weights(teacher_model, args.teacher_model_path, teacher_file, "teacher_model_path")
        teacher_model.to(dist_util.dev())

    target_model = None
    if args.training_mode in ("consistency_distillation", "consistency_training"):
        target_model, _ = create_model_and_diffusion(**model_kwargs)
        target_model.to(dist_util.dev())

    for net in (model, teacher_model, target_model, eval_net):
        if net is not None:
            prepare_from_args(net, args, dist_util.dev().type)

    # each rank checks its own shard: agree on failure before the next collective
    data = on_all_ranks(
        lambda: load_training_data(
            data_dir=args.data_dir,
            batch_size=batch_size,
            image_size=args.image_size,
            class_cond=args.class_cond,
            seed=args.seed,
            skip_bad_images=args.skip_bad_images,
            random_flip=args.random_flip,
        )
    )
    evaluator = build_evaluator(
        args, eval_net, diffusion, args.training_mode, parse_ema_rates(args.ema_rate), device=dist_util.dev()
    )
    loop = CMTrainLoop(
        evaluator=evaluator,
        model=model,
        target_model=target_model,
        teacher_model=teacher_model,
        teacher_diffusion=teacher_diffusion,
        training_mode=args.training_mode,
        ema_scale_fn=ema_scale_fn,
        total_training_steps=args.total_training_steps,
        diffusion=diffusion,
        data=data,
        batch_size=batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        ema_rate=args.ema_rate,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint,
        use_fp16=args.use_fp16,
        fp16_scale_growth=args.fp16_scale_growth,
        weight_decay=args.weight_decay,
        lr_anneal_steps=args.lr_anneal_steps,
        logging_dir=log_dir,
        seed=args.seed,
        precision=args.precision,
        max_bad_steps=args.max_bad_steps,
        run_flags=vars(args),
        huber_c=args.huber_c if args.training_mode in RECIPE_MODES else None,
        ect_q=args.ect_q,
        p_mean=args.p_mean,
        p_std=args.p_std,
    )

    logger.configure(dir=log_dir)
    logger.save_args({**vars(args), "logging_dir": logger.get_dir()})
    if batch_note:
        logger.log(batch_note)
    if preset:
        logger.log(f"{args.training_mode} preset: " + ", ".join(f"{k}={getattr(args, k)}" for k in preset))
    logger.log(
        f"{args.training_mode}: {dist_util.get_world_size()} process(es) x batch {batch_size}, from step {loop.step}"
    )
    loop.run_loop()
    return loop


if __name__ == "__main__":
    sys.exit(run_cli(main))
