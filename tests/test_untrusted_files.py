"""Hostile and malformed model files (tests/hostile_files.py builds them byte by byte).

Every file must end in one line naming the file and what is wrong, with nothing of the
process changed (torch's and numpy's objects, a later plain `torch.load`), no
uninitialised memory in a weight, no FIFO opened, and small peak memory.
"""

import json
import os
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import hostile_files
from cm.checkpoint import read_checkpoint
from cm.cli import run_cli
from cm.faults import newest_usable_checkpoint, set_file_names
from cm.formats.cifar10 import read_cifar10
from cm.formats.edm_pickle import load_edm_pickle
from cm.formats.model_files import load_network_file
from cm.formats.untrusted import check_npz_file, quote, safe_text
from hostile_files import CASES
from song_helpers import ROOT, load_script

READERS = {"pkl": load_edm_pickle, "pt": read_checkpoint, "jax": load_network_file, "npz": check_npz_file,
           "cifar": read_cifar10}
DEFAULTS = torch._utils._rebuild_tensor_v2.__defaults__
CONTROL = ("\x1b", "\x07", "\u202e", "\x0c")


@pytest.fixture(autouse=True)
def no_hang():
    """A reader that blocks (on a FIFO) fails the test instead of hanging it."""
    signal.signal(signal.SIGALRM, lambda *a: pytest.fail("a reader blocked"))
    signal.alarm(30)
    yield
    signal.alarm(0)


@pytest.fixture(scope="module")
def saved_tensor(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain") / "t.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3)}, path)
    return path


def assert_process_untouched(saved_tensor):
    assert torch._utils._rebuild_tensor_v2.__defaults__ == DEFAULTS
    assert np.dtype("f8").byteorder == "=" and np.dtype("f8").str == "<f8"
    loaded = torch.load(saved_tensor, weights_only=True)["w"]
    assert torch.equal(loaded, torch.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_file_is_one_line_and_changes_nothing(tmp_path, case, saved_tensor):
    reader, build, fragment = CASES[case]
    path = build(tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises((ValueError, OSError)) as e:
        READERS[reader](path)
    message = str(e.value)
    assert fragment in message, message[:500]
    assert str(path) in message or path.name in message, message[:500]
    assert "\n" not in message and len(message) < 1500 and not any(c in message for c in CONTROL), message[:500]
    assert sorted(os.listdir(tmp_path)) == before  # nothing written
    assert_process_untouched(saved_tensor)


def test_quote_escapes_and_cuts():
    assert quote("a\x1b[2J\u202eb") == "'a\\x1b[2J\\u202eb'"
    assert quote("x" * 10_000).endswith("… (10000 characters)") and len(quote("x" * 10_000)) < 260
    assert quote(5) == "<a int>" and safe_text("a\nb\x1b") == "a b\\x1b"


def test_hostile_pickles_through_convert_write_nothing(tmp_path, capsys):
    for case in ("nested-global-tamper", "view-longer-than-storage", "class-name-escape-4mib"):
        path = CASES[case][1](tmp_path)
        out = tmp_path / f"{case}.pt"
        rc = run_cli(load_script("convert_edm_pkl").main, ["--pkl", str(path), "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and str(path) in err[0] and not out.exists(), err
        path.unlink()


def _write_set(directory, step, model=None):
    for name in set_file_names(step, [0.9]):
        state = {"w": torch.full((2,), float(step))}
        torch.save(model if name.startswith("model") and model is not None else state, directory / name)


@pytest.mark.parametrize("bad", ["fifo", "none", "dev-zero", "list-of-ints"])
def test_resume_auto_falls_back_past_unusable_sets(tmp_path, bad):
    _write_set(tmp_path, 5)
    _write_set(tmp_path, 10)
    model = tmp_path / "model000010.pt"
    model.unlink()
    if bad == "fifo":
        os.mkfifo(model)
    elif bad == "dev-zero":
        os.symlink("/dev/zero", model)
    else:
        torch.save(None if bad == "none" else [1, 2, 3], model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert newest_usable_checkpoint(str(tmp_path), [0.9]) == str(tmp_path / "model000005.pt")
    assert len(caught) == 1 and "step 10" in str(caught[0].message) and "\n" not in str(caught[0].message)


MEMORY_CASES = ["stride0-2gib", "memo-index-2g", "nested-bytearray", "storage-declares-more", "views-over-budget",
                "msgpack-map-4g", "msgpack-index-1e12", "pt-deflate", "npz-header-lie"]
LIMITED = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import hostile_files, test_untrusted_files as t
from pathlib import Path
paths = {c: t.CASES[c][1](Path(sys.argv[2]) / c.replace("-", "_")) for c in json.loads(sys.argv[3])}
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (384 << 20), resource.RLIM_INFINITY))
out = {}
for case, path in paths.items():
    try:
        t.READERS[t.CASES[case][0]](path)
        out[case] = "loaded"
    except (ValueError, OSError) as e:
        out[case] = str(e)
print(json.dumps(out))
"""


def test_memory_bombs_stay_under_a_small_address_space(tmp_path):
    """The bombs run with 384 MiB of address space above what the imports took: each is refused cleanly."""
    for case in MEMORY_CASES:
        (tmp_path / case.replace("-", "_")).mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", LIMITED, str(ROOT / "tests"), str(tmp_path), json.dumps(MEMORY_CASES)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for case in MEMORY_CASES:
        assert CASES[case][2] in results[case] and "MemoryError" not in results[case], (case, results[case])


def test_corpus_covers_every_reader():
    assert {reader for reader, _, _ in CASES.values()} == set(READERS)
    assert hostile_files.BIG > 8 << 30


@pytest.mark.parametrize("case", ["pt-bytearray", "msgpack-index-1e12", "pt-fifo", "class-name-escape-4mib"])
def test_scripts_refuse_hostile_model_files_in_one_line(tmp_path, capsys, case):
    """image_sample --model_path and cm_train --teacher_model_path: one line naming the file, no logging dir."""
    path = CASES[case][1](tmp_path)
    net = ["--image_size", "16", "--channel_mult", "1,2", "--num_channels", "32", "--num_res_blocks", "1",
           "--attention_resolutions", "8", "--logging_dir", str(tmp_path / "out")]
    runs = [("image_sample", ["--model_path", str(path), "--num_samples", "2", "--batch_size", "2"] + net),
            ("cm_train", ["--teacher_model_path", str(path), "--training_mode", "consistency_distillation",
                          "--loss_norm", "l2", "--data_dir", str(tmp_path)] + net)]
    for script, argv in runs:
        rc = run_cli(load_script(script).main, argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and path.name in err[0], (script, err)
        assert not any(c in err[0] for c in CONTROL) and not (tmp_path / "out").exists(), (script, err)


@pytest.mark.parametrize("legacy", [False, True])
def test_plain_state_dicts_still_load_exactly(tmp_path, legacy):
    """What torch.save writes for a model and an optimiser passes every check, zip or legacy format."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    for name, state in (("model", model.state_dict()), ("opt", opt.state_dict())):
        path = tmp_path / f"{name}.pt"
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
        loaded = read_checkpoint(path)
        assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded_v, v) for loaded_v, v in zip(read_checkpoint(tmp_path / "model.pt").values(),
                                                               model.state_dict().values()))
