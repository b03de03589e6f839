import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
# the golden numbers were produced with two threads; this machine has two cores
torch.set_num_threads(2)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_process_group_left_behind():
    """Scripts run in-process create a one-process group and configure the logger: close both,
    so later tests start without a group and do not write to a closed log file."""
    yield
    from cm import logger

    logger.reset()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
