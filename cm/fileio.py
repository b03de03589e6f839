"""Atomic file writes: a temp file in the target folder, flushed to disk, then renamed."""

import os
import tempfile

import torch


class WriteError(OSError):
    """A failed write, as one line: ``cannot write <path>: [Errno N] <reason>``."""

    def __init__(self, path, exc):
        super().__init__(exc.errno, exc.strerror)
        self.filename = path
        reason = f"[Errno {exc.errno}] {exc.strerror}" if exc.errno else (str(exc) or type(exc).__name__)
        self.message = f"cannot write {path}: {reason}"

    def __str__(self):
        return self.message


def write_atomic(path, write):
    """Call ``write(f)`` on a temp file beside ``path``, then rename it over ``path``.

    A crash leaves either the old file or the new one, never half a file; the
    temp file (``.<name>.*.tmp``) is removed on failure. An OS error becomes
    a one-line `WriteError` naming ``path``.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    except OSError as exc:
        raise WriteError(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(path, exc) from None
        raise


def save_atomic(state, path):
    """``torch.save(state, path)``, atomically."""
    write_atomic(path, lambda f: torch.save(state, f))
