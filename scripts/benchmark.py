"""Throughput (images/s) and peak memory of EDM training, distillation, one-step sampling and a Heun step.

  python scripts/benchmark.py                      # the CIFAR-10 seed configuration, batch 8 on a CPU
  python scripts/benchmark.py --device cuda --batch_size 256 --json
  python scripts/benchmark.py --image_size 16 --num_channels 32 --channel_mult 1,2 --attention_resolutions 8

Any model flag of the training scripts is accepted; see cm/benchmark.py for the method.
"""

import json
import os
import sys

try:
    import cm  # noqa: F401
except ImportError:  # a checkout that is not pip-installed: use the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cm.tools.benchmark import create_argparser, format_table, resolve, run_benchmarks


def main(argv=None):
    parser = create_argparser()
    parser.description = __doc__.splitlines()[0]
    args = parser.parse_args(argv)
    try:
        cfg = resolve(args)
    except ValueError as e:
        parser.error(str(e))
    progress = None if cfg["json"] else (lambda name: print(f"running {name} ...", file=sys.stderr, flush=True))
    report = run_benchmarks(cfg, progress=progress)
    if cfg["json"]:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
