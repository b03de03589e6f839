"""FID, Inception Score and precision/recall of a sample .npz against a reference.

  python scripts/fid.py --sample_npz samples_50000x32x32x3.npz --ref cifar10_train_stats.npz
  python scripts/fid.py --ref data/cifar10/train --save_stats cifar10_train_stats.npz

The Inception weights are pytorch-fid's pt_inception-2015-12-05-6726825d.pth
(--inception_path or $CM_INCEPTION_PATH).
"""

import argparse
import json
import os
import sys

import torch

from cm.cli import OneLineArgumentParser
from cm.formats.untrusted import UntrustedFileError, check_npz_file, open_regular
from cm.metrics.evaluation import (
    EvaluationError,
    evaluate,
    is_stats_file,
    npz_images_shape,
    reference_stats,
    save_stats,
)
from cm.metrics.inception import ENV_VAR, InceptionWeightsMismatch, InceptionWeightsNotFound, load_inception
from cm.script_util import str2bool


def create_parser():
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sample_npz", default="", help="samples to evaluate: .npz with arr_0 uint8 [N,H,W,3] (default: none)"
    )
    p.add_argument(
        "--ref",
        default="",
        help="reference: stats .npz (mu, sigma[, feats]), image .npz (arr_0) or folder of images (required)",
    )
    p.add_argument(
        "--inception_path", default="", help=f"pytorch-fid's Inception weights .pth (default: ${ENV_VAR})"
    )
    p.add_argument("--batch_size", type=int, default=100, help="images per Inception forward pass (default: 100)")
    p.add_argument("--device", default=default_device, help=f"torch device (default: {default_device})")
    p.add_argument(
        "--precision_recall",
        type=str2bool,
        default=False,
        help="also compute k-NN precision/recall (k=3); needs reference features (default: False)",
    )
    p.add_argument("--splits", type=int, default=10, help="Inception Score splits (default: 10)")
    p.add_argument("--json", default="", help="also write the results to this JSON file (default: none)")
    p.add_argument(
        "--save_stats",
        default="",
        help="write the reference's mu/sigma (plus feats with --precision_recall True) to this .npz (default: none)",
    )
    p.add_argument("--progress", type=str2bool, default=True, help="show progress bars (default: True)")
    return p


def main(argv=None):
    parser = create_parser()
    args = parser.parse_args(argv)
    if not args.ref:
        parser.error("--ref is required")
    if not args.sample_npz and not args.save_stats:
        parser.error("give --sample_npz to evaluate, --save_stats to write reference statistics, or both")
    if args.batch_size < 1 or args.splits < 1:
        parser.error("--batch_size and --splits must be positive")

    for flag, path in (("--sample_npz", args.sample_npz), ("--ref", args.ref)):
        if path and not os.path.isdir(path) and os.path.lexists(path):
            try:  # a regular file (never a FIFO or device); an .npz whose arrays hold what they declare
                check_npz_file(path, flag) if path.endswith(".npz") else open_regular(path, what=flag).close()
            except UntrustedFileError as e:
                raise EvaluationError(f"{flag}: {e}") from None
    if args.sample_npz:
        npz_images_shape(args.sample_npz)  # fail on a bad sample file before any heavy work
    if args.save_stats and is_stats_file(args.ref):
        raise EvaluationError(f"{args.ref} already holds statistics; --save_stats needs images (.npz or folder)")
    model = load_inception(args.inception_path or None, device=args.device)
    need_feats = args.precision_recall
    ref = reference_stats(args.ref, model, args.batch_size, args.device, need_feats, args.progress)
    if args.save_stats:
        save_stats(args.save_stats, ref["mu"], ref["sigma"], ref.get("feats") if need_feats else None)
        print(f"wrote reference statistics of {args.ref} to {args.save_stats}")
    if not args.sample_npz:
        return

    res = evaluate(
        args.sample_npz, ref, model, args.batch_size, args.device, args.precision_recall, args.splits, args.progress
    )
    print(f"FID: {res['fid']:.4f}")
    print(f"IS: {res['is_mean']:.4f} ± {res['is_std']:.4f}")
    if args.precision_recall:
        print(f"precision: {res['precision']:.4f}")
        print(f"recall: {res['recall']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(res, sample_npz=args.sample_npz, ref=args.ref, splits=args.splits), f, indent=2)


if __name__ == "__main__":
    try:
        main()
    except (EvaluationError, InceptionWeightsNotFound, InceptionWeightsMismatch, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
