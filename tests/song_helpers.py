"""Shared by the SongUNet / EDM .pkl tests: running a script's main() in-process, one torch thread."""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EDM = ROOT / "tests" / "data" / "edm"


def load_script(name):
    """scripts/<name>.py as a module (its main(argv) runs in this process)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is faster than two on a shared machine (conftest sets two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def image_folder(folder, size, n=4):
    """``n`` random size×size RGB PNGs named <class>_<i>.png (classes 0 and 1) in a new ``folder``."""
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i % 2}_{i}.png")
    return folder
