"""A corpus of hostile and malformed model files, written byte by byte (pickle opcodes, msgpack, zip).

`CASES` maps a case id to (reader, builder, fragment): ``builder(tmp_path)`` writes the file
and returns its path, ``reader`` names the loader it is aimed at (see `READERS` in
test_untrusted_files.py) and ``fragment`` is a part of the one-line error it must give.
"""

import collections
import io
import math
import os
import pickle
import struct
import sys
import types
import warnings
import zipfile

import msgpack
import numpy as np
import torch

from cm.song_unet import SongUNet


# --- pickle opcodes --------------------------------------------------------------
def glob(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def s(text):
    data = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(data)) + data


def i(n):
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def raw(data):
    return b"B" + struct.pack("<I", len(data)) + data


def tup(*items):
    return b"(" + b"".join(items) + b"t"


def call(fn, *args):
    return fn + tup(*args) + b"R"


def dict_(*pairs):
    return b"}" + (b"(" + b"".join(k + v for k, v in pairs) + b"u" if pairs else b"")


def P(body):
    return b"\x80\x02" + body + b"."


def legacy_storage(values, numel=None):
    """The legacy `torch.save(storage)` bytes `torch.storage._load_from_bytes` takes; ``numel`` may lie."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated, but it is what EDM's pickles hold
        storage = torch.tensor(values, dtype=torch.float32).storage()
    torch.save(storage, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    if numel is not None:  # the storage header after the pickles: 8 bytes of element count, then the data
        data = data[: -4 * len(values) - 8] + struct.pack("<q", numel) + data[-4 * len(values):]
    return data


def nested_stream(main):
    """A legacy torch.save stream whose object pickle is ``main`` (opcodes)."""
    head = b"".join(pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    return head + P(main) + pickle.dumps([], protocol=2)


STORAGE = call(glob("torch.storage", "_load_from_bytes"), raw(legacy_storage([1.0, 2.0, 3.0, 4.0])))
REBUILD = glob("torch._utils", "_rebuild_tensor_v2")


def view(offset, size, stride, storage=STORAGE):
    return call(REBUILD, storage, i(offset), tup(*map(i, size)), tup(*map(i, stride)), b"\x89", glob(
        "collections", "OrderedDict") + b")R")


def persistent(class_name, state):
    meta = dict_((s("type"), s("class")), (s("version"), i(6)), (s("module_src"), s("raise SystemExit(1)")),
                 (s("class_name"), s(class_name) if isinstance(class_name, str) else class_name), (s("state"), state))
    return call(glob("torch_utils.persistence", "_reconstruct_persistent_obj"), meta)


def pkl_bytes(body):
    return P(dict_((s("ema"), body)))


# --- EDM-style pickles of real (tiny) networks -----------------------------------
class Persistent:
    """Pickles as EDM's persistent objects do: _reconstruct_persistent_obj(meta)."""

    reconstruct = None

    def __init__(self, class_name, state):
        self.class_name, self.state = class_name, state

    def __reduce__(self):  # a fresh meta around the shared state: a record can hold itself (a cycle), as ECT's
        meta = dict(type="class", version=6, module_src="raise SystemExit(1)", class_name=self.class_name,
                    state=self.state)
        return (Persistent.reconstruct, (meta,))


def record(module):
    state = {"training": False, "_parameters": collections.OrderedDict(module._parameters),
             "_buffers": collections.OrderedDict(module._buffers), "_non_persistent_buffers_set": set(),
             "_modules": collections.OrderedDict((k, record(m)) for k, m in module._modules.items())}
    return Persistent(type(module).__name__, state)


def dumps_edm(obj):
    """pickle.dumps with a stand-in torch_utils.persistence (removed again)."""
    mod = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("never called")

    _reconstruct_persistent_obj.__module__ = mod.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    sys.modules.update({"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": mod})
    Persistent.reconstruct = _reconstruct_persistent_obj
    try:
        return pickle.dumps(obj, protocol=4)  # as EDM's and ECT's snapshots
    finally:
        for k, v in saved.items():
            sys.modules.pop(k) if v is None else sys.modules.__setitem__(k, v)


def tiny_net():
    torch.manual_seed(0)
    return SongUNet(img_resolution=8, in_channels=3, out_channels=3, model_channels=8, channel_mult=[1, 1],
                    num_blocks=1, attn_resolutions=[], channel_mult_noise=1, resample_filter=[1, 1])


def ecm(net_record, **attrs):
    state = {"training": False, "_parameters": {}, "_buffers": {}, "_modules": {"model": net_record},
             "sigma_data": 0.5, "sigma_min": 0.002, **attrs}
    return {"ema": Persistent("ECMPrecond", state)}


def net_with(edit):
    rec = record(tiny_net())
    edit(rec)
    return {"ema": rec}


def chain(depth, fanout):
    """``depth`` levels of records, each holding the next ``fanout`` times (the same object)."""
    node = Persistent("Leaf", {"_modules": {}})
    for _ in range(depth):
        node = Persistent("Level", {"_modules": {f"c{k}": node for k in range(fanout)}})
    return Persistent("SongUNet", {"_modules": {"enc": node}})


def fake_net(shapes):
    """A SongUNet record holding exactly ``shapes`` (name → shape) as zero weights."""
    root = Persistent("SongUNet", {"_modules": {}, "_parameters": {}})
    for key, shape in shapes.items():
        node, *parts, leaf = [root] + key.split(".")
        for part in parts:
            node = node.state["_modules"].setdefault(part, Persistent("M", {"_modules": {}, "_parameters": {}}))
        node.state["_parameters"][leaf] = torch.zeros(shape)
    return {"ema": root}


def edited(key, value):
    def edit(rec):
        node, *parts, leaf = [rec] + key.split(".")
        for part in parts:
            node = node.state["_modules"][part]
        node.state["_buffers" if leaf == "resample_filter" else "_parameters"][leaf] = value
    return edit


# --- .pt files ------------------------------------------------------------------------
def torch_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def deflated(data):
    """The same torch zip with every member deflated."""
    src, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    return out.getvalue()


# --- msgpack / Flax -------------------------------------------------------------------
def ext_array(shape, dtype, data):
    return msgpack.ExtType(1, msgpack.packb([list(shape), dtype, data]))


def flax(tree, singles=False):
    if singles:  # the single modules of an NCSN++ tree, Conv_1 with a real kernel
        base = {n: {} for n in ("GaussianFourierProjection_0", "Dense_0", "Dense_1", "Conv_0", "GroupNorm_0")}
        base["Conv_1"] = {"kernel": ext_array([3, 3, 8, 3], "float32", b"\0" * 4 * 216)}
        tree = {**base, **tree}
    return msgpack.packb({"params_ema": tree}, use_bin_type=True)


def deep_tree(depth):
    node = {"w": ext_array([1], "float32", b"\0" * 4)}
    for _ in range(depth):
        node = {"x": node}
    return node


def golden_flax_with(module, name, value):
    """The golden JAX checkpoint (tests/data/jax) with one more entry under ``module``."""
    from cm.formats.flax_msgpack import read_msgpack_tree

    tree = read_msgpack_tree(os.path.join(os.path.dirname(__file__), "data", "jax", "checkpoint_80"))
    for key in ("params_ema", "params", "target_params"):
        tree[key][module][name] = value
    return msgpack.packb(tree, use_bin_type=True)


def npz_bytes(**arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def npz_lying(shape):
    """An .npz whose arr_0 header declares ``shape`` (uint8) over 16 bytes of data."""
    header = {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("arr_0.npy", buf.getvalue() + b"\0" * 16)
    return out.getvalue()


def cifar_archive(meta_pickle):
    """A cifar-10-python.tar.gz whose batches.meta is ``meta_pickle``."""
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        info.size = len(meta_pickle)
        tar.addfile(info, io.BytesIO(meta_pickle))
    return out.getvalue()


def file(data, name="model.pkl"):
    def build(tmp_path):
        path = tmp_path / name
        path.write_bytes(data() if callable(data) else data)
        return path
    return build


def fifo(name):
    def build(tmp_path):
        os.mkfifo(tmp_path / name)
        return tmp_path / name
    return build


def symlink(target, name):
    def build(tmp_path):
        os.symlink(target, tmp_path / name)
        return tmp_path / name
    return build


def sparse(size, name):
    def build(tmp_path):
        with open(tmp_path / name, "wb") as f:
            f.truncate(size)
        return tmp_path / name
    return build


NAME_4MIB = "\x1b[2J\x1b]0;owned\x07\u202eevil" + "A" * (4 << 20)
WIDE = {"enc.8x8_conv.weight": (256, 3, 3, 3), "enc.8x8_block0.conv1.weight": (256, 1, 1, 1),
        "map_layer0.weight": (256, 256), "dec.8x8_aux_conv.weight": (3, 1, 1, 1)}
BIG = 9 << 30  # over the 8 GiB budget of a model file (sparse: takes no disk)

CASES = {
    # process tampering through the allow-list (issue 21, point 1)
    "nested-global-tamper": ("pkl", file(pkl_bytes(call(glob("torch.storage", "_load_from_bytes"), raw(
        nested_stream(REBUILD))) + tup(b"N", dict_((s("__defaults__"), tup(b"\x88")))) + b"b")),
        "'torch._utils._rebuild_tensor_v2' (not on the tensor storage allow-list)"),
    "nested-bytearray": ("pkl", file(pkl_bytes(call(glob("torch.storage", "_load_from_bytes"), raw(
        nested_stream(call(glob("builtins", "bytearray"), i(1 << 40))))))), "'builtins.bytearray'"),
    "build-on-allowed-function": ("pkl", file(P(REBUILD + tup(b"N", dict_((s("__defaults__"), tup(b"\x88"))))
                                                + b"b")), "setting the state of a method"),
    "build-on-allowed-class": ("pkl", file(P(glob("torch.nn.modules.container", "ModuleDict") + dict_() + b"b")),
                               "setting the state of a type"),
    "build-on-dtype": ("pkl", file(P(call(glob("numpy", "dtype"), s("f8"), b"\x89\x88") + tup(i(3), s(">"))
                                     + b"b")), "unusable state"),
    "build-twice": ("pkl", file(P(glob("torch.nn.modules.container", "ModuleDict") + b")\x81" + dict_() + b"b"
                                  + dict_() + b"b")), "twice"),
    "build-slotstate": ("pkl", file(P(glob("torch.nn.modules.container", "ModuleDict") + b")\x81" + tup(
        b"N", dict_((s("training"), b"\x88"))) + b"b")), "not a dict of plain names"),
    "reduce-on-record": ("pkl", file(P(persistent("X", dict_()) + tup() + b"R")), "allow-listed function"),
    "getattr-dunder-of-global": ("pkl", file(P(call(glob("builtins", "getattr"), REBUILD, s("__globals__")))),
                                 "getattr on something other"),
    "extra-evil-global": ("pkl", file(P(call(glob("os", "system"), s("echo pwned")))), "'os.system'"),
    "meta-tensor-global": ("pkl", file(pkl_bytes(call(glob("torch._utils", "_rebuild_meta_tensor_no_storage"), s(
        "float32"), tup(i(1 << 30)), tup(i(1)), b"\x89"))), "'torch._utils._rebuild_meta_tensor_no_storage'"),
    "numpy-object-dtype": ("pkl", file(P(call(glob("numpy", "dtype"), s("O"), b"\x89\x88"))), "'O'"),
    # heap memory in the weights (point 2)
    "view-longer-than-storage": ("pkl", file(pkl_bytes(view(0, [1000], [1]))), "beyond its storage"),
    "view-offset-past-end": ("pkl", file(pkl_bytes(view(3, [4], [1]))), "beyond its storage"),
    "view-negative-stride": ("pkl", file(pkl_bytes(view(3, [4], [-1]))), "strides ≥ 1"),
    "storage-declares-more": ("pkl", file(pkl_bytes(call(glob("torch.storage", "_load_from_bytes"), raw(
        legacy_storage([1.0, 2.0], numel=1 << 30))))), "1073741824 in its header"),
    # memory and time bombs (point 3)
    "stride0-2gib": ("pkl", file(pkl_bytes(view(0, [1 << 29], [0]))), "strides ≥ 1"),
    "memo-index-2g": ("pkl", file(b"\x80\x02Nr\xff\xff\xff\x7f."), "no network inside"),
    "views-over-budget": ("pkl", file(lambda: pkl_bytes(call(glob("torch.storage", "_load_from_bytes"), raw(
        legacy_storage([0.0] * 65536))) + b"\x94" + b"(" + b"".join(view(0, [65536], [1], b"h\x00") for _ in
                                                              range(64)) + b"l")), "more bytes than the file"),
    "billion-laughs": ("pkl", file(lambda: dumps_edm({"ema": chain(40, 2)})), "appears twice"),
    "cycle": ("pkl", file(lambda: dumps_edm(net_with(lambda r: r.state["_modules"].__setitem__("me", r)))),
              "appears twice"),
    "deep-nesting": ("pkl", file(lambda: dumps_edm({"ema": chain(100, 1)})), "nested over 64"),
    "wide-network": ("pkl", file(lambda: dumps_edm(fake_net(WIDE))), "far larger than"),
    "image-size-32768": ("pkl", file(lambda: dumps_edm(fake_net({"enc.32768x32768_conv.weight": (8, 3, 1, 1)}))),
                         "image size 32768"),
    "big-sparse-pkl": ("pkl", sparse(BIG, "model.pkl"), "over the"),
    "fifo-pkl": ("pkl", fifo("model.pkl"), "a FIFO, not a regular"),
    "symlink-dev-zero": ("pkl", symlink("/dev/zero", "model.pkl"), "a character device"),
    # terminal injection (point 4)
    "class-name-escape-4mib": ("pkl", file(lambda: P(dict_((s("ema"), persistent(NAME_4MIB, dict_()))))),
                               "network class '\\x1b[2J"),
    "global-name-escape": ("pkl", file(P(glob("\x1b[2Jmod\u202e", "x"))), "'\\x1b[2Jmod\\u202e.x'"),
    # tracebacks that must be one line (point 5)
    "empty-network": ("pkl", file(lambda: dumps_edm({"ema": Persistent("SongUNet", {})})),
                      "unrecognised network layout"),
    "zero-channels": ("pkl", file(lambda: dumps_edm(fake_net({"enc.8x8_conv.weight": (0, 3, 3, 3)}))),
                      "non-empty"),
    "inf-resample-filter": ("pkl", file(lambda: dumps_edm(net_with(edited(
        "enc.4x4_down.conv0.resample_filter", torch.full((1, 1, 2, 2), math.inf))))), "resample_filter"),
    "nan-weight": ("pkl", file(lambda: dumps_edm(net_with(edited("map_layer0.weight", torch.full(
        (32, 8), math.nan))))), "not a finite"),
    "parameters-list": ("pkl", file(lambda: dumps_edm(net_with(lambda r: r.state.__setitem__(
        "_parameters", [1, 2])))), "not a mapping"),
    "int-parameter-name": ("pkl", file(lambda: dumps_edm(net_with(lambda r: r.state.__setitem__(
        "_parameters", {5: torch.zeros(1)})))), "not a plain module name"),
    "sigma-data-none": ("pkl", file(lambda: dumps_edm(ecm(record(tiny_net()), sigma_data=None))),
                        "sigma_data is a NoneType"),
    "dropout-list": ("pkl", file(lambda: dumps_edm(net_with(lambda r: r.state["_modules"]["enc"].state[
        "_modules"]["8x8_block0"].state.__setitem__("dropout", [0.1])))), "dropout is a list"),
    "sigma-min-negative": ("pkl", file(lambda: dumps_edm(ecm(record(tiny_net()), sigma_min=-0.002))),
                           "sigma_min is -0.002"),
    "sigma-min-nan": ("pkl", file(lambda: dumps_edm(ecm(record(tiny_net()), sigma_min=math.nan))), "sigma_min is nan"),
    # .pt files
    "pt-bytearray": ("pt", file(lambda: torch_bytes({"w": torch.zeros(2), "b": bytearray(8)}), "model.pt"),
                     "'builtins.bytearray'"),
    "pt-counter": ("pt", file(lambda: torch_bytes({"w": collections.Counter("ab")}), "model.pt"),
                   "'collections.Counter'"),
    "pt-deflate": ("pt", file(lambda: deflated(torch_bytes({"w": torch.zeros(1 << 16)})), "model.pt"), "compressed"),
    "pt-sparse": ("pt", file(lambda: torch_bytes({"w": torch.eye(3).to_sparse()}), "model.pt"),
                  "refusing the global"),
    "pt-fifo": ("pt", fifo("model000010.pt"), "a FIFO"),
    "pt-big-sparse-file": ("pt", sparse(BIG, "model.pt"), "over the"),
    # Flax msgpack (also under a .pt name: dispatched by content)
    "msgpack-index-1e12": ("jax", file(flax({"ResnetBlockBigGANpp_1000000000000": {}}), "model.pt"),
                           "unknown module"),
    "msgpack-index-gap": ("jax", file(flax({"ResnetBlockBigGANpp_999999": {}}), "ckpt"), "ResnetBlockBigGANpp_0"),
    "msgpack-map-4g": ("jax", file(b"\xdf\xff\xff\xff\xff\xa1a", "ckpt"), "not a msgpack file"),
    "msgpack-shape-lie": ("jax", file(flax({"Conv_0": {"kernel": ext_array([1 << 20, 1 << 20], "float32", b"\0" * 4)}},
                                           singles=True), "ckpt"), "declared in"),
    "msgpack-zero-nf": ("jax", file(flax({"Conv_0": {"kernel": ext_array([3, 3, 3, 0], "float32", b"")}},
                                         singles=True), "ckpt"), "non-empty"),
    "msgpack-40-levels": ("jax", file(flax({f"Downsample_{k}": {} for k in range(40)}, singles=True), "ckpt"),
                          "41 resolution levels"),
    "msgpack-deep-tree": ("jax", file(lambda: golden_flax_with("Conv_0", "extra", deep_tree(500)), "ckpt"),
                          "nested over 64 deep"),
    "msgpack-key-escape": ("jax", file(flax({"\x1b[31mFoo_0": {}}), "ckpt"), "\\x1b[31mFoo_0"),
    # the CIFAR-10 archive
    "cifar-huge-ndarray": ("cifar", file(cifar_archive(P(call(glob("numpy.core.multiarray", "_reconstruct"), glob(
        "numpy", "ndarray"), tup(i(1 << 40)), s("b")))), "c.tar.gz"), "not numpy's own"),
    "cifar-build-on-function": ("cifar", file(cifar_archive(P(glob("_codecs", "encode") + tup(b"N", dict_((s(
        "__defaults__"), tup(b"\x88")))) + b"b")), "c.tar.gz"), "setting the state of a function"),
    "cifar-build-on-numpy-dtype": ("cifar", file(cifar_archive(P(call(glob("numpy", "dtype"), s("u1"), b"\x89\x88")
                                                                + tup(i(3), s(">")) + b"b")), "c.tar.gz"),
                                   "unusable state"),
    "cifar-fifo": ("cifar", fifo("c.tar.gz"), "a FIFO"),
    # .npz inputs
    "npz-header-lie": ("npz", file(npz_lying([1 << 40, 32, 32, 3]), "x.npz"), "declares"),
    "npz-object-array": ("npz", file(lambda: npz_bytes(arr_0=np.array([None, 1], dtype=object)), "x.npz"),
                         "declares a object"),
    "npz-fifo": ("npz", fifo("x.npz"), "a FIFO"),
}
