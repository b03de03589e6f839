"""Checkpoint files of the training loops: names, atomic writes, checked loads.

A checkpoint of step k is a set of sibling files in one folder, each a plain
``state_dict`` (the step is zero-padded to 6 digits):

* ``model{k}.pt``          online weights, written LAST (its presence means complete)
* ``ema_{rate}_{k}.pt``    one per EMA rate
* ``opt{k}.pt``            optimiser state
* ``target_model{k}.pt``   consistency target network (consistency modes)
* ``teacher_model{k}.pt``  current teacher (progressive distillation)

Every file is written to a temporary name in the same folder and renamed into
place, so a crash leaves either the old state or the new one, never half a
file.
"""

import os
import re

import torch

MODEL_FILE = re.compile(r"^model(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used with the flags given; the message is one line."""

    def __init__(self, message):
        super().__init__(" ".join(str(message).split()))


def checkpoint_filename(kind, step, rate=None):
    """File name of one part of the checkpoint of ``step`` ("model", "opt", "ema", ...)."""
    if kind == "ema":
        return f"ema_{rate}_{step:06d}.pt"
    return f"{kind}{step:06d}.pt"


def parse_resume_step(path):
    """The step of a ``.../modelNNNNNN.pt`` path."""
    match = MODEL_FILE.match(os.path.basename(path))
    if match is None:
        raise CheckpointError(f"--resume_checkpoint must name a model file like model001000.pt, got {path!r}")
    return int(match.group(1))


def find_latest_checkpoint(directory):
    """Path of the complete checkpoint with the highest step in ``directory``, or None.

    A checkpoint is complete when its model file exists: that file is written last.
    """
    if not directory or not os.path.isdir(directory):
        return None
    steps = [int(m.group(1)) for m in map(MODEL_FILE.match, os.listdir(directory)) if m]
    if not steps:
        return None
    return os.path.join(directory, checkpoint_filename("model", max(steps)))


def save_atomic(state, path):
    """torch.save ``state`` to ``path`` through a temporary file and a rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def strip_module_prefix(state_dict):
    """Drop the ``module.`` prefix a DistributedDataParallel wrapper adds to every key."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def _shape(t):
    return tuple(t.shape) if hasattr(t, "shape") else type(t).__name__


def check_state_dict(expected, state_dict, path):
    """Raise CheckpointError at the first key where ``state_dict`` does not fit ``expected``.

    ``expected`` is a reference state_dict (or name → tensor mapping); keys are
    checked in its order, then keys the reference lacks.
    """
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path}: expected a state_dict, found a {type(state_dict).__name__}")
    for key, ref in expected.items():
        if key not in state_dict:
            raise CheckpointError(
                f"{path} does not fit the model built from the flags: "
                f"key {key} missing from the checkpoint (model: {_shape(ref)})"
            )
        if _shape(state_dict[key]) != _shape(ref):
            raise CheckpointError(
                f"{path} does not fit the model built from the flags: "
                f"{key} has shape {_shape(state_dict[key])} in the checkpoint, {_shape(ref)} in the model"
            )
    for key, value in state_dict.items():
        if key not in expected:
            raise CheckpointError(
                f"{path} does not fit the model built from the flags: "
                f"unexpected key {key} (checkpoint: {_shape(value)}), absent from the model"
            )


def load_model_state(model, state_dict, path):
    """Load ``state_dict`` into ``model`` (strict), or fail with a one-line CheckpointError.

    The error names the file, the first mismatched key and both shapes.
    A ``module.`` prefix (saved from a DDP wrapper) is removed first.
    """
    state_dict = strip_module_prefix(state_dict)
    check_state_dict(model.state_dict(), state_dict, path)
    model.load_state_dict(state_dict, strict=True)
    return model
