"""Find the middle index t of the consistency schedule ts = 0,t,steps-1 (or --begin,t,--end) with the lowest FID.

  python scripts/ternary_search.py --model_path cd_cifar10.pt --training_mode consistency_distillation \\
      --image_size 32 --class_cond True ... --steps 40 --num_samples 50000 --batch_size 500 \\
      --ref cifar10_train_stats.npz --inception_path pt_inception-2015-12-05-6726825d.pth

Integer ternary search over t in [--search_min, --search_max] (default [0, steps-1]),
each t evaluated once (same seed for every t). Results go to ternary_search.json
and progress.csv in the logging dir. Runs under mpiexec/torchrun like image_sample.py.
"""

import json
import sys

from cm import dist_util, logger
from cm.cli import UsageError, run_cli
from cm.fileio import write_atomic
from cm.formats.model_files import SAMPLING_FLAGS, adopt_network_flags
from cm.precision import resolve_speed_args, wrap
from cm.samplers import CHURN_DEFAULTS
from cm.sample_util import (
    check_common_args,
    create_argparser,
    load_model_and_diffusion,
    sample_flag_defaults,
)
from cm.ternary import load_fid_reference, multistep_fid, ternary_search

UNUSED_SAMPLE_FLAGS = ("sampler", "ts", *CHURN_DEFAULTS)

SEARCH_HELP = {
    "ref": "FID reference: stats .npz (mu, sigma), image .npz (arr_0) or folder of images (required)",
    "inception_path": "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (empty: $CM_INCEPTION_PATH)",
    "fid_batch_size": "images per Inception forward pass",
    "search_min": "smallest middle index t to try",
    "search_max": "largest middle index t to try (-1: steps-1)",
    "begin": "the original's flag: comma list of the schedule indices before t (empty: 0); t starts at its last",
    "end": "the original's flag: comma list of the schedule indices after t (empty: steps-1); t ends at its first",
    "ref_batch": "the original's name for --ref",
}


def search_defaults():
    """image_sample.py's flags minus the sampler choice, plus the FID and range flags."""
    defaults = {k: v for k, v in sample_flag_defaults().items() if k not in UNUSED_SAMPLE_FLAGS}
    defaults["training_mode"] = "consistency_distillation"
    defaults.update(ref="", inception_path="", fid_batch_size=100, search_min=0, search_max=-1)
    defaults.update(begin="", end="", ref_batch="")
    return defaults


def index_list(flag, text, steps):
    """Strictly increasing schedule indices in [0, steps-1] from a comma list."""
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--{flag} must be a comma list of integers, got {text!r}") from None
    if any(not 0 <= v <= steps - 1 for v in values) or any(a >= b for a, b in zip(values, values[1:])):
        raise UsageError(f"--{flag} must be increasing indices in [0, steps-1 = {steps - 1}], got {text!r}")
    return values


def schedule_ends(args):
    """(begin, end, lo, hi): ts = begin + (t,) + end for t in [lo, hi] (the original's --begin/--end)."""
    if args.ref_batch:
        if args.ref and args.ref != args.ref_batch:
            raise UsageError("--ref and --ref_batch (its old name) name different files; give one")
        args.ref = args.ref_batch
    begin = index_list("begin", args.begin or "0", args.steps)
    end = index_list("end", args.end or str(args.steps - 1), args.steps)
    if not (args.begin or args.end):
        return begin, end, None, None
    if (args.search_min, args.search_max) != (0, -1):
        raise UsageError("--begin/--end and --search_min/--search_max both set the range of t; give one pair")
    if begin[-1] > end[0]:
        raise UsageError(f"--begin's last index {begin[-1]} is after --end's first {end[0]}")
    return begin, end, begin[-1], end[0]


def check_search_args(args):
    """Validate; returns (class labels or None, lo, hi, begin, end)."""
    class_labels = check_common_args(args)
    begin, end, lo, hi = schedule_ends(args)
    if not args.ref:
        raise UsageError("--ref is required: reference statistics, images .npz or image folder for FID")
    if args.num_samples < 2:
        raise UsageError(f"--num_samples must be at least 2 for FID, got {args.num_samples}")
    if args.fid_batch_size < 1:
        raise UsageError(f"--fid_batch_size must be positive, got {args.fid_batch_size}")
    if lo is None:
        lo, hi = args.search_min, args.steps - 1 if args.search_max == -1 else args.search_max
    if not 0 <= lo <= hi <= args.steps - 1:
        raise UsageError(
            f"--search_min/--search_max must satisfy 0 <= min <= max <= steps-1 = {args.steps - 1}, got [{lo}, {hi}]"
        )
    return class_labels, lo, hi, begin, end


def main(argv=None):
    parser = create_argparser(search_defaults(), description=__doc__.splitlines()[0], help=SEARCH_HELP)
    args = parser.parse_args(argv)
    # a self-describing file (EDM .pkl, JAX/Flax checkpoint) sets the network flags; a contradicting flag is an error
    network = adopt_network_flags(args, "model_path", search_defaults(), SAMPLING_FLAGS)
    class_labels, lo, hi, begin, end = check_search_args(args)
    resolve_speed_args(args)

    dist_util.setup_dist()
    device = dist_util.dev()
    model, diffusion, prefix = load_model_and_diffusion(args, device, state_dict=network and network[0].state_dict())
    inception, ref = load_fid_reference(args.inception_path, args.ref, args.fid_batch_size, device)
    logger.configure(dir=args.logging_dir or None)
    logger.save_args(args)
    if prefix:
        logger.log(f"checkpoint keys carry the wrapper prefix {prefix!r}; stripped it")

    head, tail = ",".join(map(str, begin)), ",".join(map(str, end))
    net = wrap(model, args.precision, frozen=True)  # once: every FID evaluation samples the same network

    def fid_at(t):
        fid = multistep_fid(
            net,
            diffusion,
            t,
            inception,
            ref,
            args.steps,
            fid_batch_size=args.fid_batch_size,
            device=device,
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            image_size=args.image_size,
            generator=args.generator,
            seed=args.seed,
            class_cond=args.class_cond,
            class_labels=class_labels,
            clip_denoised=args.clip_denoised,
            sigma_min=args.sigma_min,
            sigma_max=args.sigma_max,
            begin=begin,
            end=end,
        )
        logger.log(f"ts={head},{t},{tail}: FID {fid:.4f}")
        logger.logkv("t", t)
        logger.logkv("fid", fid)
        logger.dumpkvs()
        return fid

    logger.log(f"ternary search of t in [{lo}, {hi}] for ts={head},t,{tail} ({args.num_samples} samples per FID)")
    best, best_fid, evaluations = ternary_search(fid_at, lo, hi)
    logger.log(f"best: ts={head},{best},{tail} with FID {best_fid:.4f} after {len(evaluations)} evaluations")
    if dist_util.get_rank() == 0:
        result = {
            "best_t": best,
            "best_ts": f"{head},{best},{tail}",
            "best_fid": best_fid,
            "steps": args.steps,
            "num_samples": args.num_samples,
            "search_range": [lo, hi],
            "evaluations": [{"t": t, "fid": fid} for t, fid in evaluations.items()],
        }
        path = f"{logger.get_dir()}/ternary_search.json"
        write_atomic(path, lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
        logger.log(f"results written to {path}")
    dist_util.barrier()


if __name__ == "__main__":
    sys.exit(run_cli(main))
