"""Read ``flax.serialization.to_bytes`` files without JAX or Flax.

The format is a msgpack map; every array is a msgpack extension of type 1
whose payload is itself msgpack ``[shape, dtype name, raw little-endian
bytes]``; tuples and optimiser states appear as maps with keys "0", "1", ….
Arrays are left encoded when the file is read (`read_msgpack_tree`) and
decoded only where needed (`decode_leaf`), so a loader that wants one of
three parameter sets does not decode all three.
"""

import numpy as np

ARRAY_EXT = 1  # Flax's ndarray extension code
EXT_NAMES = {2: "complex scalar", 3: "numpy scalar"}  # Flax's other codes, not used by parameter trees
CHUNKED_MARK = "__msgpack_chunked_array__"  # Flax splits arrays over 2**30 bytes into such maps
DTYPES = ("float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool")


class FlaxFormatError(ValueError):
    """A file or tree entry that is not a Flax msgpack state we can read; the message is one line."""

    def __init__(self, message):
        super().__init__(" ".join(str(message).split()))


def read_msgpack_tree(path):
    """The msgpack map in ``path`` as nested dicts, arrays still encoded (``msgpack.ExtType``)."""
    import msgpack

    with open(path, "rb") as f:
        data = f.read()
    try:
        tree = msgpack.unpackb(data, raw=False, strict_map_key=False)
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
        shape = tuple(int(s) for s in shape)
    except Exception:
        raise FlaxFormatError(f"{where}: array payload is not [shape, dtype, bytes]") from None
    if dtype not in DTYPES or not isinstance(buf, bytes):
        raise FlaxFormatError(f"{where}: unsupported array dtype {dtype!r}")
    if dtype == "bfloat16":  # upper halves of float32
        raw = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
        array = raw.view(np.float32)
    else:
        array = np.frombuffer(buf, dtype=np.dtype(dtype).newbyteorder("<"))
    if array.size != int(np.prod(shape, dtype=np.int64)):
        raise FlaxFormatError(f"{where}: {len(buf)} bytes do not hold a {dtype} array of shape {shape}")
    return array.reshape(shape)


def leaf_shape(value, where):
    """Shape of an encoded array without decoding its data."""
    import msgpack

    if isinstance(value, msgpack.ExtType) and value.code == ARRAY_EXT:
        try:  # the shape leads the payload: read only its first bytes
            head = msgpack.Unpacker(raw=False)
            head.feed(value.data[:1024])
            if head.read_array_header() == 3:
                return tuple(int(s) for s in head.unpack())
        except Exception:
            pass
    return decode_leaf(value, where).shape  # raises the precise one-line error
