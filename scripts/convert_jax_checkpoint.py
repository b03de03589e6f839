"""Convert an OpenAI JAX/Flax CIFAR-10 checkpoint (consistency_models_cifar10) to a PyTorch state_dict.

    python scripts/convert_jax_checkpoint.py --checkpoint cd-lpips/checkpoints/checkpoint_80 --out cd_lpips.pt

writes ``cd_lpips.pt`` (the NCSN++ SongUNet state_dict, loadable with strict=True
into ``--arch ncsnpp``) and ``cd_lpips.json`` (``flags``: the flags that build that
network, as convert_edm_pkl.py writes them), and prints those flags. No JAX or Flax needed.
"""

import argparse
import json
import os
import sys

from cm.cli import OneLineArgumentParser, UsageError, run_cli
from cm.fileio import save_atomic, write_atomic
from cm.formats.jax_checkpoint import PARAMETER_SETS, flags_as_cli, read_jax_checkpoint


def parse_args(argv):
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the Flax checkpoint file (e.g. checkpoint_80)")
    parser.add_argument("--out", required=True, help="output .pt file; the flags go beside it as .json")
    parser.add_argument("--which", default="params_ema", choices=PARAMETER_SETS, help="parameter set to convert")
    parser.add_argument("--image_size", type=int, default=32, help="image side in pixels (not stored in the file)")
    parser.add_argument("--attention_resolutions", default="",
                        help="comma list of attention resolutions; only needed when the file cannot tell")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not args.out.endswith(".pt"):
        raise UsageError(f"--out must name a .pt file, got {args.out!r}")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise UsageError(f"--out: folder {folder} does not exist")
    try:
        attn = [int(r) for r in args.attention_resolutions.split(",") if r] or None
    except ValueError:
        raise UsageError(f"--attention_resolutions must be a comma list of integers, "
                         f"got {args.attention_resolutions!r}") from None
    if not os.path.isfile(args.checkpoint):
        raise UsageError(f"--checkpoint: {args.checkpoint} does not exist")
    state_dict, flags = read_jax_checkpoint(args.checkpoint, args.which, args.image_size, attn)
    flags_path = args.out[: -len(".pt")] + ".json"
    save_atomic(state_dict, args.out)
    text = json.dumps({"flags": flags, "source": os.path.basename(args.checkpoint), "which": args.which}, indent=2)
    write_atomic(flags_path, lambda f: f.write((text + "\n").encode()))
    count = sum(v.numel() for k, v in state_dict.items() if not k.endswith(("resample_filter", "freqs")))
    print(f"wrote {args.out} ({args.which}, {count:,} parameters) and {flags_path}")
    print(f"flags: {flags_as_cli(flags)}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
