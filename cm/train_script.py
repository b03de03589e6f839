"""What edm_train.py and cm_train.py share: set-up, the data, the loop's keywords, the start.

Both scripts build and check everything before anything is written to the
logging directory; `start_run` is the first thing that writes.
"""

import os

import torch

from . import dist_util, logger, step_data
from .cli import UsageError, on_all_ranks


def per_rank_batch_size(global_batch_size, batch_size, world_size):
    """(per-process batch size, warning text or None); batch_size -1 splits the global one."""
    if batch_size > 0:
        return batch_size, None
    if batch_size != -1:
        raise ValueError(f"--batch_size must be positive or -1, got {batch_size}")
    per_rank = global_batch_size // world_size
    if per_rank < 1:
        # every rank has it: a UsageError, printed once
        raise UsageError(f"--global_batch_size {global_batch_size} is smaller than the {world_size} processes")
    note = None
    if global_batch_size % world_size:
        note = (
            f"WARNING: global_batch_size {global_batch_size} is not divisible by {world_size} processes; "
            f"using {per_rank} per process ({per_rank * world_size} in all)"
        )
    return per_rank, note


def setup_run(args):
    """(logging dir or None, per-process batch size, batch note or None); sets up the processes and the seed."""
    log_dir = os.path.expanduser(args.logging_dir or os.environ.get("OPENAI_LOGDIR", "")) or None
    dist_util.setup_dist(timeout=args.dist_timeout)
    world = dist_util.get_world_size()
    batch_size, batch_note = per_rank_batch_size(args.global_batch_size, args.batch_size, world)
    torch.manual_seed(args.seed)
    return log_dir, batch_size, batch_note


def training_data(args, batch_size):
    """This rank's `StepBatches` of --data_dir; each rank checks its own shard, all agree on a failure."""
    return on_all_ranks(
        lambda: step_data.load_training_data(
            data_dir=args.data_dir,
            batch_size=batch_size,
            image_size=args.image_size,
            class_cond=args.class_cond,
            seed=args.seed,
            skip_bad_images=args.skip_bad_images,
            random_flip=args.random_flip,
        )
    )


def loop_kwargs(args, *, model, diffusion, batch_size, log_dir):
    """The keywords of `TrainLoop` (and of `CMTrainLoop`, which adds its own) from the shared flags."""
    return dict(
        model=model,
        diffusion=diffusion,
        data=training_data(args, batch_size),
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
        total_training_steps=args.total_training_steps,
        logging_dir=log_dir,
        seed=args.seed,
        precision=args.precision,
        max_bad_steps=args.max_bad_steps,
        run_flags=vars(args),
    )


def start_run(loop, args, log_dir, notes, what):
    """Configure the logger, save args.json, log ``notes`` and the start line, train; returns the loop."""
    logger.configure(dir=log_dir)
    logger.save_args({**vars(args), "logging_dir": logger.get_dir()})
    for note in notes:
        if note:
            logger.log(note)
    logger.log(f"{what}: {dist_util.get_world_size()} process(es) x batch {loop.batch_size}, from step {loop.step}")
    loop.run_loop()
    return loop
