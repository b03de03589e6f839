"""Convert an EDM-format .pkl network snapshot into our checkpoint (.pt) plus the flags that load it (.json).

The pickle is read safely (cm/edm_pickle.py: no embedded code runs). Then e.g.

  python scripts/convert_edm_pkl.py --pkl edm-cifar10-32x32-cond-vp.pkl --out edm_cifar10_cond.pt
  python scripts/image_sample.py --model_path edm_cifar10_cond.pt $(python -c "import json; \\
      print(' '.join(f'--{k} {v}' for k, v in json.load(open('edm_cifar10_cond.json'))['flags'].items()))") ...

(image_sample.py also takes the .pkl directly.)
"""

import json
import os
import sys

try:
    import cm  # noqa: F401
except ImportError:  # a checkout that is not pip-installed: use the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cm.cli import OneLineArgumentParser, UsageError, run_cli
from cm.fileio import save_atomic, write_atomic
from cm.formats.model_files import STRUCTURE_FLAGS, read_edm_network


def flags_path(out):
    return os.path.splitext(out)[0] + ".json"


def main(argv=None):
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pkl", required=True, help="EDM-format snapshot (.pkl) to read (required)")
    parser.add_argument("--out", required=True, help="checkpoint to write (.pt); the flags go beside it as .json")
    args = parser.parse_args(argv)
    if not args.out.endswith(".pt"):
        raise UsageError(f"--out must end in .pt, got {args.out!r}")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise UsageError(f"--out: folder {folder} does not exist")
    if not os.path.isfile(args.pkl):
        raise UsageError(f"--pkl: {args.pkl}: no such file")
    try:
        model, flags = read_edm_network(args.pkl)
    except UsageError as e:
        raise UsageError(f"--pkl: {e}") from None

    # script flags that rebuild the network (+ the sampling scalings), and what the file said
    script_flags = {k: flags[k] for k in STRUCTURE_FLAGS}
    script_flags["training_mode"] = flags["training_mode"]
    if "sigma_min" in flags:
        script_flags["sigma_min"] = flags["sigma_min"]
    script_flags["quantize"] = "round"  # image_sample.py rounds for EDM/ECT files, as their FID pipelines
    save_atomic(model.state_dict(), args.out)
    text = json.dumps({"flags": script_flags, "source": os.path.basename(args.pkl), "edm": flags}, indent=2)
    write_atomic(flags_path(args.out), lambda f: f.write((text + "\n").encode()))
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out} ({n:,} parameters, {flags['arch']}) and {flags_path(args.out)}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
