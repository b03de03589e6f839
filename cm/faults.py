"""Faults of long training runs: non-finite steps, checkpoint sets that fail to save or to load.

* `BadStepGuard`: a step whose loss or gradients are not finite is skipped
  (no optimiser step, no EMA update) and counted; ``max_bad_steps`` of them in
  a row stop the run with one line naming the step and the last good
  checkpoint. fp16 runs keep their loss-scale logic instead.
* `write_checkpoint_set`: every file of a set is serialised in memory first,
  then written atomically, model file last; a failed save removes the files of
  the new set it had written, so the previous set stays the newest complete one
  and no temporary file is left.
* `newest_usable_checkpoint`: ``--resume_checkpoint auto``'s choice, the newest
  set whose files are all regular files holding usable tensors (never opening a FIFO or
  device); a bad newest file is a warning naming it.

* `StopOnSigterm`: SIGTERM while a loop runs asks it to finish the step, save
  and stop; every rank agrees.

``CM_INJECT_NAN_STEPS="a:b"`` (tests only) makes steps a..b-1 produce a NaN loss.
"""

import io
import os
import signal
import threading
import warnings

import torch

from . import dist_util
from .checkpoint import MODEL_FILE, checkpoint_filename
from .fileio import write_atomic
from .formats.torch_weights import load_weights_bytes
from .formats.untrusted import read_regular

# Test-only switch: "a:b" gives steps a, a+1, ..., b-1 a NaN loss.
INJECT_NAN_ENV = "CM_INJECT_NAN_STEPS"


class TrainingStopped(ValueError):
    """The run cannot go on (too many bad steps); the message is one line."""


# ----------------------------------------------------------------------------
# Non-finite steps


def injected_nan_steps(raw=None):
    """range of steps that get a NaN loss from ``CM_INJECT_NAN_STEPS`` ("a:b"), or an empty range."""
    raw = os.environ.get(INJECT_NAN_ENV, "") if raw is None else raw
    if not raw:
        return range(0)
    try:
        start, stop = (int(x) for x in raw.split(":"))
    except ValueError:
        raise ValueError(f"{INJECT_NAN_ENV} must look like 'a:b' (steps a..b-1), got {raw!r}") from None
    return range(start, stop)


def maybe_inject_nan(loss, step, steps):
    """``loss`` made NaN when ``step`` is one of ``steps`` (the test switch), else unchanged."""
    if step in steps:
        return loss * float("nan")
    return loss


def grads_finite(params):
    """True when every gradient of ``params`` is finite (params without a gradient are ignored)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    with torch.no_grad():  # per-tensor L2 norms: one vectorised pass, no temporary copies of the gradients
        return bool(torch.stack(torch._foreach_norm(grads)).isfinite().all())


class BadStepGuard:
    """Counts skipped non-finite steps; stops the run after ``max_bad_steps`` in a row."""

    def __init__(self, max_bad_steps):
        if max_bad_steps < 1:
            raise ValueError(f"--max_bad_steps must be positive, got {max_bad_steps}")
        self.max_bad_steps = max_bad_steps
        self.total = 0
        self.in_a_row = 0

    def good(self):
        """Record a finite step."""
        self.in_a_row = 0

    def check(self, params, step, last_checkpoint, log):
        """True when a gradient of ``params`` is not finite: step ``step`` is to be skipped (`bad`).

        ``log``: `cm.logger` (the skip's line, ``bad_steps``).
        """
        if grads_finite(params):
            self.good()
            log.logkv("bad_steps", self.total)
            return False
        log.log(f"step {step}: loss or gradients not finite; step skipped")
        log.logkv("bad_steps", self.total + 1)
        self.bad(step, last_checkpoint)
        return True

    def bad(self, step, last_checkpoint):
        """Record a skipped step ``step``; raise TrainingStopped when the limit is reached."""
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_bad_steps:
            first = step - self.in_a_row + 1
            raise TrainingStopped(
                f"loss or gradients not finite for {self.in_a_row} consecutive steps ({first}..{step}, "
                f"--max_bad_steps {self.max_bad_steps}); stopped at step {step} without saving; "
                f"last good checkpoint: {last_checkpoint or 'none'}"
            )


# ----------------------------------------------------------------------------
# Writing a checkpoint set


def serialise(state):
    """``torch.save(state)`` into bytes."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def write_checkpoint_set(directory, files):
    """Write [(name, state or bytes)] into ``directory``, each atomically, in order (model file last).

    Everything is serialised before the first byte is written. On a failure the
    files of this set already renamed into place are removed again (the temp
    file is removed by `write_atomic`) and the error is re-raised.
    """
    payloads = [(name, data if isinstance(data, bytes) else serialise(data)) for name, data in files]
    os.makedirs(directory, exist_ok=True)
    written = []
    try:
        for name, data in payloads:
            path = os.path.join(directory, name)
            write_atomic(path, lambda f, data=data: f.write(data))
            written.append(path)
    except BaseException:
        for path in written:
            try:
                os.remove(path)
            except OSError:
                pass
        raise


# ----------------------------------------------------------------------------
# Choosing the set to resume from


def set_file_names(step, ema_rates, extra_kinds=()):
    """Names of every file of the set of ``step`` (model last)."""
    names = [checkpoint_filename("opt", step)]
    names += [checkpoint_filename("ema", step, rate) for rate in ema_rates]
    names += [checkpoint_filename(kind, step) for kind in extra_kinds]
    return names + [checkpoint_filename("model", step)]


def _unusable_file(path):
    """None when ``path`` is a regular file holding usable weights, else a short reason.

    Usable: it loads through `cm.formats.torch_weights` (no FIFO or device is opened)
    as a dict, and every file but the optimiser's maps names to tensors, some of them
    floating-point weights.
    """
    if not os.path.lexists(path):
        return "missing"
    try:
        state = load_weights_bytes(read_regular(path, what="checkpoint"), path)
    except Exception as exc:  # truncated, corrupt, unreadable, hostile: any reason means "do not use"
        text = " ".join(str(exc).split())[:300]
        return f"{type(exc).__name__}: {text}"
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not a state dict"
    if os.path.basename(path).startswith("opt"):
        return None  # an optimiser's state dict: its layout is checked when it is loaded
    if not all(type(k) is str and isinstance(v, torch.Tensor) for k, v in state.items()) or not any(
            v.is_floating_point() for v in state.values()):
        return "not a mapping of names to tensors (with floating-point weights)"
    return None


def newest_usable_checkpoint(directory, ema_rates, extra_kinds=()):
    """Model path of the newest set in ``directory`` whose files all exist and load, or None.

    A set needs its model, opt, one ema file per rate and one file per
    ``extra_kinds`` ("target_model", ...). Each newer set passed over is a
    warning naming its first bad file.
    """
    if not directory or not os.path.isdir(directory):
        return None
    steps = sorted({int(m.group(1)) for m in map(MODEL_FILE.match, os.listdir(directory)) if m}, reverse=True)
    for step in steps:
        bad = None
        for name in set_file_names(step, ema_rates, extra_kinds):
            reason = _unusable_file(os.path.join(directory, name))
            if reason is not None:
                bad = (os.path.join(directory, name), reason)
                break
        if bad is None:
            return os.path.join(directory, checkpoint_filename("model", step))
        warnings.warn(
            f"--resume_checkpoint auto: skipping the checkpoint of step {step}: {bad[0]} is unusable ({bad[1]})",
            stacklevel=2,
        )
    return None



class StopOnSigterm:
    """Records SIGTERM while the loop runs; `requested()` agrees across ranks."""

    _UNSET = object()

    def __enter__(self):
        self.received = False
        self._previous = self._UNSET
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        if self._previous is not self._UNSET:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
        return False

    def requested(self):
        """True on every rank when any rank got SIGTERM (collective with several processes)."""
        return dist_util.any_rank(self.received)
