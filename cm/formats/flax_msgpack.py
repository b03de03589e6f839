"""Read ``flax.serialization.to_bytes`` files without JAX or Flax.

The format is a msgpack map; every array is a msgpack extension of type 1
whose payload is itself msgpack ``[shape, dtype name, raw little-endian
bytes]``; tuples and optimiser states appear as maps with keys "0", "1", ….
Arrays are left encoded when the file is read (`read_msgpack_tree`) and
decoded only where needed (`decode_leaf`), so a loader that wants one of
three parameter sets does not decode all three.
"""

import numpy as np

from .untrusted import MAX_MODEL_FILE_BYTES, UntrustedFileError, quote, read_regular, safe_text

ARRAY_EXT = 1  # Flax's ndarray extension code
EXT_NAMES = {2: "complex scalar", 3: "numpy scalar"}  # Flax's other codes, not used by parameter trees
CHUNKED_MARK = "__msgpack_chunked_array__"  # Flax splits arrays over 2**30 bytes into such maps
DTYPES = ("float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool")


class FlaxFormatError(ValueError):
    """A file or tree entry that is not a Flax msgpack state we can read; the message is one line."""

    def __init__(self, message):
        super().__init__(safe_text(message))  # names from the file: escaped and cut


def read_msgpack_tree(path):
    """The msgpack map in ``path`` as nested dicts, arrays still encoded (``msgpack.ExtType``)."""
    import msgpack

    try:
        data = read_regular(path, MAX_MODEL_FILE_BYTES, "Flax checkpoint")
    except UntrustedFileError as exc:
        raise FlaxFormatError(str(exc)) from None
    n = len(data)  # no declared length may exceed the bytes the file holds
    try:
        tree = msgpack.unpackb(data, raw=False, strict_map_key=False, max_str_len=n, max_bin_len=n,
                               max_array_len=n, max_map_len=n // 2, max_ext_len=n)
    except Exception as exc:  # msgpack raises several unrelated types for garbage input
        raise FlaxFormatError(f"{path}: not a msgpack file ({type(exc).__name__}: {exc})") from None
    if not isinstance(tree, dict):
        raise FlaxFormatError(f"{path}: a msgpack {type(tree).__name__}, not the map of a Flax state")
    return tree


def is_array(value):
    """Whether ``value`` is an encoded leaf (array extension or a chunked array map)."""
    import msgpack

    return isinstance(value, msgpack.ExtType) or (isinstance(value, dict) and CHUNKED_MARK in value)


def decode_leaf(value, where):
    """The numpy array encoded in ``value``; ``where`` (the path in the tree) names it in errors."""
    import msgpack

    if isinstance(value, dict) and CHUNKED_MARK in value:
        raise FlaxFormatError(f"{where}: chunked array encoding is not supported (re-save with smaller arrays)")
    if not isinstance(value, msgpack.ExtType):
        raise FlaxFormatError(f"{where}: expected an array, found a msgpack {type(value).__name__}")
    if value.code != ARRAY_EXT:
        kind = EXT_NAMES.get(value.code, "unknown")
        raise FlaxFormatError(f"{where}: unsupported array encoding (msgpack extension {value.code}, {kind})")
    try:
        shape, dtype, buf = msgpack.unpackb(value.data, raw=False)
    except Exception:
        raise FlaxFormatError(f"{where}: array payload is not [shape, dtype, bytes]") from None
    if dtype not in DTYPES or not isinstance(buf, bytes):
        raise FlaxFormatError(f"{where}: unsupported array dtype {quote(dtype)}")
    shape = _checked_shape(shape, dtype, len(buf), where)
    if dtype == "bfloat16":  # upper halves of float32
        raw = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
        array = raw.view(np.float32)
    else:
        array = np.frombuffer(buf, dtype=np.dtype(dtype).newbyteorder("<"))
    if array.size != _numel(shape):
        raise FlaxFormatError(f"{where}: {len(buf)} bytes do not hold a {dtype} array of shape {shape}")
    return array.reshape(shape)


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _checked_shape(shape, dtype, nbytes, where):
    """``shape`` as a tuple of ints ≥ 0 whose array fits the ``nbytes`` the payload holds."""
    if not isinstance(shape, (list, tuple)) or len(shape) > 8 or not all(type(s) is int and s >= 0 for s in shape):
        raise FlaxFormatError(f"{where}: array shape {quote(str(shape)[:80])} is not a list of sizes ≥ 0")
    itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
    if _numel(shape) * itemsize > nbytes:
        raise FlaxFormatError(f"{where}: a {dtype} array of shape {tuple(shape)} declared in {nbytes} bytes")
    return tuple(shape)


def leaf_shape(value, where):
    """Shape of an encoded array without decoding its data."""
    import msgpack

    if isinstance(value, msgpack.ExtType) and value.code == ARRAY_EXT:
        try:  # the shape and dtype lead the payload: read only its first bytes
            head = msgpack.Unpacker(raw=False, max_buffer_size=1 << 16)
            head.feed(value.data[:1024])
            if head.read_array_header() == 3:
                shape, dtype = head.unpack(), head.unpack()
                if dtype in DTYPES:  # checked against the payload's size (a bound: its header is included)
                    return _checked_shape(shape, dtype, len(value.data), where)
        except FlaxFormatError:
            raise
        except Exception:
            pass
    return decode_leaf(value, where).shape  # raises the precise one-line error
