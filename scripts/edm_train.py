"""Train an EDM diffusion model on a folder of images (the teacher of consistency distillation).

Launch plainly, with `mpiexec -n K`, or with `torchrun --nproc_per_node K`.
Checkpoints, log.txt, progress.csv and args.json go to --logging_dir.
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
from cm.precision import add_speed_flags, prepare_from_args, resolve_speed_args
from cm.resample import create_named_schedule_sampler
from cm.script_util import (
    add_dict_to_argparser,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    model_and_diffusion_kwargs,
    train_defaults,
)
from cm.train_eval import EVAL_HELP, build_evaluator, eval_flag_defaults
from cm.train_script import loop_kwargs, setup_run, start_run
from cm.train_util import TrainLoop, parse_ema_rates

HELP = {
    "schedule_sampler": "training noise levels: lognormal (ln σ ~ N(-1.2, 1.2²)) or loss-second-moment "
    "(importance sampling over the 40-point Karras grid); uniform is refused",
    "total_training_steps": "stop after this many steps (0: no limit besides --lr_anneal_steps)",
    "random_flip": "flip training images left-right with probability 1/2 (the original's load_data default)",
    "seed": "seed of the initial weights and of the per-(rank, step) noise, dropout and data order; "
    "makes a resumed run continue exactly",
}


def create_argparser():
    defaults = dict(model_and_diffusion_defaults())
    defaults.update(train_defaults())
    defaults.update(schedule_sampler="lognormal", total_training_steps=0, seed=0, random_flip=True)
    defaults.update(eval_flag_defaults())
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    add_dict_to_argparser(parser, defaults, help={**HELP, **EVAL_HELP})
    add_speed_flags(parser)
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    resolve_speed_args(args)
    if args.time_inputs != 1:
        raise UsageError("--time_inputs 2 is for two-time networks: cm_train.py --training_mode meanflow")
    if args.schedule_sampler == "uniform":
        raise ValueError(
            "--schedule_sampler uniform draws grid indices, which the original fed to the EDM loss as if they "
            "were noise levels σ; use lognormal (the default) or loss-second-moment"
        )
    # Build and check everything before anything is written to the logging dir.
    log_dir, batch_size, batch_note = setup_run(args)
    model, diffusion = create_model_and_diffusion(**model_and_diffusion_kwargs(args))
    model.to(dist_util.dev())
    eval_net = copy.deepcopy(model)  # the evaluator samples its own copy, loaded with the EMA weights
    for net in (model, eval_net):
        prepare_from_args(net, args, dist_util.dev().type)
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)
    evaluator = build_evaluator(args, eval_net, diffusion, None, parse_ema_rates(args.ema_rate), device=dist_util.dev())
    loop = TrainLoop(
        evaluator=evaluator,
        schedule_sampler=schedule_sampler,
        **loop_kwargs(args, model=model, diffusion=diffusion, batch_size=batch_size, log_dir=log_dir),
    )
    return start_run(loop, args, log_dir, [batch_note], "training")


if __name__ == "__main__":
    sys.exit(run_cli(main))
