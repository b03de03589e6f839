"""Read the official CIFAR-10 python archive and write it as folders of PNGs.

The archive (``cifar-10-python.tar.gz``) holds ``cifar-10-batches-py/`` with
``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta``: pickled
dicts whose ``data`` is uint8 [n, 3072] (three 32x32 planes R, G, B per row),
``labels`` a list of class ids, and ``label_names`` the ten class names. The pickles
are read with an unpickler that can build nothing but plain containers and numpy
arrays (`cm.formats.untrusted.SafeUnpickler`; arrays checked against their bytes, numpy's
own objects never modified), so a tampered archive cannot run code or change the process;
the archive must be a regular file, with bounded members and bytes. Output: ``<class>_<index>.png``, the
file-name convention ``cm.image_datasets`` parses for class labels.
"""

import codecs
import os
import shutil
import tarfile
import tempfile

import numpy as np
from tqdm import tqdm

from .untrusted import Refused, SafeUnpickler, UntrustedFileError, open_regular, quote, safe_text

ARCHIVE_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
NUM_CLASSES = 10
IMAGE_SIZE = 32
INDEX_DIGITS = 5  # 50000 train images -> 00000 .. 49999


class CifarArchiveError(ValueError):
    """The archive is missing or malformed; the message names what is wrong, in one line."""


MAX_MEMBER_BYTES = 256 << 20  # one pickled batch (the official ones: 31 MB)
MAX_ARCHIVE_MEMBERS = 64
MAX_ARCHIVE_BYTES = 1 << 30  # all members together (the official archive: 178 MB unpacked)
NUMPY_DTYPES = ("u1", "i1", "i2", "i4", "i8", "u2", "u4", "u8", "f4", "f8", "b1")


class _Dtype:
    """A numpy dtype named by the pickle (its state is checked, never applied to numpy's own dtype)."""

    def __init__(self, name):
        self.name = name


class _Array:
    """A pickled ndarray: `_reconstruct` makes it empty, BUILD fills it once from (shape, dtype, bytes)."""

    def __init__(self):
        self.array = None


_NDARRAY = object()  # what the pickle's ``numpy.ndarray`` stands for: only an argument of _reconstruct


def _make_dtype(name, align=False, copy=True):
    if isinstance(name, bytes):
        name = name.decode("latin1")
    if type(name) is not str or name.lstrip("<|=") not in NUMPY_DTYPES:
        raise Refused(f"numpy dtype {quote(name)} is not a plain number type")
    return _Dtype(name.lstrip("<|="))


def _reconstruct(cls, shape, typecode):
    if cls is not _NDARRAY or shape != (0,):
        raise Refused("an ndarray reconstruction that is not numpy's own (ndarray, (0,), ...)")
    return _Array()


def _array_from(raw, dtype, shape, where="array"):
    if type(dtype) is not _Dtype or type(shape) is not tuple or not all(type(n) is int and n >= 0 for n in shape):
        raise Refused("an array whose dtype or shape is not plain")
    if isinstance(raw, str):  # Python 2 pickles: the raw bytes as a latin-1 string
        raw = raw.encode("latin1")
    dt = np.dtype(dtype.name).newbyteorder("<") if dtype.name[0] != "b" else np.dtype(dtype.name)
    count = 1
    for n in shape:
        count *= n
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != count * dt.itemsize:
        raise Refused(f"an array of shape {shape} whose data is not {count * dt.itemsize} bytes")
    return np.frombuffer(bytes(raw), dtype=dt).reshape(shape)


def _latin1(text, encoding):
    """`_codecs.encode(str, "latin1")`, as Python 3 pickles bytes in protocol 2; no other codec."""
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise Refused("_codecs.encode of something other than a latin1 string")
    return codecs.encode(text, "latin1")


def _frombuffer(buf, dtype, shape, order):
    return _array_from(buf, dtype, shape)


def _scalar(dtype, data):
    return _array_from(data, dtype, ())[()]


class _DataOnlyUnpickler(SafeUnpickler):
    """Builds dicts, lists, bytes, numbers and numpy arrays; refuses every other global."""

    allowed = {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _make_dtype,
               # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(str, "latin1"): a pure
               # data transform (Python 2's own pickles use plain string opcodes instead).
               ("_codecs", "encode"): _latin1}
    for _mod in ("numpy.core", "numpy._core"):
        allowed.update({(_mod + ".multiarray", "_reconstruct"): _reconstruct,
                        (_mod + ".multiarray", "scalar"): _scalar, (_mod + ".numeric", "_frombuffer"): _frombuffer})
    del _mod
    build_types = (_Array, _Dtype)
    what = "CIFAR-10 pickle"

    def build(self, inst, state):
        if type(inst) is _Dtype:  # (version, byte order, ...)
            if type(state) is not tuple or len(state) < 2 or state[1] not in ("<", "|", "=", b"<", b"|", b"="):
                raise Refused(f"numpy dtype {quote(inst.name)} with an unusable state (byte order)")
            return
        if type(state) is not tuple or len(state) != 5 or state[3] is not False:
            raise Refused("an ndarray state that is not (version, shape, dtype, False, data)")
        inst.array = _array_from(state[4], state[2], state[1])


def _plain(value):
    """The unpickled tree with every `_Array` replaced by its array (top level and in lists)."""
    if type(value) is _Array:
        if value.array is None:
            raise Refused("an ndarray without data")
        return value.array
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _one_line(e):
    return safe_text(e) or type(e).__name__


def _unpickle(data, where):
    try:
        # encoding="bytes": the official pickles were written by Python 2.
        obj = _plain(_DataOnlyUnpickler(data, encoding="bytes").load())
    except Exception as e:  # any unpickling failure means a bad member
        raise CifarArchiveError(f"{where}: not a readable CIFAR-10 pickle ({_one_line(e)})") from None
    if not isinstance(obj, dict):
        raise CifarArchiveError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    # Python 2 pickles give bytes keys; accept str keys too.
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _members(tar, archive):
    """{name: TarInfo} of the archive, reading at most `MAX_ARCHIVE_MEMBERS` headers and bytes in all."""
    members, total = {}, 0
    while True:
        info = tar.next()
        if info is None:
            return members
        total += info.size
        if len(members) >= MAX_ARCHIVE_MEMBERS or total > MAX_ARCHIVE_BYTES:
            raise CifarArchiveError(f"{archive}: over {MAX_ARCHIVE_MEMBERS} members or {MAX_ARCHIVE_BYTES} bytes "
                                    f"(not the official cifar-10-python.tar.gz)")
        members[info.name] = info


def _member(tar, members, name, archive):
    path = f"{ARCHIVE_DIR}/{name}"
    info = members.get(path)
    if info is None:
        raise CifarArchiveError(f"{archive}: missing {path} (expected the official cifar-10-python.tar.gz)")
    if not info.isfile():
        raise CifarArchiveError(f"{archive}: {path} is not a regular file")
    if info.size > MAX_MEMBER_BYTES:
        raise CifarArchiveError(f"{archive}: {path} holds {info.size} bytes (at most {MAX_MEMBER_BYTES})")
    return _unpickle(tar.extractfile(info).read(), f"{archive}: {path}")


def _label_names(meta, where):
    names = meta.get("label_names")
    if not isinstance(names, (list, tuple)) or len(names) != NUM_CLASSES:
        raise CifarArchiveError(f"{where}: 'label_names' must be a list of {NUM_CLASSES} class names")
    out = [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
    for n in out:
        if not isinstance(n, str) or not n or "_" in n or "/" in n or "\\" in n or n.startswith("."):
            raise CifarArchiveError(f"{where}: unusable class name {quote(n)} in 'label_names'")
    if len(set(out)) != len(out):
        raise CifarArchiveError(f"{where}: duplicate class names in 'label_names'")
    return out


def _batch(d, where):
    """uint8 NHWC images [n, 32, 32, 3] and int64 labels [n] from one batch dict."""
    data, labels = d.get("data"), d.get("labels")
    if data is None or labels is None:
        keys = ", ".join(quote(str(k), 40) for k in list(d)[:10])
        raise CifarArchiveError(f"{where}: missing 'data' or 'labels' (has {keys})")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        got = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise CifarArchiveError(f"{where}: 'data' must be uint8 [n, 3072], got {got}")
    try:
        labels = np.asarray(labels)
    except Exception:
        labels = np.asarray([None])
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise CifarArchiveError(
            f"{where}: 'labels' must be {data.shape[0]} integers, got {labels.dtype} {list(labels.shape)}"
        )
    if data.shape[0] == 0 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise CifarArchiveError(f"{where}: empty batch or label outside 0..{NUM_CLASSES - 1}")
    # Each row is three 32x32 planes (R, G, B): CHW -> HWC.
    images = data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def read_cifar10(archive):
    """Validate and read the archive: {"label_names": [10 str], "train": (x, y), "test": (x, y)}.

    x: uint8 [n, 32, 32, 3]; y: int64 [n]. Raises CifarArchiveError on any problem.
    """
    archive = os.fspath(archive)
    if not os.path.lexists(archive):
        raise CifarArchiveError(f"archive not found: {archive}")
    try:
        with open_regular(archive, MAX_ARCHIVE_BYTES, "archive") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            members = _members(tar, archive)
            meta = _member(tar, members, META, archive)
            out = {"label_names": _label_names(meta, f"{archive}: {ARCHIVE_DIR}/{META}")}
            for split, names in (("train", TRAIN_BATCHES), ("test", (TEST_BATCH,))):
                parts = [_batch(_member(tar, members, n, archive), f"{archive}: {ARCHIVE_DIR}/{n}") for n in names]
                out[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    except UntrustedFileError as e:
        raise CifarArchiveError(str(e)) from None
    except tarfile.ReadError:
        raise CifarArchiveError(f"{archive}: not a readable .tar.gz archive") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CifarArchiveError(f"{archive}: not a readable .tar.gz archive ({_one_line(e)})") from None
    return out


def png_name(label_name, index):
    """``<class>_<index>.png`` with the index zero-padded."""
    return f"{label_name}_{index:0{INDEX_DIGITS}d}.png"


def _write_pngs(folder, images, labels, label_names, desc, progress):
    from PIL import Image

    for i in tqdm(range(len(images)), desc=desc, unit="img", disable=not progress):
        Image.fromarray(images[i]).save(os.path.join(folder, png_name(label_names[labels[i]], i)))


def export_pngs(data, out_dir, progress=True):
    """Write ``data`` (from ``read_cifar10``) to ``out_dir/train`` and ``out_dir/test``.

    Each split is written to a temporary folder inside ``out_dir`` and renamed when
    complete; on failure nothing is left behind (``out_dir`` too, if this created it).
    Returns {split: folder}.
    """
    out_dir = os.fspath(out_dir)
    finals = {s: os.path.join(out_dir, s) for s in ("train", "test")}
    for f in finals.values():
        if os.path.exists(f):
            raise CifarArchiveError(f"{f} already exists; remove it or choose another output folder")
    created = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    temps = {}
    try:
        for split in finals:
            temps[split] = tempfile.mkdtemp(dir=out_dir, prefix=f".{split}-partial-")
            images, labels = data[split]
            _write_pngs(temps[split], images, labels, data["label_names"], split, progress)
        for split, final in finals.items():
            os.rename(temps.pop(split), final)
    except BaseException:
        for t in temps.values():
            shutil.rmtree(t, ignore_errors=True)
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)
        raise
    return finals
