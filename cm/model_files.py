"""Self-describing network files: which formats carry their own architecture, and adopting it.

A plain `.pt` checkpoint is a bare state_dict: the flags say which network it
fits. Other formats carry the architecture (an EDM `.pkl`, ...): for them
`load_network_file(path)` returns (model, flags), and `adopt_network_flags`
makes a script's flags agree with the file before anything is built or written.
Add a format by adding its suffix and reader to `READERS`.
"""

import os

from .cli import UsageError

# flags that fix the network's structure: a file that describes itself decides them
STRUCTURE_FLAGS = (
    "arch",
    "image_size",
    "num_channels",
    "channel_mult",
    "num_res_blocks",
    "attention_resolutions",
    "class_cond",
    "augment_dim",
)
# ... and, for sampling, the scalings the file's preconditioner implies
SAMPLING_FLAGS = STRUCTURE_FLAGS + ("training_mode", "sigma_min")


def _read_edm_pickle(path):
    from .edm_pickle import load_edm_pickle

    return load_edm_pickle(path)


READERS = {".pkl": _read_edm_pickle}


def is_network_file(path):
    """True when ``path`` is in a format that carries its own architecture."""
    return bool(path) and os.path.splitext(str(path))[1].lower() in READERS


def load_network_file(path):
    """(model in eval mode, flags) of a self-describing network file; one-line UsageError else."""
    suffix = os.path.splitext(str(path))[1].lower()
    if suffix not in READERS:
        raise UsageError(f"{path}: not a self-describing network file ({', '.join(READERS)})")
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    return READERS[suffix](path)


def _normal(key, value):
    """Compare comma lists as number tuples and everything else as is."""
    if key in ("channel_mult", "attention_resolutions") and isinstance(value, str):
        return tuple(float(v) for v in value.split(",") if v.strip())
    return value


def adopt_network_flags(args, flag, defaults, keys=STRUCTURE_FLAGS):
    """Load ``args.<flag>`` if it is self-describing; set ``keys`` of ``args`` from the file.

    A key the user set (differs from ``defaults``) to a value the file contradicts
    is a one-line UsageError naming the flag. Returns (model, flags), or None for
    a plain checkpoint path.
    """
    path = getattr(args, flag)
    if not is_network_file(path):
        return None
    try:
        model, flags = load_network_file(path)
    except UsageError as e:
        raise UsageError(f"--{flag}: {e}") from None
    for key in keys:
        if key not in flags or not hasattr(args, key):
            continue
        given = getattr(args, key)
        try:
            set_by_user = _normal(key, given) != _normal(key, defaults.get(key))
            agrees = _normal(key, given) == _normal(key, flags[key])
        except ValueError:
            set_by_user, agrees = True, False
        if set_by_user and not agrees:
            raise UsageError(f"--{key} {given} contradicts --{flag} {path}, which holds {key}={flags[key]}")
        setattr(args, key, flags[key])
    return model, flags
