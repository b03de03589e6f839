"""Run by tests/test_image_edit.py under mpiexec: every task of scripts/image_edit.py in one world.

Usage: edit_tasks.py OUT_ROOT -- COMMON FLAGS...   (each task writes OUT_ROOT/<task>/)
One launch for all six tasks keeps the suite fast; setup_dist is idempotent.
"""

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASK_FLAGS = {
    "inpaint": ["--mask", "right"], "colorize": [], "superres": ["--factor", "4"], "stroke": ["--strength", "5"],
    "denoise": ["--noise_sigma", "0.3"], "interpolate": ["--num_images", "2", "--num_points", "3"],
}  # fmt: skip


def main():
    out_root, common = sys.argv[1], sys.argv[3:]
    spec = importlib.util.spec_from_file_location("image_edit", os.path.join(ROOT, "scripts", "image_edit.py"))
    image_edit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(image_edit)
    for task, flags in TASK_FLAGS.items():
        image_edit.main(common + ["--task", task, *flags, "--logging_dir", os.path.join(out_root, task)])


if __name__ == "__main__":
    main()
