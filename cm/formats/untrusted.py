"""Rules for reading files a stranger wrote (model files, checkpoints, archives, `.npz` inputs).

* `quote`: every name taken from a file goes through it before it reaches a message
  (repr-like, control and format characters escaped, cut to `MAX_NAME_CHARS`).
* `open_regular` / `read_regular`: only regular files (symlinks resolved and the target
  checked; FIFOs and devices refused without blocking), at most a budgeted size, read in
  bounded chunks.
* `SafeUnpickler`: Python's pure unpickler with an allow-list of callables, no persistent
  ids, a memo budget, REDUCE only on allow-listed callables, NEWOBJ only of allow-listed
  classes and BUILD only on instances the unpickler itself created (once each), so nothing a
  file names can be modified by the file.
* The budgets below bound what a file can make a reader do; each refusal is one line
  naming the file and the budget.
"""

import io
import os
import pickle
import stat

MAX_NAME_CHARS = 200  # a name from a file is shown with at most this many of its characters
MAX_MODEL_FILE_BYTES = 8 << 30  # a .pkl / .pt / Flax file (NVIDIA's largest published EDM .pkl: 1.2 GB)
MAX_METADATA_BYTES = 1 << 20  # a metaNNNNNN.json beside a checkpoint
READ_CHUNK_BYTES = 16 << 20  # files are read this much at a time
MAX_MEMO = 1 << 22  # entries in a pickle's memo
MAX_RECORDS = 100_000  # persistent objects / modules in one network file
MAX_DEPTH = 64  # nesting of modules or of a parameter tree
MAX_IMAGE_SIZE = 1024  # image size a file may set (stated in the log when adopted)
MAX_LAYOUTS = 4096  # candidate layouts a reader may try when a file leaves one open
MAX_MATERIALISED_SLACK = 1 << 20  # tensors may hold the file's bytes plus this much


class UntrustedFileError(ValueError):
    """A file that breaks the rules above; the message is one line naming the file.

    A ValueError, which the scripts print as one line (`cm.cli.run_cli`); this module
    imports nothing of ours, so the distributed helpers can use it.
    """

    def __init__(self, message):
        super().__init__(safe_text(message))


def quote(value, limit=MAX_NAME_CHARS):
    """A name from a file as safe text: repr of at most ``limit`` characters (escapes control chars)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    if not isinstance(value, str):
        return f"<a {type(value).__name__}>"
    text = repr(value[:limit])
    if len(text) > 4 * limit:  # many escaped characters
        text = text[: 4 * limit] + "…"
    return text + (f"… ({len(value)} characters)" if len(value) > limit else "")


MAX_MESSAGE_CHARS = 1000  # a one-line error that embeds names from a file is cut to this


def safe_text(message, limit=MAX_MESSAGE_CHARS):
    """A message that may embed names from a file: non-printable characters escaped, one line, cut."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in " ".join(str(message).split()))
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


def _kind(mode):
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path, limit=MAX_MODEL_FILE_BYTES, what="file"):
    """A binary file object of the regular file ``path`` (symlinks resolved), at most ``limit`` bytes.

    Missing: FileNotFoundError. A FIFO, device, socket or directory (also behind a
    symlink), or a file over ``limit``: `UntrustedFileError`. Never blocks on a FIFO.
    """
    path = os.fspath(path)
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    shown = path if real == os.path.abspath(path) else f"{path} (-> {real})"
    if not stat.S_ISREG(st.st_mode):
        raise UntrustedFileError(f"{shown}: {_kind(st.st_mode)}, not a regular {what}")
    fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    try:
        st = os.fstat(fd)  # the file opened, not the name: a swap after the check is caught here
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedFileError(f"{shown}: {_kind(st.st_mode)}, not a regular {what}")
        if st.st_size > limit:
            raise UntrustedFileError(f"{shown}: {st.st_size} bytes, over the {limit}-byte limit for a {what}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path, limit=MAX_MODEL_FILE_BYTES, what="file"):
    """The bytes of the regular file ``path`` (see `open_regular`), read in bounded chunks."""
    with open_regular(path, limit, what) as f:
        chunks, total = [], 0
        while True:
            chunk = f.read(min(READ_CHUNK_BYTES, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # the file grew while it was read
                raise UntrustedFileError(f"{path}: over the {limit}-byte limit for a {what}")
    return b"".join(chunks)


MAX_NPZ_MEMBERS = 64
MAX_NPZ_BYTES = 8 << 30  # all arrays of an .npz input together, uncompressed


def check_npz_file(path, what=".npz input"):
    """Refuse an .npz that is not a regular file of at most `MAX_NPZ_MEMBERS` plain .npy arrays, each
    declaring no more bytes than its zip member holds (so numpy never allocates what a file only claims)."""
    import zipfile

    import numpy as np

    with open_regular(path, MAX_NPZ_BYTES, what) as f:
        try:
            with zipfile.ZipFile(f) as z:
                infos = z.infolist()
                if len(infos) > MAX_NPZ_MEMBERS or sum(i.file_size for i in infos) > MAX_NPZ_BYTES:
                    raise UntrustedFileError(f"{path}: over {MAX_NPZ_MEMBERS} arrays or {MAX_NPZ_BYTES} bytes")
                for info in infos:
                    if not info.filename.endswith(".npy") or info.compress_type not in (0, 8):
                        raise UntrustedFileError(f"{path}: the member {quote(info.filename)} is not an .npy array")
                    with z.open(info) as m:
                        version = np.lib.format.read_magic(m)
                        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                            np.lib.format.read_array_header_2_0
                        shape, _, dtype = read(m)
                    count = 1
                    for n in shape:
                        count *= n
                    if dtype.hasobject or count * dtype.itemsize > info.file_size:
                        raise UntrustedFileError(f"{path}: {quote(info.filename)} declares a {dtype} array of "
                                                 f"shape {shape} in {info.file_size} bytes")
        except UntrustedFileError:
            raise
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
            raise UntrustedFileError(f"{path}: not a readable .npz ({safe_text(e, 200)})") from None


class Refused(pickle.UnpicklingError):
    """What a `SafeUnpickler` refuses; the reader adds the file's name."""


class SafeUnpickler(pickle._Unpickler):
    """The pure-Python unpickler, restricted (see the module docstring).

    Subclasses set ``allowed`` ((module, name) → object handed out for GLOBAL/STACK_GLOBAL),
    ``new_types`` (classes NEWOBJ may instantiate, without arguments) and ``build_types``
    (types whose instances BUILD may fill, once each: only classes of ours or plain
    containers, whose every instance on the stack was created by this unpickler), and may
    override `build`.
    """

    allowed = {}
    new_types = ()
    build_types = ()
    what = "pickle"
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data, max_memo=MAX_MEMO, encoding="ASCII"):
        super().__init__(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data, encoding=encoding)
        self.max_memo = max_memo
        self._callables = {id(v) for v in self.allowed.values() if callable(v)}
        self._built = set()  # ids of the instances BUILD has filled (once each)
        self._keep = []

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except (KeyError, TypeError):
            shown = quote(f"{module}.{name}")
            raise Refused(f"refusing the global {shown} (not on the {self.what} allow-list)") from None

    def persistent_load(self, pid):
        raise Refused(f"refusing a persistent id (not used by a {self.what})")

    # --- the opcodes that call, create or modify objects --------------------------------
    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if id(func) not in self._callables or type(args) is not tuple:
            raise Refused(f"a call of something other than an allow-listed function ({type(func).__name__})")
        self.stack[-1] = func(*args)

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        if not any(cls is t for t in self.new_types) or args != ():
            raise Refused(f"creating an instance of {type(cls).__name__} {quote(getattr(cls, '__name__', ''))}")
        self.append(cls.__new__(cls))

    def load_refused(self):
        raise Refused("an opcode this reader does not run (INST/OBJ/NEWOBJ_EX/out-of-band buffers)")

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) not in self.build_types:
            raise Refused(f"setting the state of a {type(inst).__name__} (only of objects this reader created)")
        if id(inst) in self._built:
            raise Refused(f"setting the state of a {type(inst).__name__} twice")
        self._built.add(id(inst))
        self._keep.append(inst)  # keeps its id its own
        self.build(inst, state)

    def build(self, inst, state):
        """Fill ``inst`` from ``state``: by default a dict with str keys, set as its attributes."""
        if type(state) is not dict or not all(type(k) is str and not k.startswith("__") for k in state):
            raise Refused(f"the state of a {type(inst).__name__} is not a dict of plain names")
        inst.__dict__.update(state)

    def _memo_checked(load):
        def wrapped(self):
            load(self)
            if len(self.memo) > self.max_memo:
                raise Refused(f"a memo of over {self.max_memo} entries")
        return wrapped

    for _op, _load in ((pickle.REDUCE, load_reduce), (pickle.NEWOBJ, load_newobj), (pickle.BUILD, load_build),
                       (pickle.INST, load_refused), (pickle.OBJ, load_refused), (pickle.NEWOBJ_EX, load_refused),
                       (pickle.NEXT_BUFFER, load_refused), (pickle.READONLY_BUFFER, load_refused)):
        dispatch[_op[0]] = _load
    for _op in (pickle.PUT, pickle.BINPUT, pickle.LONG_BINPUT, pickle.MEMOIZE):
        dispatch[_op[0]] = _memo_checked(pickle._Unpickler.dispatch[_op[0]])
    del _op, _load, _memo_checked


def is_plain_number(value):
    """A Python int/float (not bool) or a numpy number."""
    import numpy as np

    return (type(value) in (int, float)) or isinstance(value, (np.integer, np.floating))


def finite_float(value, name, where, positive=False, below=None):
    """``value`` as a finite float (and > 0 when ``positive``, < ``below`` when given), else one line."""
    import math

    ok = is_plain_number(value) and math.isfinite(float(value))
    if ok and positive:
        ok = float(value) > 0
    if ok and below is not None:
        ok = 0 <= float(value) < below
    if not ok:
        shown = quote(value) if isinstance(value, str) else (repr(value) if is_plain_number(value)
                                                            else f"a {type(value).__name__}")
        need = "a finite number > 0" if positive else f"a number in [0, {below})" if below else "a finite number"
        raise UntrustedFileError(f"{where}: {name} is {shown}, not {need}")
    return float(value)
