"""Zero-shot editing with a consistency model into {task}_{N}x{H}x{W}x3.npz (+ a PNG grid) in the logging dir.

  python scripts/image_edit.py --task inpaint --mask right --input digits/ --ts 0,20,39 \\
      --model_path cd_cifar10.pt --image_size 32 --class_cond True ...
  mpiexec -n 2 python scripts/image_edit.py --task superres --factor 2 --input samples_64x32x32x3.npz ...
  python scripts/image_edit.py --task interpolate --num_images 4 --num_points 8 --sigmas 80,1 ...

Tasks: inpaint, colorize, superres, stroke, denoise, interpolate (see cm/edit_util.py).
Result k is the same for any --batch_size and number of processes.
"""

import sys

from cm import dist_util, logger
from cm.cli import run_cli
from cm.edit_util import (
    build_plan,
    check_edit_args,
    create_edit_argparser,
    degraded_uint8,
    edit_flag_defaults,
    load_inputs,
    run_plan,
    save_edits,
    to_float,
)
from cm.formats.model_files import SAMPLING_FLAGS, adopt_network_flags
from cm.sample_util import load_model_and_diffusion, resolve_sampling


def main(argv=None):
    args = create_edit_argparser(description=__doc__.splitlines()[0]).parse_args(argv)
    # a self-describing file (ECT .pkl) sets the network flags; a contradicting flag is an error
    network = adopt_network_flags(args, "model_path", edit_flag_defaults(), SAMPLING_FLAGS)
    _, notes = resolve_sampling(args, network)  # σ_min: the run's own, else the mode's (ECT: 0.003)
    sigmas, class_labels = check_edit_args(args)

    dist_util.setup_dist()
    # Everything that can fail on user input happens before the logging dir is created.
    inputs, labels = None, None
    if args.task != "interpolate":
        inputs, labels = load_inputs(args.input, args.image_size, args.class_cond, args.num_images)
    plan = build_plan(args, sigmas, class_labels, None if inputs is None else to_float(inputs), labels)
    model, diffusion, prefix = load_model_and_diffusion(args, state_dict=network and network[0].state_dict())
    logger.configure(dir=args.logging_dir or None)
    logger.save_args(args)
    if prefix:
        logger.log(f"checkpoint keys carry the wrapper prefix {prefix!r}; stripped it")
    for note in notes:
        logger.log(note)

    def distiller(x, sigma, y):
        return diffusion.denoise(model, x, sigma, **({"y": y} if y is not None else {}))[1]

    logger.log(f"{args.task}: {plan.n} images, σ = {', '.join(f'{s:.4g}' for s in plan.sigmas)}")
    results = run_plan(
        distiller, plan, batch_size=args.batch_size, shape=(3, args.image_size, args.image_size),
        generator=args.generator, seed=args.seed, sigma_min=args.sigma_min,
    )  # fmt: skip
    if dist_util.get_rank() == 0:
        npz_path, png_path = save_edits(
            logger.get_dir(), args.task, results, None if plan.labels is None else plan.labels.numpy(),
            inputs, degraded_uint8(plan), plan.extra, row_length=args.num_points if args.task == "interpolate" else None,
        )  # fmt: skip
        logger.log(f"saved {len(results)} edited images to {npz_path} (grid: {png_path})")
    dist_util.barrier()
    logger.log("editing complete")


if __name__ == "__main__":
    sys.exit(run_cli(main))
