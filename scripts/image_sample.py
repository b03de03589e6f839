"""Draw samples from a checkpoint into samples_{N}x{H}x{W}x3.npz (+ a PNG grid) in the logging dir.

  python scripts/image_sample.py --model_path edm_cifar10.pt --sampler heun --steps 18 \\
      --image_size 32 --class_cond True --num_samples 50000 --batch_size 500
  mpiexec -n 8 python scripts/image_sample.py --training_mode consistency_distillation \\
      --sampler multistep --ts 0,22,39 --model_path cd_cifar10.pt ...
  python scripts/image_sample.py --training_mode ect --sampler multistep --sigmas 80,0.821 ...
  python scripts/image_sample.py --training_mode meanflow --sampler meanflow --time_inputs 2 \
      --flow_times 0.999,0 --arch ddpmpp --model_path mf_cifar10.pt ...

The same command gives the same .npz for any --batch_size and number of
processes (see cm/sample_util.py).
"""

import sys

from cm import dist_util, logger
from cm.cli import run_cli
from cm.formats.model_files import SAMPLING_FLAGS, adopt_network_flags
from cm.precision import resolve_speed_args, wrap
from cm.samplers import churn_kwargs
from cm.sample_util import (
    check_flow_args,
    check_sample_args,
    create_argparser,
    load_model_and_diffusion,
    parse_sigmas,
    resolve_sampling,
    sample_flag_defaults,
    sample_images,
    save_samples,
)


def main(argv=None):
    defaults = dict(sample_flag_defaults(), sigmas="", quantize="", flow_times="0.999,0")
    args = create_argparser(defaults, description=__doc__.splitlines()[0]).parse_args(argv)
    # a self-describing file (EDM .pkl) sets the network flags; a contradicting flag is an error
    network = adopt_network_flags(args, "model_path", sample_flag_defaults(), SAMPLING_FLAGS)
    # the model's row: σ_min (the run's own when not given), few-step sampler, uint8 conversion
    fewstep, notes = resolve_sampling(args, network)
    ts, class_labels = check_sample_args(args)
    flow_times = check_flow_args(args)
    sigmas = parse_sigmas(args.sigmas, args.sampler, args.sigma_min, args.sigma_max)
    resolve_speed_args(args)

    dist_util.setup_dist()
    # Everything that can fail on user input happens before the logging dir is created.
    model, diffusion, prefix = load_model_and_diffusion(args, state_dict=network and network[0].state_dict())
    logger.configure(dir=args.logging_dir or None)
    logger.save_args(args)
    if prefix:
        logger.log(f"checkpoint keys carry the wrapper prefix {prefix!r}; stripped it")

    for note in notes:
        logger.log(note)
    logger.log(f"sampling {args.num_samples} images with {args.sampler} ({args.training_mode} scalings, "
               f"sigma_min {args.sigma_min}{', ECT few-step' if fewstep == 'ect' and sigmas else ''}, "
               f"uint8 by {args.quantize})...")
    images, labels = sample_images(
        wrap(model, args.precision, frozen=True),
        diffusion,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        image_size=args.image_size,
        steps=args.steps,
        sampler=args.sampler,
        ts=ts,
        sigmas=sigmas,
        generator=args.generator,
        seed=args.seed,
        class_cond=args.class_cond,
        class_labels=class_labels,
        clip_denoised=args.clip_denoised,
        sigma_min=args.sigma_min,
        sigma_max=args.sigma_max,
        **churn_kwargs(args),
        flow_times=flow_times,
        fewstep=fewstep,
        quantize=args.quantize,
    )
    if dist_util.get_rank() == 0:
        npz_path, png_path = save_samples(logger.get_dir(), images, labels)
        logger.log(f"saved {len(images)} samples to {npz_path} (grid: {png_path})")
    dist_util.barrier()
    logger.log("sampling complete")


if __name__ == "__main__":
    sys.exit(run_cli(main))
