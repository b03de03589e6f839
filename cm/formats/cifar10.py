"""Read the official CIFAR-10 python archive and write it as folders of PNGs.

The archive (``cifar-10-python.tar.gz``) holds ``cifar-10-batches-py/`` with
``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta``: pickled
dicts whose ``data`` is uint8 [n, 3072] (three 32x32 planes R, G, B per row),
``labels`` a list of class ids, and ``label_names`` the ten class names. The pickles
are read with an unpickler that can build nothing but plain containers and numpy
arrays, so a tampered archive cannot run code. Output: ``<class>_<index>.png``, the
file-name convention ``cm.image_datasets`` parses for class labels.
"""

import codecs
import io
import os
import pickle
import shutil
import tarfile
import tempfile

import numpy as np
from tqdm import tqdm

ARCHIVE_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
NUM_CLASSES = 10
IMAGE_SIZE = 32
INDEX_DIGITS = 5  # 50000 train images -> 00000 .. 49999


class CifarArchiveError(ValueError):
    """The archive is missing or malformed; the message names what is wrong, in one line."""


def _numpy_globals():
    """The only globals a CIFAR pickle may reference: numpy array/dtype reconstruction."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    allowed = {}
    for mod in ("numpy.core", "numpy._core"):
        allowed[(mod + ".multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(mod + ".multiarray", "scalar")] = multiarray.scalar
        allowed[(mod + ".numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(str, "latin1"): a pure
    # data transform (Python 2's own pickles use plain string opcodes instead).
    allowed[("_codecs", "encode")] = codecs.encode
    return allowed


class _DataOnlyUnpickler(pickle.Unpickler):
    """Builds dicts, lists, bytes, numbers and numpy arrays; refuses every other global."""

    _allowed = _numpy_globals()

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _one_line(e):
    return " ".join(str(e).split()) or type(e).__name__


def _unpickle(data, where):
    try:
        # encoding="bytes": the official pickles were written by Python 2.
        obj = _DataOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # any unpickling failure means a bad member
        raise CifarArchiveError(f"{where}: not a readable CIFAR-10 pickle ({_one_line(e)})") from None
    if not isinstance(obj, dict):
        raise CifarArchiveError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    # Python 2 pickles give bytes keys; accept str keys too.
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _member(tar, name, archive):
    path = f"{ARCHIVE_DIR}/{name}"
    try:
        info = tar.getmember(path)
    except KeyError:
        raise CifarArchiveError(f"{archive}: missing {path} (expected the official cifar-10-python.tar.gz)") from None
    if not info.isfile():
        raise CifarArchiveError(f"{archive}: {path} is not a regular file")
    return _unpickle(tar.extractfile(info).read(), f"{archive}: {path}")


def _label_names(meta, where):
    names = meta.get("label_names")
    if not isinstance(names, (list, tuple)) or len(names) != NUM_CLASSES:
        raise CifarArchiveError(f"{where}: 'label_names' must be a list of {NUM_CLASSES} class names")
    out = [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
    for n in out:
        if not isinstance(n, str) or not n or "_" in n or "/" in n or "\\" in n or n.startswith("."):
            raise CifarArchiveError(f"{where}: unusable class name {n!r} in 'label_names'")
    if len(set(out)) != len(out):
        raise CifarArchiveError(f"{where}: duplicate class names in 'label_names'")
    return out


def _batch(d, where):
    """uint8 NHWC images [n, 32, 32, 3] and int64 labels [n] from one batch dict."""
    data, labels = d.get("data"), d.get("labels")
    if data is None or labels is None:
        raise CifarArchiveError(f"{where}: missing 'data' or 'labels' (has {sorted(map(str, d))})")
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
    if not os.path.isfile(archive):
        raise CifarArchiveError(f"archive not found: {archive}")
    try:
        with tarfile.open(archive, "r:*") as tar:
            meta = _member(tar, META, archive)
            out = {"label_names": _label_names(meta, f"{archive}: {ARCHIVE_DIR}/{META}")}
            for split, names in (("train", TRAIN_BATCHES), ("test", (TEST_BATCH,))):
                parts = [_batch(_member(tar, n, archive), f"{archive}: {ARCHIVE_DIR}/{n}") for n in names]
                out[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
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
