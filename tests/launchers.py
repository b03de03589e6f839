"""Finding `mpiexec` for the multi-process tests.

A virtual environment's ``bin/`` (where mpi4py's wheel or conda puts mpiexec)
is often not on PATH when its Python runs the tests; look there too, so such
tests run instead of skipping silently.
"""

import os
import shutil
import sys


def find_mpiexec(path=None, executable=None):
    """Path of mpiexec: on PATH, else next to the running Python; None when neither has it."""
    found = shutil.which("mpiexec", path=path)
    if found:
        return found
    beside = os.path.join(os.path.dirname(executable or sys.executable), "mpiexec")
    return beside if os.path.isfile(beside) and os.access(beside, os.X_OK) else None


MPIEXEC = find_mpiexec()
