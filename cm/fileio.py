"""Atomic file writes: a temp file in the target folder, flushed to disk, then renamed."""

import os
import tempfile

import torch


def write_atomic(path, write):
    """Call ``write(f)`` on a temp file beside ``path``, then rename it over ``path``.

    A crash leaves either the old file or the new one, never half a file; the
    temp file (``.<name>.*.tmp``) is removed on failure.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_atomic(state, path):
    """``torch.save(state, path)``, atomically."""
    write_atomic(path, lambda f: torch.save(state, f))
