"""scripts/prepare_cifar10.py and cm/cifar10.py on synthetic archives with the official layout."""

import io
import os
import pickle
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from cm.formats.cifar10 import CifarArchiveError, export_pngs, read_cifar10
from cm.metrics.evaluation import load_stats
from cm.metrics.inception import FIDInceptionV3

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "prepare_cifar10.py")
NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def batch_dict(rng, n):
    """A batch as the official pickles hold it (bytes keys, as Python 2 wrote them)."""
    return {
        b"batch_label": b"synthetic batch",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }


def official_members(per_batch=3, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    members = {name: batch_dict(rng, n_test if name == "test_batch" else per_batch) for name in BATCHES}
    members["batches.meta"] = {b"label_names": list(NAMES), b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    return members


def write_archive(path, members):
    """members: name -> dict (pickled, protocol 2) or raw bytes; written as cifar-10-batches-py/<name>."""
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            data = obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def expected_split(members, names):
    """NHWC images from the CHW rows by explicit indexing: pixel (i, j, c) = row[1024c + 32i + j]."""
    rows = np.concatenate([members[n][b"data"] for n in names])
    labels = sum((members[n][b"labels"] for n in names), [])
    i, j, c = np.meshgrid(np.arange(32), np.arange(32), np.arange(3), indexing="ij")
    return rows[:, c * 1024 + i * 32 + j], labels


def run_script(*args):
    return subprocess.run(
        [sys.executable, SCRIPT, "--progress", "False", *args], capture_output=True, text=True, cwd=REPO
    )


def test_converts_synthetic_archive(tmp_path):
    members = official_members()
    archive = write_archive(tmp_path / "cifar-10-python.tar.gz", members)
    out = tmp_path / "cifar10"
    r = run_script("--archive", archive, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["test", "train"]  # no temporary folders left
    for split, names, n in (("train", BATCHES[:5], 15), ("test", ["test_batch"], 4)):
        files = sorted(os.listdir(out / split))
        assert len(files) == n
        images, labels = expected_split(members, names)
        seen = set()
        for f in files:
            m = re.fullmatch(r"([a-z]+)_(\d{5})\.png", f)
            assert m, f
            index = int(m.group(2))
            seen.add(index)
            assert m.group(1) == NAMES[labels[index]].decode()
            with Image.open(out / split / f) as im:
                assert im.mode == "RGB" and im.size == (32, 32)
                np.testing.assert_array_equal(np.asarray(im), images[index])  # PNG is lossless
        assert seen == set(range(n))


def test_read_cifar10_channel_layout(tmp_path):
    members = official_members(per_batch=1, n_test=1)
    row = np.zeros(3072, np.uint8)
    row[:1024] = 200  # R plane
    row[1024 + 5 * 32 + 7] = 99  # G at row 5, column 7
    members["data_batch_2"][b"data"][0] = row
    data = read_cifar10(write_archive(tmp_path / "a.tar.gz", members))
    img = data["train"][0][1]
    assert data["train"][0].shape == (5, 32, 32, 3) and data["test"][0].shape == (1, 32, 32, 3)
    assert (img[..., 0] == 200).all() and img[5, 7, 1] == 99 and img[..., 1].sum() == 99 and (img[..., 2] == 0).all()
    assert data["label_names"][0] == "airplane" and data["train"][1].dtype == np.int64


def _drop(name):
    def f(m):
        del m[name]

    return f


def _set(name, key, value):
    def f(m):
        m[name][key] = value

    return f


class Evil:
    """A pickle that would run a shell command when loaded by a plain unpickler."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


MALFORMED = {
    "missing_batch": (_drop("data_batch_3"), "data_batch_3"),
    "missing_meta": (_drop("batches.meta"), "batches.meta"),
    "wrong_data_shape": (_set("data_batch_2", b"data", np.zeros((3, 3000), np.uint8)), "3072"),
    "float_data": (_set("test_batch", b"data", np.zeros((4, 3072), np.float32)), "uint8"),
    "labels_length": (_set("data_batch_1", b"labels", [1, 2]), "labels"),
    "label_range": (_set("data_batch_4", b"labels", [0, 1, 10]), "label outside"),
    "nine_classes": (_set("batches.meta", b"label_names", NAMES[:9]), "label_names"),
    "no_data_key": (lambda m: m["data_batch_5"].pop(b"data"), "data_batch_5"),
    "not_a_dict": (lambda m: m.__setitem__("data_batch_1", pickle.dumps([1, 2], protocol=2)), "dict"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_refuses_malformed_archive(tmp_path, case):
    mutate, needle = MALFORMED[case]
    members = official_members()
    mutate(members)
    archive = write_archive(tmp_path / "bad.tar.gz", members)
    with pytest.raises(CifarArchiveError) as info:
        read_cifar10(archive)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg, msg


def test_refuses_code_in_pickle(tmp_path):
    marker = tmp_path / "pwned"
    members = official_members()
    members["test_batch"][b"labels"] = Evil(str(marker))
    archive = write_archive(tmp_path / "evil.tar.gz", members)
    with pytest.raises(CifarArchiveError, match="refusing the global .posix.system"):
        read_cifar10(archive)
    assert not marker.exists()


@pytest.mark.parametrize("case", ["missing_batch", "not_a_tar"])  # the rest: in-process above
def test_script_refuses_and_writes_nothing(tmp_path, case):
    if case == "not_a_tar":
        archive = tmp_path / "bad.tar.gz"
        archive.write_bytes(b"this is not an archive")
        needle = "not a readable"
    else:
        mutate, needle = MALFORMED[case]
        members = official_members()
        mutate(members)
        archive = write_archive(tmp_path / "bad.tar.gz", members)
    out = tmp_path / "out"
    r = run_script("--archive", str(archive), "--out", str(out))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()


def test_existing_output_refused_and_failed_write_cleaned_up(tmp_path):
    data = read_cifar10(write_archive(tmp_path / "a.tar.gz", official_members()))
    (tmp_path / "busy" / "train").mkdir(parents=True)
    with pytest.raises(CifarArchiveError, match="already exists"):
        export_pngs(data, tmp_path / "busy", progress=False)
    assert os.listdir(tmp_path / "busy") == ["train"]
    # A failure half-way (an image PIL cannot write) leaves no output folder behind.
    broken = dict(data, test=(np.zeros((1, 32, 32, 3), np.float64), data["test"][1][:1]))
    with pytest.raises(Exception):
        export_pngs(broken, tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()


def test_writes_reference_stats_with_inception(tmp_path):
    weights = tmp_path / "inception.pth"
    torch.save(FIDInceptionV3().state_dict(), weights)
    archive = write_archive(tmp_path / "a.tar.gz", official_members(per_batch=1, n_test=1))
    out = tmp_path / "c10"
    r = run_script(
        "--archive", archive, "--out", str(out), "--inception_path", str(weights), "--device", "cpu",
        "--save_feats", "True",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    stats = load_stats(str(out / "cifar10_train_stats.npz"))
    assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048) and stats["feats"].shape == (5, 2048)
    assert np.isfinite(stats["sigma"]).all()
    np.testing.assert_allclose(stats["mu"], stats["feats"].astype(np.float64).mean(0), rtol=1e-6, atol=1e-12)
    assert len(os.listdir(out / "train")) == 5
    # Missing weights: refused before anything is written.
    r = run_script("--archive", archive, "--out", str(tmp_path / "x"), "--inception_path", str(tmp_path / "no.pth"))
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "pt_inception" in r.stderr
    assert not (tmp_path / "x").exists()
