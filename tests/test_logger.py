"""cm.logger: what lands on stdout, in log.txt, progress.csv and progress.json.

Cross-rank averaging under real 2-process jobs is checked in test_dist_util.py.
"""

import argparse
import csv
import json
import os
import tempfile

import numpy as np
import pytest
import torch

from cm import logger


@pytest.fixture(autouse=True)
def _back_to_default():
    """Each test starts and ends with the default logger."""
    logger.reset()
    yield
    logger.reset()


def _csv_rows(path):
    """progress.csv as a list of rows (header first)."""
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_stdout_log_and_csv(tmp_path, capsys):
    """Default formats: a table on stdout and in log.txt, a row in progress.csv."""
    logger.configure(dir=str(tmp_path))
    logger.log("hello", 42)
    logger.logkv("step", 3)
    logger.logkv("loss", 0.25)
    logger.logkv("name", "a-very-long-string-value-that-is-longer-than-thirty")
    table = logger.dumpkvs()
    assert table == {"step": 3, "loss": 0.25, "name": "a-very-long-string-value-that-is-longer-than-thirty"}
    out = capsys.readouterr().out
    assert f"Logging to {tmp_path}\n" in out
    assert "hello 42\n" in out
    assert "| loss | 0.25" in out and "| step | 3" in out
    assert "a-very-long-string-value-th..." in out
    logger.reset()
    text = (tmp_path / "log.txt").read_text()
    assert text == out  # the file gets exactly what stdout got
    assert _csv_rows(tmp_path / "progress.csv") == [
        ["loss", "name", "step"],
        ["0.25", "a-very-long-string-value-that-is-longer-than-thirty", "3"],
    ]
    assert not (tmp_path / "progress.json").exists()


def test_csv_stays_valid_when_keys_appear_later(tmp_path):
    """A new key rewrites the header; older rows get blanks in its column."""
    logger.configure(dir=str(tmp_path), format_strs=["csv"])
    logger.logkvs({"b": 1, "a": 2})
    logger.dumpkvs()
    logger.logkvs({"b": 3, "c": "x,y"})  # 'a' missing now, 'c' new and with a comma
    logger.dumpkvs()
    logger.logkvs({"a": 5, "b": 6, "c": 7})
    logger.dumpkvs()
    rows = _csv_rows(tmp_path / "progress.csv")
    assert rows == [["a", "b", "c"], ["2", "1", ""], ["", "3", "x,y"], ["5", "6", "7"]]


def test_logkv_mean_and_json(tmp_path):
    """logkv_mean averages within a dump; values reset after each dump; tensors become numbers."""
    logger.configure(dir=str(tmp_path), format_strs=["json"])
    for v in (1.0, 2.0, 6.0):
        logger.logkv_mean("loss", v)
    logger.logkv_mean("gn", torch.tensor(4.0))
    logger.logkv("lr", np.float32(0.5))
    assert logger.getkvs() == {"loss": 3.0, "gn": 4.0, "lr": np.float32(0.5)}
    assert logger.dumpkvs() == {"loss": 3.0, "gn": 4.0, "lr": 0.5}
    assert logger.getkvs() == {}
    logger.logkv_mean("loss", 10.0)
    logger.dumpkvs()
    lines = (tmp_path / "progress.json").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"gn": 4.0, "loss": 3.0, "lr": 0.5}, {"loss": 10.0}]


def test_levels_and_prefixes(tmp_path):
    """set_level filters text; warn/error carry a prefix; debug hidden by default."""
    logger.configure(dir=str(tmp_path), format_strs=["log"])
    logger.debug("hidden")
    logger.info("shown")
    logger.warn("careful")
    logger.error("broken")
    logger.set_level(logger.ERROR)
    logger.warn("dropped")
    logger.set_level(logger.DEBUG)
    logger.debug("now visible")
    logger.reset()
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert lines == [
        f"Logging to {tmp_path}",
        "shown",
        "WARNING: careful",
        "ERROR: broken",
        "DEBUG: now visible",
    ]


def test_dir_from_env_then_temp(tmp_path, monkeypatch):
    """No dir: $OPENAI_LOGDIR, else a fresh folder under the system temp dir."""
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "from_env"))
    logger.configure(format_strs=["csv"])
    assert logger.get_dir() == str(tmp_path / "from_env")
    assert (tmp_path / "from_env" / "progress.csv").exists()
    monkeypatch.delenv("OPENAI_LOGDIR")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    logger.configure(format_strs=["csv"])
    first = logger.get_dir()
    logger.configure(format_strs=["csv"])
    assert os.path.dirname(first) == str(tmp_path / "tmp")
    assert os.path.basename(first).startswith("openai-")
    assert logger.get_dir() != first and os.path.isdir(first)


def test_default_logger_and_scoped_configure(tmp_path, capsys):
    """Before configure: stdout only, no dir. scoped_configure restores the previous logger."""
    assert logger.get_dir() is None
    logger.log("to stdout")
    assert capsys.readouterr().out == "to stdout\n"
    with logger.scoped_configure(dir=str(tmp_path / "inner"), format_strs=["log"]):
        assert logger.get_dir() == str(tmp_path / "inner")
        logger.log("inside")
    assert logger.get_dir() is None
    assert "inside" in (tmp_path / "inner" / "log.txt").read_text()
    assert "inside" not in capsys.readouterr().out


def test_unknown_format_and_missing_tensorboard(tmp_path):
    """A bad format name is a one-line error; tensorboard is written or skipped with a warning."""
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        logger.configure(dir=str(tmp_path), format_strs=["xml"])
    try:
        import torch.utils.tensorboard  # noqa: F401

        have_tb = True
    except ImportError:
        have_tb = False
    if have_tb:
        logger.configure(dir=str(tmp_path), format_strs=["tensorboard", "csv"])
        logger.logkv("loss", 1.0)
        logger.dumpkvs()
        logger.reset()
        assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    else:
        logger._tensorboard_warned = False
        with pytest.warns(UserWarning, match="tensorboard is not installed"):
            logger.configure(dir=str(tmp_path), format_strs=["tensorboard", "csv"])
        logger.logkv("loss", 1.0)
        logger.dumpkvs()
        assert _csv_rows(tmp_path / "progress.csv") == [["loss"], ["1.0"]]
        assert not (tmp_path / "tb").exists()


def test_save_args(tmp_path):
    """args.json: sorted keys, indented, from a Namespace or a dict, into the logging dir."""
    logger.configure(dir=str(tmp_path), format_strs=[])
    ns = argparse.Namespace(lr=1e-4, batch_size=32, ema_rate="0.999,0.9999", data_dir=tmp_path)
    path = logger.save_args(ns)
    assert path == str(tmp_path / "args.json")
    text = (tmp_path / "args.json").read_text()
    assert json.loads(text) == {"batch_size": 32, "data_dir": str(tmp_path), "ema_rate": "0.999,0.9999", "lr": 1e-4}
    assert text.index('"batch_size"') < text.index('"data_dir"') < text.index('"lr"')
    assert '\n  "lr": 0.0001' in text
    other = logger.save_args({"b": 1, "a": 2}, dir=str(tmp_path / "elsewhere"))
    assert json.loads(open(other).read()) == {"a": 2, "b": 1}
    logger.reset()
    with pytest.raises(ValueError, match="no directory"):
        logger.save_args({"a": 1})
