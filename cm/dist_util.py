"""Distributed helpers: launch detection, process group setup, rank-0 reads.

Three ways to run a script, all supported:

* plain ``python script.py``: one process; ``setup_dist`` builds a 1-process
  group on an in-memory store (no port), so every ``torch.distributed`` call
  works;
* ``mpiexec -n K python script.py``: rank/size come from ``MPI.COMM_WORLD``;
  rank 0 picks a free port and broadcasts it, then the torch group is created
  with ``init_method="env://"``. An uncaught exception in any rank aborts the
  whole MPI job instead of leaving the others hanging;
* ``torchrun --nproc_per_node K script.py``: the launcher's ``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` are used
  as they are; MPI is not touched (each torchrun worker is an MPI singleton).

``get_rank``/``get_world_size`` work before and without a process group.
Collectives time out after ``setup_dist(timeout=...)`` seconds (the training scripts'
``--dist_timeout``, default 300), else ``CM_DIST_TIMEOUT_S``, else 1800 (sampling
and evaluation scripts, whose rank 0 may write for a long while), so a rank that
stops answering turns into an error rather than a hang; `lost_process_reason`
recognises such errors (and a peer that died) for the one-line report.
"""

import atexit
import datetime
import os
import socket
import sys
import time
import traceback

import blobfile as bf
import torch
import torch.distributed as dist

from .formats.torch_weights import load_weights_bytes
from .formats.untrusted import read_regular

DEFAULT_TIMEOUT_S = 1800.0

# Environment variables through which MPI launchers announce a rank.
_MPI_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")

# Environment variables through which MPI launchers announce the node-local rank.
_LOCAL_RANK_VARS = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")

# Largest piece of a checkpoint sent in one MPI broadcast (MPI counts are int32).
_MPI_CHUNK_BYTES = 2**30

# Seconds between printing an uncaught exception and aborting the MPI job.
_ABORT_GRACE_S = 0.5

_excepthook_installed = False


# ----------------------------------------------------------------------------
# Launch detection (no process group needed)


def _launched_by_torchrun():
    """True when a torch launcher (torchrun, or a user) set RANK and WORLD_SIZE."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _launched_by_mpi():
    """True when an MPI launcher (mpiexec/mpirun) started this process."""
    return not _launched_by_torchrun() and any(v in os.environ for v in _MPI_RANK_VARS)


def _mpi_comm():
    """MPI.COMM_WORLD when running under an MPI launcher, else None."""
    if not _launched_by_mpi():
        return None
    from mpi4py import MPI  # imported lazily: MPI_Init only when MPI launched us

    return MPI.COMM_WORLD


def _group_ready():
    """True when a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank():
    """Global rank of this process: process group, else env RANK, else MPI, else 0."""
    if _group_ready():
        return dist.get_rank()
    if _launched_by_torchrun():
        return int(os.environ["RANK"])
    comm = _mpi_comm()
    return comm.Get_rank() if comm is not None else 0


def get_world_size():
    """Number of processes: process group, else env WORLD_SIZE, else MPI, else 1."""
    if _group_ready():
        return dist.get_world_size()
    if _launched_by_torchrun():
        return int(os.environ["WORLD_SIZE"])
    comm = _mpi_comm()
    return comm.Get_size() if comm is not None else 1


def get_local_rank():
    """Rank of this process among those on the same machine (no communication)."""
    for var in ("LOCAL_RANK",) + _LOCAL_RANK_VARS:
        if var in os.environ:
            return int(os.environ[var])
    return 0


def is_distributed():
    """True when more than one process takes part in the job."""
    return get_world_size() > 1


def is_main_process():
    """True on global rank 0."""
    return get_rank() == 0


def print0(*args, **kwargs):
    """print() on rank 0 only (flushed, so it interleaves sanely with other output)."""
    if is_main_process():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


# ----------------------------------------------------------------------------
# Process group setup


def dist_timeout():
    """Collective timeout: env CM_DIST_TIMEOUT_S seconds, default 1800."""
    raw = os.environ.get("CM_DIST_TIMEOUT_S", "")
    if not raw:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"CM_DIST_TIMEOUT_S must be a positive number of seconds, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def _free_port():
    """A TCP port on this machine that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _install_mpi_excepthook(comm):
    """Make an uncaught exception in one rank abort every rank of the MPI job.

    The traceback goes straight to the process's real stderr: torch's own
    excepthook (installed by init_process_group, around this one) captures
    what inner hooks print and would only write it after we return, which an
    abort never does.
    """
    global _excepthook_installed
    if _excepthook_installed:
        return
    rank = comm.Get_rank()

    def abort_all(exc_type, exc, tb):
        # Print the traceback, each line tagged with the rank, then end the job.
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        stream = sys.__stderr__ or sys.stderr
        stream.write("".join(f"[rank{rank}]: {line}\n" for line in text.splitlines()))
        stream.flush()
        sys.stdout.flush()
        # Give the launcher a moment to forward the output before the abort.
        time.sleep(_ABORT_GRACE_S)
        comm.Abort(1)

    sys.excepthook = abort_all
    _excepthook_installed = True


def _mpi_rendezvous(comm):
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from MPI."""
    from mpi4py import MPI

    rank = comm.Get_rank()
    # Also lines the ranks up, so torch's rendezvous starts with everyone present.
    hosts = comm.allgather(socket.gethostname())
    master = None
    if rank == 0:
        # Rank 0 chooses the rendezvous point; an explicit MASTER_* wins.
        if "MASTER_ADDR" in os.environ:
            addr = os.environ["MASTER_ADDR"]
        elif len(set(hosts)) == 1:
            addr = "127.0.0.1"
        else:
            addr = socket.gethostbyname(socket.getfqdn())
        port = os.environ.get("MASTER_PORT") or str(_free_port())
        master = (addr, port)
    addr, port = comm.bcast(master, root=0)
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(comm.Get_size())
    # Ranks sharing memory are the ranks on this node (a collective call).
    os.environ["LOCAL_RANK"] = str(comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank())


def _close_group_at_exit():
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001  (exiting anyway)
            pass


def setup_dist(backend=None, timeout=None):
    """Create the default process group (idempotent): NCCL on GPU, gloo on CPU.

    ``timeout``: seconds (or a timedelta) a collective may wait for the other
    ranks; None = `dist_timeout()`.
    """
    if _group_ready():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if timeout is None:
        timeout = dist_timeout()
    elif not isinstance(timeout, datetime.timedelta):
        if not timeout > 0:
            raise ValueError(f"--dist_timeout must be a positive number of seconds, got {timeout}")
        timeout = datetime.timedelta(seconds=float(timeout))
    comm = _mpi_comm()
    if comm is not None and comm.Get_size() > 1:
        _install_mpi_excepthook(comm)
        _mpi_rendezvous(comm)
    if torch.cuda.is_available():
        torch.cuda.set_device(dev())
    # Close the group before the interpreter tears down: a gloo group left open at exit
    # can abort the process ("terminate called without an active exception").
    atexit.register(_close_group_at_exit)
    if get_world_size() == 1:
        # One process: an in-memory store, no port to pick or collide on.
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    else:
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=get_rank(),
            world_size=get_world_size(),
            timeout=timeout,
        )


# Words in the errors of gloo/NCCL/the store when a peer died or stopped answering.
_LOST_PEER_WORDS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "timed out",
    "timeout",
    "gloo",
    "nccl",
    "socket",
)


def lost_process_reason(exc):
    """One line saying how the job lost a process, when ``exc`` is such an error; else None.

    Two kinds: a collective that failed or timed out because another rank died
    or stopped answering, and a data-loading worker killed under us (torchrun
    terminates the survivors' process groups when one rank dies).
    """
    if not isinstance(exc, RuntimeError):
        return None
    text = " ".join(str(exc).split())
    lower = text.lower()
    if "dataloader worker" in lower and ("killed by signal" in lower or "exited unexpectedly" in lower):
        return f"a data-loading worker process died ({text[:300]}); rerun with --resume_checkpoint auto"
    if not _group_ready() or dist.get_world_size() < 2:
        return None
    is_dist_error = isinstance(exc, getattr(dist, "DistError", ()))
    if not (is_dist_error or any(w in lower for w in _LOST_PEER_WORDS)):
        return None
    what = "a collective timed out" if "time" in lower else "a process of the job died or closed its connection"
    return f"lost contact with another process ({what}: {text[:300]}); rerun with --resume_checkpoint auto"


def dev():
    """The device for this process: cuda:{local_rank % device_count}, else cpu."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{get_local_rank() % torch.cuda.device_count()}")
    return torch.device("cpu")


def collective_device():
    """Where tensors must live for collectives of the default group."""
    if _group_ready() and dist.get_backend() == "nccl":
        return dev()
    return torch.device("cpu")



def in_process_group():
    """True when a torch.distributed group of more than one process is initialised."""
    return _group_ready() and dist.get_world_size() > 1


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank of the process group (``obj`` itself without one)."""
    if not in_process_group():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=collective_device())
    return box[0]


def any_rank(flag):
    """True on every rank when ``flag`` is true on any rank (collective within a process group)."""
    if not in_process_group():
        return bool(flag)
    value = torch.tensor([int(flag)], device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def ddp_no_buffer_broadcast():
    """DDP keyword for "do not broadcast buffers before each forward" (the original's
    broadcast_buffers=False; newer torch spells it forward_sync_buffers and warns on the old one)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


# Debug switch: with several processes, train WITHOUT DistributedDataParallel
# (no gradient all-reduce), so a test can tell synced ranks from unsynced ones.
NO_GRAD_SYNC_ENV = "CM_NO_GRAD_SYNC"


def wrap_ddp(model, log=print):
    """``model`` under DistributedDataParallel in a process group (else as it is), buffers not broadcast.

    ``CM_NO_GRAD_SYNC`` set: the model as it is, with a warning through ``log``.
    """
    if not in_process_group():
        return model
    if os.environ.get(NO_GRAD_SYNC_ENV):
        log(f"WARNING: {NO_GRAD_SYNC_ENV} is set: gradients are NOT synchronised across processes")
        return model
    from torch.nn.parallel import DistributedDataParallel

    cuda = dev().type == "cuda"
    return DistributedDataParallel(
        model,
        device_ids=[dev()] if cuda else None,
        output_device=dev() if cuda else None,
        bucket_cap_mb=128,
        find_unused_parameters=False,
        **ddp_no_buffer_broadcast(),
    )


def barrier():
    """Wait for every rank (no-op in a single process)."""
    if not is_distributed():
        return
    if _group_ready():
        dist.barrier()
    else:
        _mpi_comm().Barrier()


# ----------------------------------------------------------------------------
# Rank-0 reads, broadcasts


def _read_on_rank0(path):
    """Rank 0's view of the file: ("ok", bytes), ("missing", message) or ("error", message).

    Failures are returned, not raised, so that every rank can raise them
    together instead of the others waiting for bytes that never come.
    """
    try:
        if not bf.exists(path):
            return ("missing", f"checkpoint not found: {path}")
        if "://" not in str(path):  # a local file: only a regular one, read in bounded chunks
            return ("ok", read_regular(path, what="checkpoint"))
        with bf.BlobFile(path, "rb") as f:
            return ("ok", f.read())
    except Exception as exc:  # permissions, a directory, remote storage errors...
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        return ("error", f"cannot read checkpoint {path}: {reason}")


def _broadcast_bytes_torch(payload):
    """Send rank 0's (status, bytes) to every rank through the process group."""
    device = collective_device()
    head = [None]
    if payload is not None:
        head = [payload if payload[0] != "ok" else ("ok", len(payload[1]))]
    # The status (or the error) travels as a small object, the bytes as a tensor.
    dist.broadcast_object_list(head, src=0, device=device)
    if head[0][0] != "ok":
        return head[0]
    if head[0][1] == 0:
        return ("ok", b"")
    if payload is not None:
        buf = torch.frombuffer(bytearray(payload[1]), dtype=torch.uint8).to(device)
    else:
        buf = torch.empty(head[0][1], dtype=torch.uint8, device=device)
    dist.broadcast(buf, src=0)
    return payload if payload is not None else ("ok", buf.cpu().numpy().tobytes())


def _broadcast_bytes_mpi(comm, payload):
    """Send rank 0's (status, bytes) to every rank with MPI, in chunks."""
    head = None
    if payload is not None:
        head = payload if payload[0] != "ok" else ("ok", len(payload[1]))
    head = comm.bcast(head, root=0)
    if head[0] != "ok":
        return head
    if payload is not None:
        for start in range(0, head[1], _MPI_CHUNK_BYTES):
            comm.bcast(payload[1][start : start + _MPI_CHUNK_BYTES], root=0)
        return payload
    chunks = [comm.bcast(None, root=0) for _ in range(0, head[1], _MPI_CHUNK_BYTES)]
    return ("ok", b"".join(chunks))


def load_state_dict(path, **kwargs):
    """torch.load a checkpoint that rank 0 alone reads and shares with all ranks.

    ``weights_only=True`` always (a checkpoint can never run code), after the checks of
    `cm.formats.torch_weights` (plain state-dict globals, uncompressed members, dense CPU tensors);
    ``map_location`` defaults to "cpu". A missing file raises the same one-line
    FileNotFoundError on every rank; a file rank 0 cannot read, a one-line OSError.
    """
    if kwargs.pop("weights_only", True) is not True:
        raise ValueError("load_state_dict always uses weights_only=True; a checkpoint must not run code")
    kwargs.setdefault("map_location", "cpu")
    payload = _read_on_rank0(path) if is_main_process() else None
    if is_distributed():
        if _group_ready():
            payload = _broadcast_bytes_torch(payload)
        else:
            payload = _broadcast_bytes_mpi(_mpi_comm(), payload)
    status, data = payload
    if status == "missing":
        raise FileNotFoundError(data)
    if status == "error":
        raise OSError(data)
    return load_weights_bytes(data, path, **kwargs)


def sync_params(params):
    """Overwrite every tensor in ``params`` with rank 0's values, in place."""
    if not is_distributed():
        return
    comm = None if _group_ready() else _mpi_comm()
    with torch.no_grad():
        for p in params:
            if comm is None:
                dist.broadcast(p.data, src=0)
            else:
                # MPI-only: go through a contiguous CPU copy.
                host = p.detach().cpu().contiguous()
                comm.Bcast(host.numpy(), root=0)
                p.data.copy_(host)
