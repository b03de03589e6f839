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

from cm import dist_util
from cm.cli import OneLineArgumentParser, UsageError, run_cli
from cm.formats.model_files import adopt_network_flags, load_network_weights
from cm.precision import add_speed_flags, prepare_from_args, resolve_speed_args
from cm.recipe_flags import (
    RECIPE_FLAG_HELP,
    apply_recipe_preset,
    check_recipe_args,
    explicit_flags,
    load_init_weights,
    recipe_flag_defaults,
    without_augment_map,
)
from cm.recipes import get_recipe
from cm.run_metadata import keep_resumed_flags
from cm.script_util import (
    add_dict_to_argparser,
    cm_train_defaults,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    model_and_diffusion_kwargs,
    train_defaults,
)
from cm.train_eval import EVAL_HELP, build_evaluator, eval_flag_defaults
from cm.train_script import loop_kwargs, setup_run, start_run
from cm.train_util import CMTrainLoop, parse_ema_rates

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


def check_same_data(teacher_file, init_file):
    """A teacher and an --init_from file that describe themselves must agree on image size and classes."""
    if not teacher_file or not init_file:
        return
    for key in ("image_size", "class_cond", "num_classes"):
        a, b = teacher_file[1].get(key), init_file[1].get(key)
        if a is not None and b is not None and a != b:
            raise UsageError(f"--init_from holds {key}={b} but --teacher_model_path holds {key}={a}")


def main(argv=None):
    parser = create_argparser()
    args = parser.parse_args(argv)
    row = get_recipe(args.training_mode)  # every mode-dependent choice below reads this row
    explicit = explicit_flags(parser, argv)
    preset = apply_recipe_preset(args, explicit)
    check_recipe_args(args, explicit)
    log_dir_flag = os.path.expanduser(args.logging_dir or os.environ.get("OPENAI_LOGDIR", "")) or None
    kept_note = keep_resumed_flags(args, explicit, log_dir_flag)  # a resumed run keeps its σ_min
    resolve_speed_args(args)
    if args.schedule_sampler != "uniform":
        raise ValueError(
            f"--schedule_sampler {args.schedule_sampler} is not used by cm_train.py: the consistency losses draw "
            "their own noise levels (the original ignored it); leave it at uniform"
        )
    # an EDM .pkl teacher fixes the architecture flags (teacher and student share it)
    teacher_file = adopt_network_flags(args, "teacher_model_path", model_and_diffusion_defaults())
    if teacher_file and teacher_file[1].get("training_mode", "edm") != "edm":  # JAX files do not say
        raise UsageError(f"--teacher_model_path {args.teacher_model_path} is a consistency model, not an EDM teacher")
    # ... and so does an --init_from file
    init_file = None
    if row.init_from != "unused" and args.init_from != "none":
        init_file = adopt_network_flags(args, "init_from", model_and_diffusion_defaults())
    check_same_data(teacher_file, init_file)
    augment_note = without_augment_map(args)
    ema_scale_fn = row.schedule(args)

    # Build and check everything before anything is written to the logging dir.
    log_dir, batch_size, batch_note = setup_run(args)
    # the row's scalings: sampling's (boundary condition for consistency models), and training's where they
    # differ (ECT trains with EDM's, as its ECMPrecond in train mode)
    model_kwargs = model_and_diffusion_kwargs(args, distillation=row.sample_scalings == "boundary")
    model_kwargs["train_scalings"] = row.train_scalings
    model, diffusion = create_model_and_diffusion(**model_kwargs)
    load_init_weights(model, args.init_from, init_file)
    model.to(dist_util.dev())
    if row.prepare_student is not None:  # e.g. sCM's log-variance head and its forward-mode AD check
        row.prepare_student(args, model)
    eval_net = copy.deepcopy(model)  # the evaluator samples its own copy, loaded with the EMA weights
    if args.loss_norm == "lpips" and row.uses_loss_norm:
        diffusion.lpips_loss  # load the LPIPS weights now: fail before training, not at step 1

    teacher_model = teacher_diffusion = None
    if args.teacher_model_path:
        teacher_kwargs = dict(model_kwargs, dropout=args.teacher_dropout, distillation=False, train_scalings=None)
        teacher_model, teacher_diffusion = create_model_and_diffusion(**teacher_kwargs)
        load_network_weights(teacher_model, args.teacher_model_path, teacher_file, "teacher_model_path")
        teacher_model.to(dist_util.dev())

    target_model = None
    if row.target == "ema":
        target_model, _ = create_model_and_diffusion(**model_kwargs)
        target_model.to(dist_util.dev())

    for net in (model, teacher_model, target_model, eval_net):
        if net is not None:
            prepare_from_args(net, args, dist_util.dev().type)

    extra_networks = None
    if row.build_extra_networks is not None:  # e.g. dmd2's fake score and GAN head
        def make_network(dropout):
            return create_model_and_diffusion(**dict(model_kwargs, dropout=dropout, distillation=False))[0]

        extra_networks = row.build_extra_networks(args, teacher_model, make_network, batch_size)

    evaluator = build_evaluator(args, eval_net, diffusion, row, parse_ema_rates(args.ema_rate), device=dist_util.dev())
    loop = CMTrainLoop(
        evaluator=evaluator,
        target_model=target_model,
        teacher_model=teacher_model,
        teacher_diffusion=teacher_diffusion,
        training_mode=args.training_mode,
        ema_scale_fn=ema_scale_fn,
        loss_options={flag: getattr(args, flag) for flag in row.loss_options},
        adam_betas=(0.9, args.adam_beta2),
        extra_networks=extra_networks,
        **loop_kwargs(args, model=model, diffusion=diffusion, batch_size=batch_size, log_dir=log_dir),
    )
    preset_note = preset and f"{args.training_mode} preset: " + ", ".join(f"{k}={getattr(args, k)}" for k in preset)
    jvp_note = "jvp" in row.flags and "tangent J by " + (
        "forward-mode AD (torch.func.jvp)" if args.jvp == "ad" else "central finite differences (--jvp fd)"
    )
    return start_run(loop, args, log_dir, [batch_note, preset_note, augment_note, kept_note, jvp_note], args.training_mode)

if __name__ == "__main__":
    sys.exit(run_cli(main))
