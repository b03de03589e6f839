"""Run by tests/test_dist_util.py under mpiexec, torchrun, or plainly.

Usage: dist_check.py EXPECTED_WORLD CHECKPOINT OUT_DIR

Exercises setup_dist, the rank helpers, sync_params, load_state_dict (rank 0
gets the real checkpoint path, other ranks a path that does not exist, so a
rank that opened the file itself would fail) and the logger's cross-rank
averaging, then writes OUT_DIR/rank{r}.json for the test to inspect.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from cm import dist_util, logger


def main():
    expected_world, ckpt, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    before = (dist_util.get_rank(), dist_util.get_world_size())
    dist_util.setup_dist()
    dist_util.setup_dist()  # idempotent
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    res = {
        "rank": rank,
        "world": world,
        "before_group": list(before),
        "expected_world": expected_world,
        "is_main": dist_util.is_main_process(),
        "is_distributed": dist_util.is_distributed(),
        "local_rank": dist_util.get_local_rank(),
        "dev": str(dist_util.dev()),
        "backend": dist.get_backend(),
    }

    # sync_params: rank-dependent parameters become rank 0's.
    torch.manual_seed(1000 + rank)
    net = torch.nn.Linear(4, 3)
    extra = torch.full((5,), float(rank + 1))
    dist_util.sync_params(list(net.parameters()) + [extra])
    flat = torch.cat([p.detach().flatten() for p in net.parameters()] + [extra])
    res["synced"] = flat.tolist()

    # load_state_dict: only rank 0's path exists.
    path = ckpt if rank == 0 else ckpt + f".absent-on-rank-{rank}"
    state = dist_util.load_state_dict(path, map_location="cpu")
    res["loaded"] = {k: v.tolist() for k, v in sorted(state.items())}

    # A checkpoint missing everywhere: every rank gets the same one-line error.
    try:
        dist_util.load_state_dict(os.path.join(out_dir, "missing.pt"))
        res["missing_error"] = None
    except FileNotFoundError as exc:
        res["missing_error"] = str(exc)

    # Logger: logkv_mean averaged over ranks; auto dir agreed on by all ranks.
    logger.configure(dir=os.path.join(out_dir, "log"))
    for v in range(rank + 1):
        logger.logkv_mean("loss", float(10 * rank + v))  # rank0: 0; rank1: 10, 11
    logger.logkv("step", 7)
    res["dumped"] = logger.dumpkvs()
    os.environ.pop("OPENAI_LOGDIR", None)
    logger.configure(format_strs=[])
    res["auto_dir"] = logger.get_dir()
    logger.reset()

    dist_util.barrier()
    dist_util.print0("PRINT0-MARKER")
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
