"""Convert the official CIFAR-10 archive to folders of PNGs (and optionally FID statistics).

  python scripts/prepare_cifar10.py --archive cifar-10-python.tar.gz --out data/cifar10
      -> data/cifar10/train/<class>_<index>.png (50000), data/cifar10/test/... (10000)

Download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html.
With --inception_path (pytorch-fid's pt_inception-2015-12-05-6726825d.pth) it also
writes OUT/cifar10_train_stats.npz (mu, sigma) for scripts/fid.py --ref.
"""

import argparse
import os
import sys

import torch

from cm.cli import OneLineArgumentParser
from cm.formats.cifar10 import CifarArchiveError, export_pngs, read_cifar10
from cm.metrics.evaluation import EvaluationError, compute_activations, feature_stats, save_stats
from cm.metrics.inception import InceptionWeightsMismatch, InceptionWeightsNotFound, load_inception
from cm.script_util import str2bool

STATS_NAME = "cifar10_train_stats.npz"


def create_parser():
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", required=True, help="path to the downloaded cifar-10-python.tar.gz (required)")
    p.add_argument("--out", required=True, help="output folder; train/ and test/ are created in it (required)")
    p.add_argument(
        "--inception_path",
        default="",
        help=f"pytorch-fid's Inception weights; if given, also write OUT/{STATS_NAME} (default: none)",
    )
    p.add_argument(
        "--save_feats",
        type=str2bool,
        default=False,
        help="store the train pool3 features in the stats file, for precision/recall (default: False)",
    )
    p.add_argument("--batch_size", type=int, default=100, help="images per Inception forward pass (default: 100)")
    p.add_argument(
        "--device", default=default_device, help=f"torch device for the statistics (default: {default_device})"
    )
    p.add_argument("--progress", type=str2bool, default=True, help="show progress bars (default: True)")
    return p


def main(argv=None):
    args = create_parser().parse_args(argv)
    model = load_inception(args.inception_path, args.device) if args.inception_path else None  # fail early
    data = read_cifar10(args.archive)
    folders = export_pngs(data, args.out, progress=args.progress)
    for split, folder in folders.items():
        print(f"wrote {len(data[split][0])} {split} images to {folder}")
    if model is not None:
        feats, _ = compute_activations(
            data["train"][0], model, args.batch_size, args.device, args.progress, desc="train stats"
        )
        mu, sigma = feature_stats(feats)
        path = os.path.join(args.out, STATS_NAME)
        save_stats(path, mu, sigma, feats if args.save_feats else None)
        print(f"wrote FID statistics of the train split to {path}")


if __name__ == "__main__":
    try:
        main()
    except (CifarArchiveError, EvaluationError, InceptionWeightsNotFound, InceptionWeightsMismatch, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
