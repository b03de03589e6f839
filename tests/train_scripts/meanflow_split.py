"""split_batch.py for --training_mode meanflow: a fixed global batch split across the ranks, and the
noise e and times (t, r) of every image a function of the image (not of the per-(rank, step) stream),
so K processes × N/K must make the update of 1 process × N. Dumps like run_and_dump.py.

Usage: meanflow_split.py OUT_DIR GLOBAL_N cm_train [script flags...]
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run_and_dump  # noqa: E402
from split_batch import fixed_batches  # noqa: E402
from cm import meanflow, step_data  # noqa: E402


def per_image_inputs(x_start, mf_times="fastgen"):
    m = x_start.double().flatten(1).mean(1)
    t = 0.2 + 0.7 * torch.sigmoid(5 * m)
    r = torch.where(m > 0.05, t, 0.3 * t)  # some samples r = t
    return torch.sin(7.0 * x_start + 1.0), t, r


if __name__ == "__main__":
    out_dir, global_n = sys.argv[1], int(sys.argv[2])
    step_data.load_training_data = fixed_batches(global_n)
    meanflow.draw_meanflow_inputs = per_image_inputs
    sys.argv = [sys.argv[0], out_dir] + sys.argv[3:]
    run_and_dump.main()
