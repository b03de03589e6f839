"""OpenAI's JAX/Flax CIFAR-10 consistency-model checkpoints as our NCSN++ network.

The files of openai/consistency_models_cifar10 (``edm_cifar10_ema``, ``cd-l1``,
``cd-l2``, ``cd-lpips``, ``ct-lpips``, … each a ``checkpoint_N``) are
``flax.serialization.to_bytes`` of a training state: ``StateWithTarget``
(``params``, ``target_params``, ``params_ema``, …), ``State`` (no
``target_params``) or a bare parameter tree. `load_jax_checkpoint` reads one
without JAX/Flax and returns our `SongUNet` (NCSN++, eval mode) holding the
chosen parameter set, plus the flags that rebuild it — the same contract as
the EDM pickle loader; `cm.formats.model_files` hands these files (recognised by
content: they have no suffix) to the scripts. Sample it through `KarrasDenoiser` with
``distillation=True`` (CD/CT models, boundary condition at σ_min 0.002) or
``False`` (the EDM teacher); σ_data is 0.5 in both.
"""

import os

import torch

from .flax_msgpack import FlaxFormatError, read_msgpack_tree
from .jax_ncsnpp import INDEXED, SINGLE_MODULES, convert_tree, infer_config
from .untrusted import open_regular

PARAMETER_SETS = ("params_ema", "params", "target_params")
MSGPACK_MAP_BYTES = set(range(0x81, 0x90)) | {0xDE, 0xDF}  # non-empty fixmap, map16, map32


def is_jax_checkpoint(path):
    """Whether ``path`` looks like a Flax msgpack state (a msgpack map; torch files are zip or pickle)."""
    try:
        with open_regular(path) as f:  # never a FIFO or device
            head = f.read(1)
    except (OSError, ValueError):
        return False
    return len(head) == 1 and head[0] in MSGPACK_MAP_BYTES


def _is_parameter_tree(tree):
    return isinstance(tree, dict) and any(str(k) in SINGLE_MODULES or INDEXED.match(str(k)) for k in tree)


def _keys(tree):
    names = [str(k)[:40] for k in list(tree)[:10]]  # the message is escaped by FlaxFormatError
    return ", ".join(names) + (f", … ({len(tree)} keys)" if len(tree) > 10 else "") or "none"


def select_parameter_set(tree, which, path):
    """(parameter tree, its path in the file) of ``which`` in a State / StateWithTarget / bare tree."""
    if which not in PARAMETER_SETS:
        raise FlaxFormatError(f"which must be one of {', '.join(PARAMETER_SETS)}, got {which!r}")
    if set(map(str, tree)) == {"params"} and _is_parameter_tree(tree["params"]):
        tree = tree["params"]  # Flax variables {"params": ...}
    if _is_parameter_tree(tree):
        if which == "target_params":
            raise FlaxFormatError(f"{path}: a bare parameter tree holds no target_params (only one set)")
        return tree, ""
    if not any(name in tree for name in PARAMETER_SETS):
        raise FlaxFormatError(
            f"{path}: not a consistency-model state or NCSN++ parameter tree (top-level keys: {_keys(tree)})"
        )
    if which not in tree:
        present = [k for k in PARAMETER_SETS if k in tree]
        raise FlaxFormatError(f"{path}: no {which} in this state (parameter sets present: {', '.join(present)})")
    params = tree[which]
    if isinstance(params, dict) and set(map(str, params)) == {"params"}:
        return params["params"], f"{which}/params"
    if not isinstance(params, dict):
        raise FlaxFormatError(f"{path}: {which} is a msgpack {type(params).__name__}, not a parameter tree")
    return params, which


def flags_from_config(config):
    """Script flags (``--arch ncsnpp`` …, `cm.formats.model_files.STRUCTURE_FLAGS`) that rebuild the network of a config."""
    return dict(
        arch="ncsnpp",
        image_size=config["image_size"],
        num_channels=config["nf"],
        channel_mult=",".join(map(str, config["ch_mult"])),
        num_res_blocks=config["num_blocks"],
        attention_resolutions=",".join(map(str, config["attn_resolutions"])),
        class_cond=False,
        augment_dim=0,
    )


def flags_as_cli(flags):
    """The flags as a command-line fragment (``--arch ncsnpp --image_size 32 …``)."""
    return " ".join(f"--{k} {v}" for k, v in flags.items())


def model_from_flags(flags):
    """Our NCSN++ `SongUNet` built from the flags `flags_from_config` gives."""
    from ..song_unet import song_unet_from_flags

    return song_unet_from_flags(
        flags["arch"],
        flags["image_size"],
        num_channels=flags["num_channels"],
        channel_mult=[int(m) for m in str(flags["channel_mult"]).split(",")],
        num_res_blocks=flags["num_res_blocks"],
        attention_resolutions=[int(r) for r in str(flags["attention_resolutions"]).split(",")],
        dropout=flags.get("dropout", 0.0),
        class_cond=flags["class_cond"],
    )


def read_jax_checkpoint(path, which="params_ema", image_size=32, attn_resolutions=None):
    """(state_dict of torch tensors keyed like EDM's SongUNet, flags) of one parameter set in ``path``."""
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path}: no such file")
    tree = read_msgpack_tree(path)
    try:
        params, prefix = select_parameter_set(tree, which, path)
        config = infer_config(params, prefix, image_size=image_size, attn_resolutions=attn_resolutions)
        arrays = convert_tree(params, config, prefix)
    except FlaxFormatError as e:
        raise FlaxFormatError(f"{path}: {e}" if not str(e).startswith(str(path)) else str(e)) from None
    except (IndexError, KeyError, TypeError, ValueError, ZeroDivisionError, RecursionError, OverflowError) as e:
        raise FlaxFormatError(f"{path}: not an NCSN++ parameter tree ({type(e).__name__}: {e})") from None
    state_dict = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
    return state_dict, flags_from_config(config)


def load_jax_checkpoint(path, which="params_ema", image_size=32, attn_resolutions=None, device="cpu"):
    """(model, flags): our NCSN++ network in eval mode holding ``which`` of the Flax checkpoint ``path``.

    ``image_size`` is not stored in the file (32 for CIFAR-10); ``attn_resolutions``
    is needed only when the tree cannot tell the attention levels (see
    `cm.formats.jax_ncsnpp.infer_config`).
    """
    state_dict, flags = read_jax_checkpoint(path, which, image_size, attn_resolutions)
    model = model_from_flags(flags)
    model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval(), flags

