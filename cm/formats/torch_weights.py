"""`.pt` files from strangers: checked before `torch.load(weights_only=True)` sees them, and after.

torch's weights-only unpickler runs no code, but it admits globals a state dict never
needs (``bytearray(N)``, ``collections.Counter``, sparse, meta and subclass tensors) and
inflates compressed zip members. Before the load, `check_torch_bytes` requires

* a zip archive (torch ≥ 1.6) whose members are all stored uncompressed and lie inside
  the file, or a legacy stream whose integers are no larger than the file;
* pickles that name only the globals of a plain state dict (`ALLOWED_GLOBALS`) and use
  a memo within budget.

After it, `check_tensors` requires every tensor to be dense, strided and on the CPU, in a
tree of bounded depth and size. Each refusal is one line naming the file.
"""

import _compat_pickle
import io
import pickletools
import zipfile

import torch

from .untrusted import MAX_DEPTH, MAX_MEMO, MAX_RECORDS, UntrustedFileError, quote

_STORAGES = ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
ALLOWED_GLOBALS = frozenset(
    ["collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
     "torch._utils._rebuild_parameter_with_state", "builtins.set", "builtins.complex", "_codecs.encode"]
    + [f"torch.{s}Storage" for s in _STORAGES] + [f"torch.{d}" for d in _DTYPES]
)
MAX_MEMBERS = 4 * MAX_RECORDS  # zip members of one .pt (one per tensor storage)
_INT_OPS = ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4")
_MEMO_OPS = ("PUT", "BINPUT", "LONG_BINPUT")


def _refuse(where, reason):
    return UntrustedFileError(f"cannot load {where} as a weights-only checkpoint ({reason})")


def _global_name(module, name):
    if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol-2 names, as torch maps them
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def scan_pickle(data, where, max_int=None):
    """Check one pickle's opcodes (globals, memo, integers); return its length in bytes."""
    memo = 0
    end = 0
    for op, arg, pos in pickletools.genops(data):
        end = pos + 1
        if op.name == "GLOBAL":
            module, _, name = str(arg).partition(" ")
            full = _global_name(module, name)
            if full not in ALLOWED_GLOBALS:
                raise _refuse(where, f"refusing the global {quote(full)} (not part of a plain state dict)")
        elif op.name in ("STACK_GLOBAL", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4"):
            raise _refuse(where, f"the pickle opcode {op.name}, which torch.save does not write")
        elif op.name in _MEMO_OPS or op.name == "MEMOIZE":
            memo += 1
            if memo > MAX_MEMO or (op.name in _MEMO_OPS and int(arg) > MAX_MEMO):
                raise _refuse(where, f"a pickle memo over {MAX_MEMO} entries")
        elif max_int is not None and op.name in _INT_OPS and abs(int(arg)) > max_int:
            raise _refuse(where, f"the integer {arg} is larger than the file ({max_int} bytes)")
    return end


def check_torch_bytes(data, where):
    """Refuse the bytes of a `.pt` file that a plain state dict would not be (see the module docstring)."""
    try:
        if data[:4] == b"PK\x03\x04":
            _check_zip(data, where)
        else:
            _check_legacy(data, where)
    except UntrustedFileError:
        raise
    except (zipfile.BadZipFile, ValueError, EOFError, KeyError, IndexError, OverflowError) as exc:
        raise _refuse(where, f"not a readable torch file ({' '.join(str(exc).split())[:200]})") from None


def _check_zip(data, where):
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        infos = z.infolist()
        if len(infos) > MAX_MEMBERS:
            raise _refuse(where, f"{len(infos)} zip members (at most {MAX_MEMBERS})")
        total = 0
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
                raise _refuse(where, f"the zip member {quote(info.filename)} is compressed "
                                         f"(torch.save stores members uncompressed)")
            total += info.file_size
            if info.header_offset + info.file_size > len(data) or total > len(data):
                raise _refuse(where, "zip members declare more bytes than the file holds")
        pickles = [i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
        if len(pickles) != 1:
            raise _refuse(where, "not a torch zip file (no single data.pkl)")
        scan_pickle(z.read(pickles[0]), where)


def _check_legacy(data, where):
    """A legacy torch.save stream: magic, protocol, sys_info, the object, its storage keys (then raw data)."""
    pos = 0
    for index in range(5):  # integers of the object (sizes, offsets, storage sizes) are bounded by the file
        try:
            pos += scan_pickle(data[pos:], where, max_int=len(data) if index == 3 else None)
        except UntrustedFileError:
            raise
        except ValueError:  # not (or no longer) a pickle: torch.load says what it is
            return


def check_tensors(obj, where):
    """Refuse a loaded object holding a tensor that is not dense, strided and on the CPU (bounded walk)."""
    stack, seen = [(obj, 0)], 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if depth > MAX_DEPTH or seen > 16 * MAX_RECORDS:
            raise _refuse(where, f"nested over {MAX_DEPTH} deep or over {16 * MAX_RECORDS} entries")
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided or value.device.type != "cpu" or value.is_sparse or value.is_quantized:
                raise _refuse(where, f"a {value.layout} tensor on {value.device} "
                                         f"(only dense CPU tensors)")
        elif isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend((v, depth + 1) for v in value)


def load_weights_bytes(data, where, **kwargs):
    """``torch.load(weights_only=True)`` of ``data`` after `check_torch_bytes`, then `check_tensors`."""
    check_torch_bytes(data, where)
    kwargs.setdefault("map_location", "cpu")
    obj = torch.load(io.BytesIO(data), weights_only=True, **kwargs)
    check_tensors(obj, where)
    return obj
