"""A safe reader of EDM-format `.pkl` network snapshots (NVlabs/edm, ECT, ...).

Such a file is a pickle whose modules are "persistent" objects: unpickling it the
usual way imports `torch_utils` and executes the module source stored inside it.
Here a restricted unpickler admits a short allow-list of globals, turns every
persistent object into a plain record (class name + pickled `__dict__`) without
running its `module_src`, reads tensor storages with ``weights_only=True``, and
rebuilds the network as our `SongUNet` from the recorded weights and shapes.

`load_edm_pickle(path) -> (model, flags)`: ``model`` is our network in eval mode
holding the snapshot's ``ema`` weights (a pickle of a bare network works too);
``flags`` are the script flags that rebuild it.
"""

import collections
import io
import pickle

import numpy as np
import torch

from ..cli import UsageError
from ..song_unet import ARCH_CONFIGS, SongUNet

PRECONDS = ("EDMPrecond", "ECMPrecond")
UNSUPPORTED = {
    "VPPrecond": "the VP preconditioner (VPPrecond)",
    "VEPrecond": "the VE preconditioner (VEPrecond)",
    "iDDPMPrecond": "the iDDPM preconditioner (iDDPMPrecond)",
    "DhariwalUNet": "the ImageNet ADM network (DhariwalUNet)",
}


class PersistentRecord:
    """What a persistent object of the pickle holds: its class name and its `__dict__`."""

    def __init__(self, class_name, state):
        self.class_name = class_name
        self.state = state


class BoundMethodRecord:
    """A bound method of a recorded object (`getattr(obj, name)` in the pickle), kept as data.

    ECT's loss object stores its r-mapping as a bound method of itself, so every snapshot
    ECT's training loop writes names `builtins.getattr`; nothing is looked up or called.
    """

    def __init__(self, owner, name):
        self.owner = owner
        self.name = name


class ModuleDictRecord:
    """Stands in for `torch.nn.ModuleDict`; unpickling fills its `__dict__` (BUILD)."""


def _reconstruct_persistent_obj(meta):
    """Replaces `torch_utils.persistence._reconstruct_persistent_obj`: records, never executes."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise pickle.UnpicklingError("a persistent object without a class state")
    return PersistentRecord(str(meta.get("class_name")), meta["state"])


def _bound_method(obj, name):
    """Replaces `builtins.getattr`: only on a record this reader built, with a plain string name."""
    if not isinstance(obj, PersistentRecord) or type(name) is not str:
        raise pickle.UnpicklingError("getattr on something other than a recorded persistent object")
    return BoundMethodRecord(obj, name)


def _load_storage(data):
    """`torch.storage._load_from_bytes`: a nested torch.save stream, read with weights_only=True."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("a tensor storage that is not bytes")
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError("a tensor built from something other than a storage")
    return torch._utils._rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    if not torch.is_tensor(data):
        raise pickle.UnpicklingError("a parameter built from something other than a tensor")
    return torch.nn.Parameter(data, requires_grad=False)


def _numpy_dtype(name, align=False, copy=True):
    dtype = np.dtype(name)
    if dtype.kind not in "biufc":
        raise pickle.UnpicklingError(f"numpy dtype {name!r} is not numeric")
    return dtype


def _numpy_scalar(dtype, data):
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or not isinstance(data, bytes):
        raise pickle.UnpicklingError("a numpy scalar that is not a plain number")
    return np.frombuffer(data, dtype=dtype)[0]


ALLOWED_GLOBALS = {
    ("builtins", "getattr"): _bound_method,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch.nn.modules.container", "ModuleDict"): ModuleDictRecord,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only `ALLOWED_GLOBALS`; anything else is refused, naming it."""

    def find_class(self, module, name):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UsageError(f"refusing the global {module}.{name} (not on the EDM snapshot allow-list)") from None

    def persistent_load(self, pid):
        raise UsageError("refusing a persistent id (not used by EDM snapshots)")


def read_snapshot(path):
    """The unpickled object tree of an EDM `.pkl`, persistent objects as `PersistentRecord`s."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f).load()
    except UsageError as e:
        raise UsageError(f"{path}: {e}") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RuntimeError, MemoryError, UnicodeDecodeError) as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise UsageError(f"{path}: not a readable EDM pickle ({detail})") from None


# --- from records to a state_dict ----------------------------------------------
def _modules_of(record):
    state = record.state if isinstance(record, PersistentRecord) else getattr(record, "__dict__", {})
    return state


def collect_state_dict(record, prefix=""):
    """The `state_dict` (parameters, then persistent buffers, then children) of a recorded module."""
    state = _modules_of(record)
    out = collections.OrderedDict()
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is not None and name not in skip:
                if not torch.is_tensor(value):
                    raise UsageError(f"{prefix}{name} is not a tensor")
                out[prefix + name] = value.detach().clone()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(collect_state_dict(child, f"{prefix}{name}."))
    return out


def _find_network(obj, path):
    """The recorded network of a snapshot dict (its ``ema``) or of a bare pickled network."""
    if isinstance(obj, dict) and "ema" in obj:
        obj = obj["ema"]
    if not isinstance(obj, PersistentRecord):
        raise UsageError(f"{path}: no network inside (expected an EDM snapshot with 'ema' or a pickled network)")
    return obj


def _unsupported(name, path):
    what = UNSUPPORTED.get(name, f"network class {name}")
    return UsageError(f"{path}: {what} is not supported (EDMPrecond/ECMPrecond around SongUNet only)")


# --- from shapes to the SongUNet configuration -----------------------------------
def _taps_from_filter(f):
    """Recover the 1-D taps f from f⊗f/(Σf)² (first row ∝ f), as small integers."""
    row = f.reshape(f.shape[-2], f.shape[-1])[0].double()
    taps = row / row[0]
    return [int(round(t)) for t in taps.tolist()]


def infer_song_unet_config(sd, path):
    """SongUNet keyword arguments from a state_dict's keys and shapes."""

    def get(key):
        if key not in sd:
            raise UsageError(f"{path}: unrecognised network layout (no {key})")
        return sd[key]

    enc = sorted({k.split(".")[1] for k in sd if k.startswith("enc.")}, key=lambda n: -int(n.split("x")[0]))
    resolutions = sorted({int(n.split("x")[0]) for n in enc}, reverse=True)
    res0 = resolutions[0]
    conv0 = get(f"enc.{res0}x{res0}_conv.weight")
    model_channels, in_channels = conv0.shape[0], conv0.shape[1]
    num_blocks = len({n for n in enc if n.startswith(f"{res0}x{res0}_block")})
    channel_mult, attn = [], []
    for res in resolutions:
        last = get(f"enc.{res}x{res}_block{num_blocks - 1}.conv1.weight")
        channel_mult.append(last.shape[0] // model_channels)
        if f"enc.{res}x{res}_block0.qkv.weight" in sd:
            attn.append(res)
    noise_channels, emb_channels = get("map_layer0.weight").shape[1], get("map_layer0.weight").shape[0]
    filters = [v for k, v in sd.items() if k.endswith("resample_filter")]
    dec_aux = [k for k in sd if k.startswith("dec.") and "_aux_norm" in k]
    return dict(
        img_resolution=res0,
        in_channels=in_channels,
        out_channels=get(f"dec.{res0}x{res0}_aux_conv.weight").shape[0],
        label_dim=sd["map_label.weight"].shape[1] if "map_label.weight" in sd else 0,
        augment_dim=sd["map_augment.weight"].shape[1] if "map_augment.weight" in sd else 0,
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        channel_mult_emb=emb_channels // model_channels,
        num_blocks=num_blocks,
        attn_resolutions=tuple(attn),
        embedding_type="fourier" if "map_noise.freqs" in sd else "positional",
        channel_mult_noise=noise_channels // model_channels,
        encoder_type="residual" if any("_aux_residual" in n for n in enc)
        else "skip" if any("_aux_skip" in n for n in enc) else "standard",
        decoder_type="skip" if len(dec_aux) > 2 else "standard",
        resample_filter=tuple(_taps_from_filter(filters[0])) if filters else (1, 1),
    )


def _arch_of(config):
    """'ddpmpp' or 'ncsnpp' when the configuration is one the --arch flag can express."""
    for arch, settings in ARCH_CONFIGS.items():
        if all(config[k] == (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in settings.items()):
            if config["channel_mult_emb"] == 4 and config["in_channels"] == config["out_channels"] == 3:
                return arch
    return None


def _first_block_attr(record, name, default):
    """A plain attribute (e.g. ``dropout``) of the first UNetBlock found under ``record``."""
    for child in (_modules_of(record).get("_modules") or {}).values():
        if isinstance(child, PersistentRecord) and child.class_name == "UNetBlock" and name in child.state:
            return child.state[name]
        if child is not None:
            found = _first_block_attr(child, name, None)
            if found is not None:
                return found
    return default


def load_edm_pickle(path):
    """Read an EDM-format `.pkl` safely; return (our network in eval mode, its script flags)."""
    net = _find_network(read_snapshot(path), path)
    precond = None
    if net.class_name in PRECONDS:
        precond, net = net, (net.state.get("_modules") or {}).get("model")
        if not isinstance(net, PersistentRecord):
            raise UsageError(f"{path}: {precond.class_name} holds no network")
    elif net.class_name in UNSUPPORTED:
        raise _unsupported(net.class_name, path)
    if net.class_name != "SongUNet":
        raise _unsupported(net.class_name, path)

    sd = collect_state_dict(net)
    config = infer_song_unet_config(sd, path)
    arch = _arch_of(config)
    if arch is None:
        raise UsageError(f"{path}: a SongUNet configuration --arch cannot express ({config['embedding_type']} "
                         f"embedding, {config['encoder_type']} encoder, {config['decoder_type']} decoder)")
    if config["label_dim"] not in (0, 10):
        raise UsageError(f"{path}: {config['label_dim']} classes; only 10-class (CIFAR-10) or unconditional")
    dropout = float(_first_block_attr(net, "dropout", 0.0))
    label_dropout = float(net.state.get("label_dropout") or 0.0)
    model = SongUNet(**config, dropout=dropout, label_dropout=label_dropout)
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as e:
        raise UsageError(f"{path}: weights do not fit the inferred SongUNet ({str(e).splitlines()[0]})") from None
    model.eval()

    pstate = precond.state if precond is not None else {}
    sigma_data = float(pstate.get("sigma_data", 0.5))
    if sigma_data != 0.5:
        raise UsageError(f"{path}: sigma_data {sigma_data} is not supported (our denoiser uses 0.5)")
    flags = dict(
        arch=arch,
        image_size=config["img_resolution"],
        num_channels=config["model_channels"],
        channel_mult=",".join(str(m) for m in config["channel_mult"]),
        num_res_blocks=config["num_blocks"],
        attention_resolutions=",".join(str(r) for r in config["attn_resolutions"]),
        class_cond=config["label_dim"] > 0,
        augment_dim=config["augment_dim"],
        dropout=dropout,
        label_dropout=label_dropout,
        sigma_data=sigma_data,
        training_mode="edm",
        precond=precond.class_name if precond is not None else "none",
    )
    if precond is not None and precond.class_name == "ECMPrecond":
        # ECT's consistency model: boundary-condition scalings with the stored σ_min
        flags.update(training_mode="consistency_training", sigma_min=float(pstate.get("sigma_min", 0.002)))
    return model, flags
