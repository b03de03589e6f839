"""Plot the progress.csv of one or more training runs into one PNG (loss, its quarters, lr, grad norm, bad steps, FID).

  python scripts/plot_progress.py logs/edm --out edm.png
  python scripts/plot_progress.py logs/cd logs/ect logs/ict --out recipes.png

Several runs are overlaid, each in one colour named by its folder (or --names).
Needs matplotlib: pip install -e ".[plot]".
"""

import os
import sys

try:
    import cm  # noqa: F401
except ImportError:  # a checkout that is not pip-installed: use the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cm.cli import OneLineArgumentParser, run_cli
from cm.tools.progress_plot import write_progress_plot


def create_argparser():
    p = OneLineArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logdirs", nargs="+", metavar="LOGDIR", help="logging dirs holding a progress.csv")
    p.add_argument("--out", default="plot.png", help="the PNG to write (default: plot.png)")
    p.add_argument("--names", default="", help="comma list of legend names, one per LOGDIR (default: folder names)")
    return p


def main(argv=None):
    args = create_argparser().parse_args(argv)
    names = args.names.split(",") if args.names else None
    boxes = write_progress_plot(args.logdirs, args.out, names)
    print(f"wrote {args.out}: " + ", ".join(boxes))


if __name__ == "__main__":
    sys.exit(run_cli(main))
