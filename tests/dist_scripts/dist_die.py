"""Run by tests/test_dist_util.py: one rank fails, the job must end, not hang.

Usage: dist_die.py MODE
  raise: rank 1 raises an uncaught exception while rank 0 is busy (sleeping,
         outside any collective): only the MPI abort can end rank 0 early.
  stall: rank 1 sleeps past the collective timeout while rank 0 waits in a
         barrier; rank 0's collective must time out (set CM_DIST_TIMEOUT_S).
"""

import sys
import time

from cm import dist_util


def main():
    mode = sys.argv[1]
    dist_util.setup_dist()
    print(f"SETUP-DONE rank {dist_util.get_rank()}", flush=True)
    if dist_util.get_rank() == 1:
        if mode == "raise":
            raise RuntimeError("rank 1 fails on purpose")
        time.sleep(300)
    elif mode == "raise":
        time.sleep(300)
    dist_util.barrier()
    print("UNREACHABLE: barrier passed", flush=True)


if __name__ == "__main__":
    main()
