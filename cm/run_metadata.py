"""``metaNNNNNN.json`` beside each checkpoint set: what produced it, and what a resume changed.

The file holds the step, the resolved flags of the run, the world size and
the code version (``git describe`` of the checkout, when there is one). On
resume, a flag that matters (architecture, batch size, world size, mode,
image size, ...) whose value differs from the checkpoint's is a warning
naming it; the run goes on (the user may mean it).
"""

import json
import os
import re
import subprocess
import warnings

from .formats.untrusted import MAX_METADATA_BYTES, read_regular, safe_text

# Flags whose change on resume makes the run a different run.
FLAGS_THAT_MATTER = (
    "training_mode",
    "image_size",
    "num_channels",
    "num_res_blocks",
    "channel_mult",
    "attention_resolutions",
    "num_heads",
    "num_head_channels",
    "num_heads_upsample",
    "class_cond",
    "learn_sigma",
    "resblock_updown",
    "use_scale_shift_norm",
    "use_new_attention_order",
    "use_fp16",
    "global_batch_size",
    "batch_size",
    "microbatch",
    "ema_rate",
    "lr",
    "weight_decay",
    "sigma_min",
    "sigma_max",
    "weight_schedule",
    "loss_norm",
    "schedule_sampler",
    "target_ema_mode",
    "scale_mode",
    "start_ema",
    "start_scales",
    "end_scales",
    "seed",
    "world_size",
)


def metadata_filename(step):
    """``metaNNNNNN.json`` of the set of ``step``."""
    return f"meta{step:06d}.json"


def code_version():
    """``git describe --always --dirty`` of the checkout this code lives in, or None."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=here, capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def build_metadata(step, flags, world_size, version=None):
    """The metadata dict of a checkpoint set (flags: the resolved flags, or None)."""
    return {
        "step": int(step),
        "world_size": int(world_size),
        "code_version": version,
        "flags": dict(flags or {}),
    }


def metadata_bytes(step, flags, world_size):
    """The json of `build_metadata` (with the current code version) as bytes."""
    meta = build_metadata(step, flags, world_size, code_version())
    return (json.dumps(meta, sort_keys=True, indent=2, default=str) + "\n").encode()


_SET_FILE = re.compile(r"^(?:model|target_model|teacher_model|ema_[^_]+_)(\d{6,})\.pt$")


def read_metadata(model_path):
    """The metadata beside ``.../modelNNNNNN.pt`` (or an EMA/target file of that set), or None when absent."""
    match = _SET_FILE.match(os.path.basename(str(model_path)))
    if match is None:
        return None
    path = os.path.join(os.path.dirname(str(model_path)), f"meta{match.group(1)}.json")
    try:  # a regular file of bounded size; too deep a nesting is as unreadable as bad json
        meta = json.loads(read_regular(path, MAX_METADATA_BYTES, "metadata file"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(meta, dict):
        return None
    flags = meta.get("flags")
    meta["flags"] = {k: v for k, v in flags.items() if isinstance(v, (str, int, float, bool)) or v is None} \
        if isinstance(flags, dict) else {}  # only plain values are compared
    if not (meta.get("world_size") is None or type(meta.get("world_size")) is int):
        meta["world_size"] = None
    return meta


# flags a resumed run takes from its checkpoint's metadata unless given again: they describe the
# network the checkpoint holds (σ_min: where a consistency model's boundary condition sits)
KEPT_ON_RESUME = ("sigma_min",)


def keep_resumed_flags(args, explicit, logging_dir):
    """Set `KEPT_ON_RESUME` flags not in ``explicit`` from the metadata of the checkpoint resumed.

    ``args.resume_checkpoint``: a model file, or "auto" (the newest model file in
    ``logging_dir``). Returns the log line, or None when nothing changed.
    """
    from .checkpoint import find_latest_checkpoint

    path = args.resume_checkpoint
    if path == "auto":
        path = find_latest_checkpoint(logging_dir)
    meta = read_metadata(path) if path else None
    flags = (meta or {}).get("flags") or {}
    kept = [k for k in KEPT_ON_RESUME if k not in explicit and k in flags and flags[k] != getattr(args, k)]
    for k in kept:
        setattr(args, k, type(getattr(args, k))(flags[k]))
    return ", ".join(f"--{k} {getattr(args, k)}" for k in kept) + f" from {path}'s metadata" if kept else None


def changed_flags(saved, current):
    """[(flag, saved value, current value)] for FLAGS_THAT_MATTER present in both and different."""
    out = []
    for flag in FLAGS_THAT_MATTER:
        if flag in saved and flag in current and str(saved[flag]) != str(current[flag]):
            out.append((flag, saved[flag], current[flag]))
    return out


def warn_changed_flags(model_path, flags, world_size):
    """Warn once per flag that matters whose value differs from the checkpoint's metadata."""
    meta = read_metadata(model_path)
    if meta is None or flags is None:
        return []
    saved = dict(meta.get("flags") or {}, world_size=meta.get("world_size"))
    current = dict(flags, world_size=world_size)
    changes = changed_flags(saved, current)
    for flag, old, new in changes:
        label = "world size" if flag == "world_size" else f"--{flag}"
        warnings.warn(
            f"resuming {model_path} with {label} {new}; the checkpoint was made with {label} {safe_text(old, 200)}",
            stacklevel=2,
        )
    return changes
