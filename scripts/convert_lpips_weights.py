"""Make the single LPIPS weights file that cm.metrics.lpips.load_lpips reads.

Inputs are two public files: torchvision's VGG16 ImageNet weights
(vgg16-397923af.pth, https://download.pytorch.org/models/vgg16-397923af.pth)
and the LPIPS v0.1 VGG linear heads (lpips/weights/v0.1/vgg.pth inside the
`lpips` pip package, e.g. from `pip download --no-deps lpips`).

    python scripts/convert_lpips_weights.py --vgg16 vgg16-397923af.pth --lin vgg.pth --out lpips_vgg.pt
"""
import argparse
import os
import sys

import torch

from cm.cli import OneLineArgumentParser
from cm.fileio import save_atomic
from cm.metrics.lpips import LPIPS_PATH_ENV, LPIPSWeightsError, convert_weights


def read_state(path, what):
    """torch.load a state_dict onto the CPU (the lpips head file was saved from CUDA)."""
    if not os.path.isfile(path):
        raise LPIPSWeightsError(f"{what} file {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unreadable file in one line
        detail = (str(e).strip().splitlines() or [""])[0]
        raise LPIPSWeightsError(f"cannot read {what} file {path!r}: {type(e).__name__}: {detail}") from None



def main(argv=None):
    parser = OneLineArgumentParser(
        description="Merge torchvision VGG16 ImageNet weights and LPIPS v0.1 VGG heads into one file for cm.metrics.lpips.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--vgg16", required=True,
                        help="torchvision VGG16 ImageNet state_dict (vgg16-397923af.pth); classifier.* is dropped")
    parser.add_argument("--lin", required=True,
                        help="LPIPS v0.1 VGG linear heads (lpips package weights/v0.1/vgg.pth, keys lin0.model.1.weight ...)")
    parser.add_argument("--out", default="lpips_vgg.pt",
                        help=f"output file; pass it later via --lpips_path or {LPIPS_PATH_ENV}")
    args = parser.parse_args(argv)
    try:
        state = convert_weights(read_state(args.vgg16, "VGG16 weights"), read_state(args.lin, "LPIPS head weights"))
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):
            raise LPIPSWeightsError(f"output folder {folder!r} does not exist")
        save_atomic(state, args.out)
    except LPIPSWeightsError as e:
        sys.exit(f"convert_lpips_weights: error: {e}")
    print(f"wrote {args.out}: {len(state)} tensors (13 VGG16 convs + 5 LPIPS heads)")


if __name__ == "__main__":
    main()
