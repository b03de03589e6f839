"""A safe reader of EDM-format `.pkl` network snapshots (NVlabs/edm, ECT, ...).

Such a file is a pickle whose modules are "persistent" objects: unpickling it the
usual way imports `torch_utils` and executes the module source stored inside it.
Here a restricted unpickler (`cm.formats.untrusted.SafeUnpickler`) admits a short
allow-list of globals, each replaced by a recording function of ours, turns every
persistent object into a plain record (class name + pickled `__dict__`) without running
its `module_src`, parses each nested tensor storage itself (its size checked against its
bytes), checks every tensor view against its storage, and rebuilds the network as our
`SongUNet` from the recorded weights and shapes once the module tree (each record once,
bounded depth), the inferred layout and its size against the weights held check out.

`load_edm_pickle(path) -> (model, flags)`: ``model`` is our network in eval mode
holding the snapshot's ``ema`` weights (a pickle of a bare network works too);
``flags`` are the script flags that rebuild it.
"""

import collections
import io
import pickle
import struct

import numpy as np
import torch

from ..cli import UsageError
from .untrusted import (
    MAX_DEPTH,
    MAX_IMAGE_SIZE,
    MAX_MATERIALISED_SLACK,
    MAX_MODEL_FILE_BYTES,
    MAX_RECORDS,
    Refused,
    SafeUnpickler,
    UntrustedFileError,
    finite_float,
    quote,
    read_regular,
)
from ..song_unet import ARCH_CONFIGS, SongUNet

PRECONDS = ("EDMPrecond", "ECMPrecond")
UNSUPPORTED = {
    "VPPrecond": "the VP preconditioner (VPPrecond)",
    "VEPrecond": "the VE preconditioner (VEPrecond)",
    "iDDPMPrecond": "the iDDPM preconditioner (iDDPMPrecond)",
    "DhariwalUNet": "the ImageNet ADM network (DhariwalUNet)",
}
# torch's typed storages as named in a legacy torch.save stream, and the dtype each holds
STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
LEGACY_MAGIC, LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001
NUMPY_DTYPES = ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "b1")


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
    """Stands in for `torch.nn.ModuleDict`; unpickling fills its `__dict__` (BUILD, once)."""


class DtypeRecord:
    """A numpy dtype named by the file (its pickled state is checked, never applied to numpy's own)."""

    def __init__(self, name):
        self.name = name


class StorageRecord:
    """A tensor storage read from a nested legacy torch.save stream: a flat tensor of our own."""

    def __init__(self, flat):
        self.flat = flat


class _StorageUnpickler(SafeUnpickler):
    """The pickles of a nested legacy `torch.save` of one storage (`torch.storage._load_from_bytes`)."""

    allowed = {("torch", name): dtype for name, dtype in STORAGE_DTYPES.items()}
    what = "tensor storage"

    def persistent_load(self, pid):
        ok = (type(pid) is tuple and len(pid) == 6 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
              and type(pid[2]) is str and type(pid[3]) is str and type(pid[4]) is int and pid[4] >= 0
              and pid[5] is None)
        if not ok:
            raise Refused("a storage record that is not ('storage', type, key, location, size, None)")
        return pid


def read_legacy_storage(data):
    """The storage of a legacy-format `torch.save(storage)` stream, its size checked against the bytes."""
    if type(data) is not bytes:
        raise Refused("a tensor storage that is not bytes")
    f = io.BytesIO(data)
    magic, protocol, sys_info, pid, keys = (_StorageUnpickler(f).load() for _ in range(5))
    if magic != LEGACY_MAGIC or protocol != LEGACY_PROTOCOL or type(sys_info) is not dict:
        raise Refused("a tensor storage that is not a legacy torch.save stream")
    if sys_info.get("little_endian") is not True:
        raise Refused("a big-endian tensor storage")
    if type(pid) is not tuple or keys != [pid[2]]:
        raise Refused("a tensor storage stream that does not hold exactly one storage")
    dtype, numel = pid[1], pid[4]
    head = f.read(8)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    rest = len(data) - f.tell()
    declared = struct.unpack("<q", head)[0] if len(head) == 8 else None
    if declared != numel or rest != numel * itemsize:
        raise Refused(f"a tensor storage declaring {numel} elements ({declared} in its header) where the file "
                      f"holds {max(rest, 0)} bytes")
    raw = bytearray(data[f.tell():])
    flat = torch.frombuffer(raw, dtype=dtype) if numel else torch.empty(0, dtype=dtype)
    return StorageRecord(flat)


def check_view(numel, offset, size, stride):
    """Refuse a tensor view (offset, size, stride) that reads outside a storage of ``numel`` elements.

    Every stride of a dimension longer than 1 must be ≥ 1 (stride 0 repeats elements: a
    broadcast, never a weight), and the view may hold at most as many elements as its
    storage, so materialising it never takes more memory than the file's bytes.
    """
    ints = type(offset) is int and type(size) in (tuple, list) and type(stride) in (tuple, list)
    if not ints or len(size) != len(stride) or not all(type(v) is int for v in (*size, *stride)):
        raise Refused("a tensor view whose offset, size and strides are not integers")
    if offset < 0 or any(n < 0 for n in size) or any(s < 1 for n, s in zip(size, stride) if n > 1):
        raise Refused(f"a tensor view with offset {offset}, size {tuple(size)}, strides {tuple(stride)} "
                      f"(sizes ≥ 0, strides ≥ 1)")
    count = 1
    for n in size:
        count *= n
    if count == 0:
        return 0
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= numel or count > numel:
        raise Refused(f"a tensor view of size {tuple(size)} (offset {offset}, strides {tuple(stride)}) "
                      f"beyond its storage of {numel} elements")
    return count


class RestrictedUnpickler(SafeUnpickler):
    """Admits only the globals of EDM/ECT snapshots, each replaced by a recording function of ours."""

    what = "EDM snapshot"
    new_types = (ModuleDictRecord,)
    build_types = (ModuleDictRecord, DtypeRecord)

    def __init__(self, data, budget_bytes=None):
        self.allowed = {
            ("collections", "OrderedDict"): self._ordered_dict,
            ("builtins", "getattr"): self._bound_method,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch.storage", "_load_from_bytes"): self._load_storage,
            ("torch.nn.modules.container", "ModuleDict"): ModuleDictRecord,
            ("torch_utils.persistence", "_reconstruct_persistent_obj"): self._reconstruct_persistent_obj,
            ("numpy", "dtype"): self._numpy_dtype,
            ("numpy.core.multiarray", "scalar"): self._numpy_scalar,
            ("numpy._core.multiarray", "scalar"): self._numpy_scalar,
        }
        super().__init__(data)
        self.records = 0
        self.budget = (len(data) if budget_bytes is None else budget_bytes) + MAX_MATERIALISED_SLACK

    def _reconstruct_persistent_obj(self, meta):
        """`torch_utils.persistence._reconstruct_persistent_obj`: records, never executes."""
        if type(meta) is not dict or meta.get("type") != "class" or type(meta.get("state")) is not dict:
            raise Refused("a persistent object without a class state")
        if type(meta.get("class_name")) is not str:
            raise Refused("a persistent object whose class name is not a string")
        self.records += 1
        if self.records > MAX_RECORDS:
            raise Refused(f"over {MAX_RECORDS} persistent objects")
        return PersistentRecord(meta["class_name"], meta["state"])

    def _ordered_dict(self, *args):
        """`collections.OrderedDict()`, or of one plain container (never iterating a tensor or record)."""
        if len(args) > 1 or (args and type(args[0]) not in (list, tuple, dict, collections.OrderedDict)):
            raise Refused("an OrderedDict built from something other than a plain container")
        return collections.OrderedDict(*args)

    def _bound_method(self, obj, name):
        """`builtins.getattr`: only on a record this reader built, with a plain string name."""
        if type(obj) is not PersistentRecord or type(name) is not str:
            raise Refused("getattr on something other than a recorded persistent object")
        return BoundMethodRecord(obj, name)

    def _load_storage(self, data):
        return read_legacy_storage(data)

    def _rebuild_tensor(self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
        if type(storage) is not StorageRecord:
            raise Refused("a tensor built from something other than a storage")
        count = check_view(storage.flat.numel(), offset, size, stride)
        self.budget -= count * storage.flat.element_size()
        if self.budget < 0:
            raise Refused("tensors holding more bytes than the file (shared storages viewed many times)")
        if count == 0:
            return torch.empty(tuple(size), dtype=storage.flat.dtype)
        return storage.flat.as_strided(tuple(size), tuple(stride), offset).clone(memory_format=torch.contiguous_format)

    def _rebuild_parameter(self, data, requires_grad=False, hooks=None):
        if type(data) is not torch.Tensor:
            raise Refused("a parameter built from something other than a tensor")
        return torch.nn.Parameter(data, requires_grad=False)

    def build(self, inst, state):
        if type(inst) is DtypeRecord:  # numpy's dtype state: (version, byte order, ...), plain values
            if type(state) is not tuple or len(state) < 2 or state[1] not in ("<", "|", "="):
                raise Refused(f"numpy dtype {quote(inst.name)} with an unusable state (byte order)")
            return
        super().build(inst, state)

    def _numpy_dtype(self, name, align=False, copy=True):
        if type(name) is not str or name not in NUMPY_DTYPES:
            raise Refused(f"numpy dtype {quote(name)} is not a plain number type")
        return DtypeRecord(name)

    def _numpy_scalar(self, dtype, data):
        if type(dtype) is not DtypeRecord or type(data) is not bytes or len(data) != np.dtype(dtype.name).itemsize:
            raise Refused("a numpy scalar that is not a plain number")
        return np.frombuffer(data, dtype=np.dtype(dtype.name).newbyteorder("<"))[0].item()


def read_snapshot(path):
    """The unpickled object tree of an EDM `.pkl`, persistent objects as `PersistentRecord`s."""
    try:
        data = read_regular(path, MAX_MODEL_FILE_BYTES, "network file")
        return RestrictedUnpickler(data).load()
    except UntrustedFileError as e:
        raise UsageError(str(e)) from None
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RuntimeError, MemoryError, UnicodeDecodeError, OverflowError, struct.error) as e:
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        if isinstance(e, Refused):
            raise UsageError(f"{path}: {detail}") from None
        raise UsageError(f"{path}: not a readable EDM pickle ({detail})") from None


# --- from records to a state_dict ----------------------------------------------
def _state_of(record, where):
    if type(record) is PersistentRecord:
        return record.state
    if type(record) is ModuleDictRecord:
        return record.__dict__
    raise UsageError(f"{where}: a {type(record).__name__} where a module should be")


def _named(state, key, where):
    """``state[key]`` as a mapping of plain names ({} when absent or None)."""
    value = state.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"{where}: {key} is a {type(value).__name__}, not a mapping")
    for name in value:
        if type(name) is not str or not name or "." in name:
            raise UsageError(f"{where}: {key} holds the name {quote(name)}, not a plain module name")
    return value


def walk_modules(root, path):
    """[(prefix, record, state)] of ``root`` and every module below it, in state_dict order.

    Each record may appear once (a shared or cyclic record is refused: a file could
    otherwise make 2^depth paths out of a few bytes), at most `MAX_DEPTH` deep and
    `MAX_RECORDS` in all.
    """
    out, seen, stack = [], set(), [("", root, 0)]
    while stack:
        prefix, record, depth = stack.pop()
        where = f"{path}: module {quote(prefix[:-1] or '<root>')}"
        if id(record) in seen:
            raise UsageError(f"{where} appears twice in the network (shared or cyclic records)")
        if depth > MAX_DEPTH or len(seen) >= MAX_RECORDS:
            raise UsageError(f"{where}: modules nested over {MAX_DEPTH} deep or over {MAX_RECORDS} in all")
        seen.add(id(record))
        state = _state_of(record, where)
        out.append((prefix, record, state))
        children = [(n, c) for n, c in _named(state, "_modules", where).items() if c is not None]
        stack.extend((f"{prefix}{name}.", child, depth + 1) for name, child in reversed(children))
    return out


def collect_state_dict(record, prefix="", path="network"):
    """The `state_dict` (parameters, then persistent buffers, then children) of a recorded module."""
    out = collections.OrderedDict()
    for module_prefix, _, state in walk_modules(record, path):
        where = f"{path}: module {quote(module_prefix[:-1] or '<root>')}"
        skip = state.get("_non_persistent_buffers_set") or set()
        if not isinstance(skip, (set, frozenset)) or not all(type(n) is str for n in skip):
            raise UsageError(f"{where}: _non_persistent_buffers_set is not a set of names")
        for group in ("_parameters", "_buffers"):
            for name, value in _named(state, group, where).items():
                if value is None or name in skip:
                    continue
                if type(value) not in (torch.Tensor, torch.nn.Parameter):
                    raise UsageError(f"{where}: {quote(name)} is a {type(value).__name__}, not a tensor")
                out[prefix + module_prefix + name] = value.detach()
    return out


def _find_network(obj, path):
    """The recorded network of a snapshot dict (its ``ema``) or of a bare pickled network."""
    if isinstance(obj, dict) and "ema" in obj:
        obj = obj["ema"]
    if not isinstance(obj, PersistentRecord):
        raise UsageError(f"{path}: no network inside (expected an EDM snapshot with 'ema' or a pickled network)")
    return obj


def _unsupported(name, path):
    what = UNSUPPORTED.get(name, f"network class {quote(name)}")
    return UsageError(f"{path}: {what} is not supported (EDMPrecond/ECMPrecond around SongUNet only)")


# --- from shapes to the SongUNet configuration -----------------------------------
MAX_TAPS = 8  # a resampling filter of more taps, or taps over 64, is not one SongUNet builds


def _taps_from_filter(f, path):
    """Recover the 1-D taps f from f⊗f/(Σf)² (first row ∝ f), as small integers; refuse anything else."""
    bad = UsageError(f"{path}: a resample_filter that is not the normalised outer product of small integer taps")
    if f.dim() != 4 or f.shape[:2] != (1, 1) or f.shape[2] != f.shape[3] or not 1 <= f.shape[2] <= MAX_TAPS:
        raise bad
    f = f.double()[0, 0]
    if not bool(torch.isfinite(f).all()) or not f[0, 0] > 0:
        raise bad
    taps = (f[0] / f[0, 0]).tolist()
    ints = [int(round(t)) for t in taps]
    if any(abs(t - i) > 1e-3 or not 1 <= i <= 64 for t, i in zip(taps, ints)):
        raise bad
    want = torch.tensor(ints, dtype=torch.float64)
    if not torch.allclose(f, torch.outer(want, want) / want.sum() ** 2, rtol=1e-3, atol=0):
        raise bad
    return ints


def _res(name):
    """The resolution of an ``RxR_...`` block name, or None."""
    head = name.split("_", 1)[0]
    parts = head.split("x")
    if len(parts) == 2 and parts[0] == parts[1] and parts[0].isdigit() and len(parts[0]) <= 5:
        return int(parts[0])
    return None


def infer_song_unet_config(sd, path):
    """SongUNet keyword arguments from a state_dict's keys and shapes (checked: all positive, bounded)."""

    def get(key, dim):
        if key not in sd:
            raise UsageError(f"{path}: unrecognised network layout (no {quote(key)})")
        if sd[key].dim() != dim or 0 in sd[key].shape:
            raise UsageError(f"{path}: {quote(key)} has shape {tuple(sd[key].shape)} (a {dim}-d non-empty weight)")
        return sd[key]

    enc = {k.split(".")[1] for k in sd if k.startswith("enc.") and k.count(".") >= 2}
    if not enc or any(_res(n) is None for n in enc):
        raise UsageError(f"{path}: unrecognised network layout (no encoder blocks named like 16x16_block0)")
    resolutions = sorted({_res(n) for n in enc}, reverse=True)
    res0 = resolutions[0]
    if res0 > MAX_IMAGE_SIZE or res0 & (res0 - 1) or res0 < 1:
        raise UsageError(f"{path}: image size {res0} (a power of two up to {MAX_IMAGE_SIZE})")
    conv0 = get(f"enc.{res0}x{res0}_conv.weight", 4)
    model_channels, in_channels = conv0.shape[0], conv0.shape[1]
    num_blocks = len({n for n in enc if n.startswith(f"{res0}x{res0}_block")})
    if num_blocks < 1:
        raise UsageError(f"{path}: unrecognised network layout (no enc.{res0}x{res0}_block0)")
    channel_mult, attn = [], []
    for res in resolutions:
        last = get(f"enc.{res}x{res}_block{num_blocks - 1}.conv1.weight", 4)
        if last.shape[0] % model_channels:
            raise UsageError(f"{path}: width {last.shape[0]} at {res}x{res} is not a multiple of {model_channels}")
        channel_mult.append(last.shape[0] // model_channels)
        if f"enc.{res}x{res}_block0.qkv.weight" in sd:
            attn.append(res)
    layer0 = get("map_layer0.weight", 2)
    noise_channels, emb_channels = layer0.shape[1], layer0.shape[0]
    filters = [v for k, v in sd.items() if k.endswith("resample_filter")]
    dec_aux = [k for k in sd if k.startswith("dec.") and "_aux_norm" in k]
    label = sd.get("map_label.weight")
    augment = sd.get("map_augment.weight")
    return dict(
        img_resolution=res0,
        in_channels=in_channels,
        out_channels=get(f"dec.{res0}x{res0}_aux_conv.weight", 4).shape[0],
        label_dim=label.shape[-1] if label is not None and label.dim() == 2 else 0,
        augment_dim=augment.shape[-1] if augment is not None and augment.dim() == 2 else 0,
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        channel_mult_emb=max(emb_channels // model_channels, 1),
        num_blocks=num_blocks,
        attn_resolutions=tuple(attn),
        embedding_type="fourier" if "map_noise.freqs" in sd else "positional",
        channel_mult_noise=max(noise_channels // model_channels, 1),
        encoder_type="residual" if any("_aux_residual" in n for n in enc)
        else "skip" if any("_aux_skip" in n for n in enc) else "standard",
        decoder_type="skip" if len(dec_aux) > 2 else "standard",
        resample_filter=tuple(_taps_from_filter(filters[0], path)) if filters else (1, 1),
    )


MAX_SIZE_RATIO = 16  # the network a file describes may have at most this many times the weights it holds


def parameter_bound(config):
    """An upper bound on the parameter count of ``SongUNet(**config)``: every block counted at its widest."""
    mc, mult, nb = config["model_channels"], config["channel_mult"], config["num_blocks"]
    w, levels = mc * max(mult), len(mult)
    emb, noise = mc * config["channel_mult_emb"], mc * config["channel_mult_noise"]
    block = 2 * w * w * 9 + w * w * 9 + 2 * emb * w + 2 * w * w + 4 * w * w + 12 * w  # conv0, conv1, affine, skip, attn
    blocks = levels * (2 * nb + 3) + 2
    aux = levels * 4 * (max(config["in_channels"], config["out_channels"], w) * w * 9 + w)
    mapping = noise * emb + emb * emb + (config["label_dim"] + config["augment_dim"] + 4) * emb
    return blocks * block + aux + mapping + (config["in_channels"] + config["out_channels"] + 1) * w * 9


def _check_size(config, sd, path):
    """Refuse a configuration whose network would be far larger than the weights the file holds."""
    held = sum(v.numel() for v in sd.values())
    bound = parameter_bound(config)
    if bound > MAX_SIZE_RATIO * held + (1 << 20):
        raise UsageError(f"{path}: the inferred network (up to {bound} parameters, {config['model_channels']} "
                         f"channels, {len(config['channel_mult'])} levels) is far larger than the {held} "
                         f"weights the file holds")


def _arch_of(config):
    """'ddpmpp' or 'ncsnpp' when the configuration is one the --arch flag can express."""
    for arch, settings in ARCH_CONFIGS.items():
        if all(config[k] == (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in settings.items()):
            if config["channel_mult_emb"] == 4 and config["in_channels"] == config["out_channels"] == 3:
                return arch
    return None


def _first_block_attr(modules, name, default):
    """A plain attribute (e.g. ``dropout``) of the first UNetBlock among ``modules`` (`walk_modules`)."""
    for _, record, state in modules:
        if type(record) is PersistentRecord and record.class_name == "UNetBlock" and name in state:
            return state[name]
    return default


def load_edm_pickle(path):
    """Read an EDM-format `.pkl` safely; return (our network in eval mode, its script flags)."""
    net = _find_network(read_snapshot(path), path)
    precond = None
    if net.class_name in PRECONDS:
        precond, net = net, _named(net.state, "_modules", path).get("model")
        if type(net) is not PersistentRecord:
            raise UsageError(f"{path}: {precond.class_name} holds no network")
    elif net.class_name in UNSUPPORTED:
        raise _unsupported(net.class_name, path)
    if net.class_name != "SongUNet":
        raise _unsupported(net.class_name, path)

    modules = walk_modules(net, path)
    sd = collect_state_dict(net, path=path)
    for key, value in sd.items():
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            raise UsageError(f"{path}: {quote(key)} is not a finite floating-point tensor ({value.dtype})")
    config = infer_song_unet_config(sd, path)
    _check_size(config, sd, path)
    arch = _arch_of(config)
    if arch is None:
        raise UsageError(f"{path}: a SongUNet configuration --arch cannot express ({config['embedding_type']} "
                         f"embedding, {config['encoder_type']} encoder, {config['decoder_type']} decoder)")
    if config["label_dim"] not in (0, 10):
        raise UsageError(f"{path}: {config['label_dim']} classes; only 10-class (CIFAR-10) or unconditional")
    dropout = finite_float(_first_block_attr(modules, "dropout", 0.0), "dropout", path, below=1)
    label_dropout = finite_float(net.state.get("label_dropout") or 0.0, "label_dropout", path, below=1)
    model = SongUNet(**config, dropout=dropout, label_dropout=label_dropout)
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as e:
        first = quote(str(e).splitlines()[0] if str(e) else type(e).__name__, 300)
        raise UsageError(f"{path}: weights do not fit the inferred SongUNet ({first})") from None
    model.eval()

    pstate = precond.state if precond is not None else {}
    sigma_data = finite_float(pstate.get("sigma_data", 0.5), "sigma_data", path, positive=True)
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
        sigma_min = finite_float(pstate.get("sigma_min", 0.002), "sigma_min", path, positive=True)
        flags.update(training_mode="consistency_training", sigma_min=sigma_min)
    return model, flags
