"""The demo's editing panel: zero-shot inpainting and super-resolution of held-out digits.

``scripts/image_edit.py`` runs on the distilled model (its ``main`` in this
process, like the demo's sampling) for the first ``cfg.edit_images`` held-out
digits, written as an image_sample-style ``.npz`` with their true labels:

* inpaint: the right half of each digit is removed (``--mask right``);
* superres: each digit is replaced by its 2×2 block means (``--factor 2``).

The digits classifier judges the degraded inputs and the completed images
against the true labels; both rows go into the demo table. ``editing.png``
shows, per class, the original, the degraded input and the result of each task.
"""

import os

import numpy as np
from PIL import Image

from .demo_common import DemoError, comparison_grid, judge, model_flags, run_sampling

EDIT_TASKS = (
    ("inpaint", "inpaint right half", ["--mask=right"]),
    ("superres", "super-res x2", ["--factor=2"]),
)


def edit_argv(cfg, model_path, input_npz, log_dir, task, task_flags):
    return [
        f"--task={task}",
        *task_flags,
        f"--model_path={model_path}",
        "--training_mode=consistency_distillation",
        f"--input={input_npz}",
        f"--logging_dir={log_dir}",
        *model_flags(cfg),
        f"--steps={cfg.cm_steps}",
        f"--ts={cfg.edit_ts}",
        f"--batch_size={cfg.sample_batch_size}",
        f"--seed={cfg.seed}",
    ]


def edit_rows(task, task_label, nfe, seconds, degraded, results, labels, clf, ref_stats):
    """Table rows ``edit_<task>_input`` and ``edit_<task>_result``, judged against the true ``labels``."""
    rows = []
    for kind, label, images in (("input", "degraded input", degraded), ("result", "completed", results)):
        acc, fd = judge(clf, images, labels, ref_stats)
        done = kind == "result"
        rows.append(dict(
            name=f"edit_{task}_{kind}", label=f"edit: {task_label}, {label}", nfe=nfe if done else None,
            seconds=seconds if done else None, images=len(images), accuracy=acc, frechet=fd,
        ))  # fmt: skip
    return rows


def run_editing(out, cfg, student, clf, heldout, labels, ref_stats, logs, commands, timings):
    """Run both edits on the held-out digits; returns (table rows, files dict). Writes ``editing.png``."""
    folder = os.path.join(out, "editing")
    os.makedirs(folder, exist_ok=True)
    n = min(cfg.edit_images, len(heldout))
    inputs, truth = heldout[:n], np.asarray(labels[:n], dtype=np.int64)
    input_npz = os.path.join(folder, f"heldout_{n}x{cfg.image_size}x{cfg.image_size}x3.npz")
    np.savez(input_npz, inputs, truth)
    nfe = len(cfg.edit_ts.split(",")) - 1
    rows, panels, titles, files = [], [(inputs, truth)], ["held-out digits"], {"inputs": os.path.relpath(input_npz, out)}
    for task, label, flags in EDIT_TASKS:
        log_dir = os.path.join(folder, task)
        argv = edit_argv(cfg, student, input_npz, log_dir, task, flags)
        commands[f"edit_{task}"] = ["python", "scripts/image_edit.py", *argv]
        seconds = run_sampling(f"edit_{task}", argv, os.path.join(logs, f"edit_{task}.log"), script="image_edit.py")
        timings[f"edit_{task}"] = seconds
        npz = os.path.join(log_dir, f"{task}_{n}x{cfg.image_size}x{cfg.image_size}x3.npz")
        if not os.path.isfile(npz):
            raise DemoError(f"image_edit.py finished without writing {npz}")
        with np.load(npz) as z:
            degraded, results = z["degraded"], z["arr_0"]
        rows += edit_rows(task, label, nfe, seconds, degraded, results, truth, clf, ref_stats)
        panels += [(degraded, truth), (results, truth)]
        titles += [f"{label}: input", f"{label}: result"]
        files[task] = os.path.relpath(npz, out)
    panel_path = os.path.join(out, "editing.png")
    scale = max(1, 24 // cfg.image_size)
    Image.fromarray(comparison_grid(panels, per_class=2, scale=scale, titles=titles)).save(panel_path)
    files["panel"] = "editing.png"
    return rows, files
