"""Key/value and text logging in the style of OpenAI baselines.

Usage: ``configure(dir)`` once, then per step ``logkv``/``logkv_mean`` and
``dumpkvs()``; ``log``/``warn`` for free text. Formats: "stdout", "log"
(log.txt), "csv" (progress.csv), "json" (progress.json, one object a line),
"tensorboard" (when tensorboard is installed; skipped with one warning when not).

Ranks: by default rank 0 writes stdout, log.txt and progress.csv; the other
ranks write nothing. ``dumpkvs`` is collective when several processes run:
values are averaged over ranks (``logkv_mean`` values weighted by how many
times each rank logged them) through torch.distributed (or the MPI ``comm``
given to ``configure``), so every rank must call it.

Before ``configure`` a default logger prints to stdout on rank 0 and has no
directory (``get_dir()`` is None).
"""

import argparse
import contextlib
import csv
import datetime
import json
import numbers
import os
import sys
import tempfile
import warnings
from collections import defaultdict

import torch.distributed as dist

from cm import dist_util

DEBUG = 10
INFO = 20
WARN = 30
ERROR = 40
DISABLED = 50

FORMATS = ("stdout", "log", "csv", "json", "tensorboard")

_tensorboard_warned = False


# ----------------------------------------------------------------------------
# Output formats


def _to_plain(value):
    """A JSON/CSV friendly version of a logged value (tensor/numpy scalars → Python)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _short(text, width=30):
    """Cut ``text`` to ``width`` characters, marking the cut with '...'."""
    return text if len(text) <= width else text[: width - 3] + "..."


class HumanOutputFormat:
    """A boxed key/value table plus free text, to stdout or to a text file."""

    def __init__(self, path=None):
        # path None means "whatever sys.stdout is at write time".
        self.file = open(path, "wt") if path is not None else None

    def _stream(self):
        """The stream to write to now."""
        return self.file if self.file is not None else sys.stdout

    def writekvs(self, kvs):
        """Write one table, keys sorted case-insensitively."""
        rows = []
        for key, val in sorted(kvs.items(), key=lambda kv: kv[0].lower()):
            val = _to_plain(val)
            shown = f"{val:<8.3g}" if isinstance(val, float) else str(val)
            rows.append((_short(key), _short(shown)))
        if not rows:
            return
        kw = max(len(k) for k, _ in rows)
        vw = max(len(v) for _, v in rows)
        rule = "-" * (kw + vw + 7)
        lines = [rule] + [f"| {k:<{kw}} | {v:<{vw}} |" for k, v in rows] + [rule]
        stream = self._stream()
        stream.write("\n".join(lines) + "\n")
        stream.flush()

    def writeseq(self, items):
        """Write space-separated items as one line."""
        stream = self._stream()
        stream.write(" ".join(str(x) for x in items) + "\n")
        stream.flush()

    def close(self):
        """Close the file (never sys.stdout)."""
        if self.file is not None:
            self.file.close()


class JSONOutputFormat:
    """One JSON object per dumpkvs call, one per line."""

    def __init__(self, path):
        self.file = open(path, "wt")

    def writekvs(self, kvs):
        """Append one line with every key."""
        plain = {k: _to_plain(v) for k, v in sorted(kvs.items())}
        self.file.write(json.dumps(plain, default=str) + "\n")
        self.file.flush()

    def close(self):
        """Close the file."""
        self.file.close()


class CSVOutputFormat:
    """progress.csv; a key that appears later widens the header and pads old rows."""

    def __init__(self, path):
        self.path = path
        self.keys = []
        self.rows = 0
        open(path, "wt").close()

    def _rewrite_with(self, keys):
        """Rewrite the file under a wider header, old rows padded with blanks."""
        with open(self.path, "rt", newline="") as f:
            old = list(csv.reader(f))[1:]
        with open(self.path, "wt", newline="") as f:
            w = csv.writer(f)
            w.writerow(keys)
            for row in old:
                w.writerow(row + [""] * (len(keys) - len(row)))

    def writekvs(self, kvs):
        """Append one row; widen the header first when new keys appear."""
        new = sorted(k for k in kvs if k not in self.keys)
        if new:
            self.keys.extend(new)
            self._rewrite_with(self.keys)
        with open(self.path, "at", newline="") as f:
            row = [kvs.get(k, "") for k in self.keys]
            csv.writer(f).writerow([_to_plain(v) for v in row])
        self.rows += 1

    def close(self):
        """Nothing held open."""


class TensorBoardOutputFormat:
    """Scalars to TensorBoard event files, the step taken from the 'step' key or a counter."""

    def __init__(self, path, writer_cls):
        self.writer = writer_cls(log_dir=path)
        self.count = 0

    def writekvs(self, kvs):
        """Add every numeric value as a scalar."""
        step = kvs.get("step", self.count)
        for k, v in kvs.items():
            v = _to_plain(v)
            if isinstance(v, numbers.Number):
                self.writer.add_scalar(k, v, global_step=int(step))
        self.writer.flush()
        self.count += 1

    def close(self):
        """Close the event file."""
        self.writer.close()


def _tensorboard_writer_cls():
    """SummaryWriter when tensorboard is importable, else None (warned once)."""
    global _tensorboard_warned
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _tensorboard_warned:
            warnings.warn("logger: 'tensorboard' output asked for but tensorboard is not installed; skipping it")
            _tensorboard_warned = True
        return None
    return SummaryWriter


def make_output_format(fmt, ev_dir, log_suffix=""):
    """Build the writer for format name ``fmt`` inside ``ev_dir`` (None if skipped)."""
    if fmt == "stdout":
        return HumanOutputFormat()
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; choose from {', '.join(FORMATS)}")
    os.makedirs(ev_dir, exist_ok=True)
    if fmt == "log":
        return HumanOutputFormat(os.path.join(ev_dir, f"log{log_suffix}.txt"))
    if fmt == "json":
        return JSONOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.json"))
    if fmt == "csv":
        return CSVOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.csv"))
    writer_cls = _tensorboard_writer_cls()
    if writer_cls is None:
        return None
    return TensorBoardOutputFormat(os.path.join(ev_dir, f"tb{log_suffix}"), writer_cls)


# ----------------------------------------------------------------------------
# Cross-rank averaging


def _weighted_means(per_rank):
    """Merge [{key: (value, count)}] into {key: count-weighted mean}; equal or non-numeric values pass through."""
    values = defaultdict(list)
    for table in per_rank:
        for key, (val, cnt) in table.items():
            values[key].append((_to_plain(val), cnt))
    merged = {}
    for key, pairs in values.items():
        first = pairs[0][0]
        numeric = all(isinstance(v, numbers.Number) and not isinstance(v, bool) for v, _ in pairs)
        if not numeric or all(v == first for v, _ in pairs):
            # Same everywhere (or not a number): keep it as it is.
            merged[key] = first
        else:
            merged[key] = sum(v * c for v, c in pairs) / sum(c for _, c in pairs)
    return merged


def _gather(local, comm):
    """Every rank's ``local`` object: through ``comm`` (MPI), torch.distributed, or just ours."""
    if comm is not None and comm.Get_size() > 1:
        return comm.allgather(local)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, local)
        return out
    return [local]


# ----------------------------------------------------------------------------
# The logger


class Logger:
    """Accumulates key/values between dumps and fans text and tables out to formats."""

    def __init__(self, dir, output_formats, comm=None):
        self.name2val = {}
        self.name2cnt = defaultdict(int)
        self.level = INFO
        self.dir = dir
        self.output_formats = output_formats
        self.comm = comm

    def logkv(self, key, val):
        """Set ``key`` to ``val`` for the next dump (last value wins)."""
        self.name2val[key] = val
        self.name2cnt.pop(key, None)

    def logkv_mean(self, key, val):
        """Fold ``val`` into the running mean of ``key`` for the next dump."""
        val = float(_to_plain(val))
        n = self.name2cnt[key]
        old = self.name2val.get(key, 0.0)
        self.name2val[key] = old * n / (n + 1) + val / (n + 1)
        self.name2cnt[key] = n + 1

    def dumpkvs(self):
        """Average over ranks, write every key/value format, clear, return the table."""
        local = {k: (v, self.name2cnt.get(k, 1)) for k, v in self.name2val.items()}
        table = _weighted_means(_gather(local, self.comm))
        for fmt in self.output_formats:
            if table and hasattr(fmt, "writekvs"):
                fmt.writekvs(table)
        self.name2val.clear()
        self.name2cnt.clear()
        return table

    def log(self, *args, level=INFO):
        """Write ``args`` as one line to the text formats when ``level`` passes."""
        if self.level <= level:
            for fmt in self.output_formats:
                if hasattr(fmt, "writeseq"):
                    fmt.writeseq(args)

    def set_level(self, level):
        """Drop text messages below ``level``."""
        self.level = level

    def get_dir(self):
        """The logging directory (None for the default stdout-only logger)."""
        return self.dir

    def close(self):
        """Close every format's file."""
        for fmt in self.output_formats:
            fmt.close()


def _default_logger():
    """Stdout on rank 0, silent elsewhere, no directory."""
    formats = [HumanOutputFormat()] if dist_util.get_rank() == 0 else []
    return Logger(dir=None, output_formats=formats)


class _State:
    """The default logger and the current one."""

    default = None
    current = None


def get_current():
    """The logger that module-level calls go to (the default one if unconfigured)."""
    if _State.current is None:
        _State.default = _State.current = _default_logger()
    return _State.current


def _fresh_dir():
    """A new timestamped folder name under the system temp dir, shared across ranks."""
    name = datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f")
    path = os.path.join(tempfile.gettempdir(), name)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # Every rank must agree on rank 0's choice.
        box = [path]
        dist.broadcast_object_list(box, src=0)
        path = box[0]
    return path


def configure(dir=None, format_strs=None, comm=None, log_suffix=""):
    """Start logging to ``dir`` (else $OPENAI_LOGDIR, else a fresh temp folder).

    ``format_strs`` defaults to $OPENAI_LOG_FORMAT or "stdout,log,csv" on rank
    0 and to $OPENAI_LOG_FORMAT_MPI or nothing on other ranks.
    """
    dir = dir or os.environ.get("OPENAI_LOGDIR") or _fresh_dir()
    dir = os.path.expanduser(dir)
    os.makedirs(dir, exist_ok=True)
    rank = comm.Get_rank() if comm is not None else dist_util.get_rank()
    if format_strs is None:
        if rank == 0:
            format_strs = os.environ.get("OPENAI_LOG_FORMAT", "stdout,log,csv").split(",")
        else:
            format_strs = os.environ.get("OPENAI_LOG_FORMAT_MPI", "").split(",")
    format_strs = [f.strip() for f in format_strs if f and f.strip()]
    outputs = [make_output_format(f, dir, log_suffix) for f in format_strs]
    outputs = [o for o in outputs if o is not None]
    if _State.current is not None and _State.current is not _State.default:
        _State.current.close()
    _State.current = Logger(dir=dir, output_formats=outputs, comm=comm)
    if outputs:
        log(f"Logging to {dir}")
    return _State.current


def reset():
    """Close the configured logger and go back to the default one."""
    if _State.current is not None and _State.current is not _State.default:
        _State.current.close()
    _State.current = _State.default


@contextlib.contextmanager
def scoped_configure(dir=None, format_strs=None, comm=None):
    """Log to another place inside a ``with`` block, then restore the previous logger."""
    previous = get_current()
    configure(dir=dir, format_strs=format_strs, comm=comm)
    try:
        yield _State.current
    finally:
        _State.current.close()
        _State.current = previous


# ----------------------------------------------------------------------------
# Module-level API on the current logger


def logkv(key, val):
    """Set ``key`` to ``val`` for the next dump."""
    get_current().logkv(key, val)


def logkv_mean(key, val):
    """Fold ``val`` into the running mean of ``key`` for the next dump."""
    get_current().logkv_mean(key, val)


def logkvs(d):
    """logkv for every item of ``d``."""
    for k, v in d.items():
        logkv(k, v)


def dumpkvs():
    """Write the pending key/values (collective across ranks) and return them."""
    return get_current().dumpkvs()


def getkvs():
    """The pending (not yet dumped) key/values of this rank."""
    return get_current().name2val


def log(*args, level=INFO):
    """Write ``args`` as one line to stdout/log.txt."""
    get_current().log(*args, level=level)


def debug(*args):
    """log at DEBUG level."""
    log("DEBUG:", *args, level=DEBUG)


def info(*args):
    """log at INFO level."""
    log(*args, level=INFO)


def warn(*args):
    """log at WARN level, prefixed 'WARNING:'."""
    log("WARNING:", *args, level=WARN)


def error(*args):
    """log at ERROR level, prefixed 'ERROR:'."""
    log("ERROR:", *args, level=ERROR)


def set_level(level):
    """Drop text messages below ``level``."""
    get_current().set_level(level)


def get_dir():
    """The current logging directory (None before ``configure``)."""
    return get_current().get_dir()


record_tabular = logkv
dump_tabular = dumpkvs


def save_args(args, dir=None):
    """Write ``args`` (dict or argparse.Namespace) as sorted, indented args.json on rank 0.

    Returns the path written on rank 0, None on other ranks.
    """
    if dist_util.get_rank() != 0:
        return None
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    dir = dir or get_dir()
    if dir is None:
        raise ValueError("save_args: no directory given and logger.configure() has not set one")
    os.makedirs(dir, exist_ok=True)
    path = os.path.join(dir, "args.json")
    with open(path, "wt") as f:
        json.dump(dict(args), f, sort_keys=True, indent=2, default=str)
        f.write("\n")
    return path
