"""Self-describing network files: which formats carry their own architecture, and adopting it.

A plain `.pt` checkpoint is a bare state_dict: the flags say which network it
fits. Other formats carry the architecture (an EDM `.pkl`, OpenAI's JAX/Flax files, ...): for them
`load_network_file(path)` returns (model, flags), and `adopt_network_flags`
makes a script's flags agree with the file before anything is built or written.
Add a format by adding its suffix and reader to `READERS`.
"""

import os

from ..checkpoint import load_model_state, read_checkpoint, strip_wrapper_prefix
from .. import logger
from ..cli import UsageError
from ..nn import widen_time_inputs
from .untrusted import MAX_IMAGE_SIZE

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


def read_edm_network(path, image_size=None):
    """(model, flags) of an EDM/ECT snapshot; an ECT consistency model (ECMPrecond) is training_mode ect
    (its row: boundary condition at the file's σ_min, ECT's few-step sampler, rounded uint8)."""
    from .edm_pickle import load_edm_pickle

    model, flags = load_edm_pickle(path)
    if flags.get("precond") == "ECMPrecond":
        flags = dict(flags, training_mode="ect")
    return model, flags


def _read_jax_checkpoint(path, image_size=None):
    """OpenAI's JAX/Flax CIFAR-10 files; they do not store the image size (32 unless given)."""
    from .flax_msgpack import FlaxFormatError
    from .jax_checkpoint import load_jax_checkpoint

    try:
        return load_jax_checkpoint(path, image_size=image_size or 32)
    except FlaxFormatError as e:
        raise UsageError(str(e)) from None


READERS = {".pkl": read_edm_network}


def _reader(path):
    """The reader of ``path``: by suffix, else a Flax msgpack file by content (they have no suffix)."""
    from .jax_checkpoint import is_jax_checkpoint

    suffix = os.path.splitext(str(path))[1].lower()
    if suffix in READERS:
        return READERS[suffix]
    return _read_jax_checkpoint if is_jax_checkpoint(path) else None


def is_network_file(path):
    """True when ``path`` is in a format that carries its own architecture."""
    return bool(path) and _reader(path) is not None


def load_network_file(path, image_size=None):
    """(model in eval mode, flags) of a self-describing network file; one-line UsageError else.

    ``image_size`` is for formats that do not store it (JAX/Flax files).
    """
    reader = _reader(path)
    if reader is None:
        raise UsageError(f"{path}: not a self-describing network file ({', '.join(READERS)} or a Flax checkpoint)")
    if not os.path.lexists(path):
        raise UsageError(f"{path}: no such file")
    return reader(path, image_size=image_size)  # each reader opens regular files only


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
    image_size = getattr(args, "image_size", None)
    if image_size == defaults.get("image_size"):
        image_size = None  # not set by the user: the file's own, if it stores one
    try:
        model, flags = load_network_file(path, image_size=image_size)
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
    if "image_size" in flags:  # a file decides the image size: said once, bounded by the readers
        logger.log(f"--{flag} {path}: image size {flags['image_size']} from the file (at most {MAX_IMAGE_SIZE})")
    return model, flags


def load_network_weights(model, path, network, flag, leave_out=(), widen_time=False):
    """Load the ``--<flag>`` file ``path`` into ``model``.

    ``network`` is what `adopt_network_flags` returned for it: (model, flags) of a
    self-describing file, whose weights are taken; None for a plain checkpoint,
    which is read (missing: one line naming the flag). A state that does not fit
    ``model`` is a one-line CheckpointError. Entries whose names end in one of
    ``leave_out`` are dropped first (a layer ``model`` was built without).
    ``widen_time``: a one-time network may initialise a two-time ``model``
    (`cm.nn.widen_time_inputs`: r's weights zero).
    """
    if network is not None:
        state = network[0].state_dict()
    else:
        try:
            state = read_checkpoint(path)
        except FileNotFoundError:
            raise UsageError(f"--{flag} {path}: no such file") from None
    if leave_out:
        state = {k: v for k, v in state.items() if not k.endswith(tuple(leave_out))}
    if widen_time and getattr(model, "time_inputs", 1) == 2 and isinstance(state, dict):
        state, _ = strip_wrapper_prefix(state, model.state_dict())
        state = widen_time_inputs(model, state)
    load_model_state(model, state, f"--{flag} {path}")
