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

from .fileio import save_atomic  # noqa: F401  (part of this module's API)
from .formats.untrusted import UntrustedFileError, safe_text
from .nn import attach_logvar_head, has_logvar_head, time_inputs_in

MODEL_FILE = re.compile(r"^model(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used with the flags given; the message is one line."""

    def __init__(self, message):
        super().__init__(safe_text(message))  # keys from the file: escaped and cut


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


def strip_wrapper_prefix(state_dict, expected_keys):
    """Remove wrapper prefixes that every key carries and the model's keys lack.

    Handles ``module.`` (DDP), ``_orig_mod.`` (torch.compile), ``model.`` and
    any other single dotted component shared by all keys, repeatedly (e.g.
    ``module._orig_mod.``). Returns (state_dict, removed prefix or "").
    """
    expected = set(expected_keys)
    model_heads = {k.split(".", 1)[0] for k in expected}
    removed = ""
    keys = list(state_dict)
    while keys and not set(keys) <= expected:
        heads = {k.split(".", 1)[0] if "." in k else None for k in keys}
        if len(heads) != 1 or None in heads:
            break
        head = heads.pop()
        if head in model_heads or not head.isidentifier() or len(head) > 64:  # a module name, or not a wrapper's
            break
        head += "."
        state_dict = {k[len(head) :]: v for k, v in state_dict.items()}
        keys = list(state_dict)
        removed += head
    return state_dict, removed


def _load_reason(exc):
    """The informative line of a torch.load failure (its weights_only errors run to a dozen lines)."""
    text = str(exc)
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if m:
        return m.group(1).split(". ")[0].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def read_checkpoint(path):
    """Read a checkpoint once on rank 0 and share it (``weights_only``), with one-line errors.

    A missing or unreadable file raises dist_util's one-line OSError
    (FileNotFoundError when missing); a file torch cannot load as plain
    weights raises CheckpointError.
    """
    from . import dist_util

    try:
        return dist_util.load_state_dict(path, map_location="cpu")
    except OSError:
        raise
    except UntrustedFileError as exc:  # a refusal of cm.formats.torch_weights: names the file already
        raise CheckpointError(str(exc)) from None
    except Exception as exc:  # not a torch file, truncated, or holds objects weights_only refuses
        raise CheckpointError(f"cannot load {path} as a weights-only checkpoint ({_load_reason(exc)})") from None


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


def check_time_inputs_of_state(model, state_dict, path):
    """A network file of 1 time input for a 2-time model (or the reverse): one line naming --time_inputs."""
    if not hasattr(model, "TIME_KEYS"):
        return
    found = time_inputs_in(model, state_dict)
    if found is not None and found != model.time_inputs:
        raise CheckpointError(
            f"{path} holds a network with {found} time input(s), the flags build one with {model.time_inputs}: "
            f"give --time_inputs {found}"
        )


def load_model_state(model, state_dict, path):
    """Load ``state_dict`` into ``model`` (strict), or fail with a one-line CheckpointError.

    The error names the file, the first mismatched key and both shapes.
    Wrapper prefixes (``module.`` from DDP, ``_orig_mod.``, ...) are removed
    first; returns the removed prefix ("" if none). A state with sCM's
    log-variance head gives a model without one the head first (the
    checkpoint records it: `cm.nn.has_logvar_head`).
    """
    if isinstance(state_dict, dict) and has_logvar_head(state_dict) and not has_logvar_head(model):
        if hasattr(model, "time_features"):
            attach_logvar_head(model)
    expected = model.state_dict()
    prefix = ""
    if isinstance(state_dict, dict):
        state_dict, prefix = strip_wrapper_prefix(state_dict, expected)
        check_time_inputs_of_state(model, state_dict, path)
    check_state_dict(expected, state_dict, path)
    model.load_state_dict(state_dict, strict=True)
    return prefix
