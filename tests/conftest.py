import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
# the golden numbers were produced with two threads; this machine has two cores
torch.set_num_threads(2)
