"""Command-line plumbing shared by the scripts: one-line errors, failures agreed across ranks."""

import argparse
import os
import sys
import warnings

import torch
import torch.distributed as dist

from . import dist_util


class UsageError(ValueError):
    """A bad flag or input that every rank raises identically; printed once, as one line."""


# training code's name for an error every rank agreed on (see `on_all_ranks`)
AgreedError = UsageError


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are a single line on stderr (exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def on_all_ranks(fn):
    """Return ``fn()``; if it fails on ANY rank, raise the same one-line error on every rank.

    For setup steps that can fail on some ranks only (each rank checks its own
    data shard): without this, the ranks that passed would go on into the next
    collective and die of a lost peer instead of reporting the real problem.
    """
    error = None
    try:
        result = fn()
    except (ValueError, OSError) as exc:
        error, result = exc, None
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        if error is not None:
            raise error
        return result
    # One small all-reduce in the common case (cheap enough for every step's batch);
    # the messages are gathered only when some rank failed.
    device = dist_util.dev() if dist.get_backend() == "nccl" else torch.device("cpu")
    failed_anywhere = torch.tensor([0 if error is None else 1], device=device)
    dist.all_reduce(failed_anywhere)
    if not int(failed_anywhere.item()):
        return result
    messages = [None] * dist.get_world_size()
    mine = None if error is None else " ".join(str(error).split()) or type(error).__name__
    dist.all_gather_object(messages, mine)
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        rank, message = failed[0]
        raise AgreedError(f"process {rank}: {message}") from error
    return result


def _one_line_warning(message, category, filename, lineno, line=None):
    return f"{category.__name__}: {message}\n"


def _leave_group_together():
    """After an error every rank agreed on: leave the process group together, so that no
    rank's exit pulls the rendezvous store from under another (a stray C++ abort line)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001  (exiting anyway; the error line is already out)
            pass


def run_cli(main, argv=None):
    """Run a script's ``main(argv)`` and return its exit status.

    ValueError/OSError (bad flags, data, checkpoints, missing files) print
    ``<script>: error: <message>`` on one line and give status 1 (a
    `UsageError` only on rank 0, since every rank has it); set CM_TRACEBACK=1
    to see the traceback instead. Warnings print as one line too. A lost
    process (a peer that died, a collective that timed out) prints one line
    and ends this process at once with status 1: shutting down a process
    group or MPI with a dead peer can itself hang.
    """
    warnings.formatwarning = _one_line_warning
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "cm"
    try:
        main(argv)
    except (ValueError, OSError) as exc:
        if os.environ.get("CM_TRACEBACK"):
            raise
        sys.stdout.flush()
        if not isinstance(exc, UsageError) or dist_util.get_rank() == 0:
            message = " ".join(str(exc).split()) or type(exc).__name__
            print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        if isinstance(exc, UsageError):
            _leave_group_together()
        return 1
    except RuntimeError as exc:
        reason = dist_util.lost_process_reason(exc)
        if reason is None or os.environ.get("CM_TRACEBACK"):
            raise
        sys.stdout.flush()
        print(f"{prog}: error: process {dist_util.get_rank()}: {reason}", file=sys.stderr, flush=True)
        if dist_util.is_distributed():
            os._exit(1)
        return 1
    return 0


def parse_ema_rates(ema_rate):
    """EMA rates from a float, a comma list ("0.999,0.9999") or a sequence."""
    if isinstance(ema_rate, (int, float)):
        items = [ema_rate]
    elif isinstance(ema_rate, str):
        items = [x for x in ema_rate.split(",") if x.strip()]
    else:
        items = list(ema_rate)
    try:
        rates = [float(x) for x in items]
    except (TypeError, ValueError):
        raise ValueError(f"--ema_rate must be a comma list of numbers in [0, 1], got {ema_rate!r}") from None
    for r in rates:
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"--ema_rate values must lie in [0, 1], got {r}")
    return rates
