"""Seeded noise generators for sampling, reproducible across batch and world sizes.

``determ`` draws the noise of all ``num_samples`` samples from one generator at
every call and keeps the rows of the samples this rank is producing now, so
sample k receives the same noise whatever the batch size or number of ranks.
``determ-indiv`` gives each sample its own generator instead.
"""

import random

import numpy as np
import torch
import torch.distributed as dist

GENERATORS = ("dummy", "determ", "determ-indiv")


def get_generator(generator, num_samples=0, seed=0, rank=None, world_size=None):
    """Build a generator by name: "dummy", "determ" or "determ-indiv".

    ``rank``/``world_size`` default to the torch.distributed process group, or
    0/1 without one.
    """
    if generator == "dummy":
        return DummyGenerator()
    if generator == "determ":
        return DeterministicGenerator(num_samples, seed, rank=rank, world_size=world_size)
    if generator == "determ-indiv":
        return DeterministicIndividualGenerator(num_samples, seed, rank=rank, world_size=world_size)
    raise ValueError(f"unknown generator {generator!r}; choose one of {', '.join(GENERATORS)}")


def _rank_and_world(rank, world_size):
    if rank is None or world_size is None:
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        else:
            rank = 0 if rank is None else rank
            world_size = 1 if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of size {world_size}")
    return rank, world_size


class DummyGenerator:
    """The global torch RNG."""

    def randn(self, *args, **kwargs):
        return torch.randn(*args, **kwargs)

    def randint(self, *args, **kwargs):
        return torch.randint(*args, **kwargs)

    def randn_like(self, *args, **kwargs):
        return torch.randn_like(*args, **kwargs)

    def set_done_samples(self, done_samples):
        """No window to move: the global RNG simply continues."""


class _WindowedGenerator:
    """Shared bookkeeping: which sample indices this rank draws at this call."""

    def __init__(self, num_samples, seed=0, rank=None, world_size=None):
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.num_samples = num_samples
        self.done_samples = 0
        self.seed = seed

    def sample_indices(self, batch_size):
        """Indices done + rank, done + rank + world, … of the current batch (clamped)."""
        start = self.done_samples + self.rank
        stop = self.done_samples + self.world_size * int(batch_size)
        indices = torch.arange(start, stop, self.world_size)
        indices = torch.clamp(indices, 0, self.num_samples - 1)
        assert len(indices) == batch_size, (self.rank, self.world_size, len(indices), batch_size)
        return indices

    def randn_like(self, tensor):
        return self.randn(*tensor.size(), dtype=tensor.dtype, device=tensor.device)

    def get_seed(self):
        return self.seed

    @staticmethod
    def _new_generator(device, seed):
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        return g


class DeterministicGenerator(_WindowedGenerator):
    """One generator per device; each draw covers all samples, this rank keeps its rows."""

    def __init__(self, num_samples, seed=0, rank=None, world_size=None):
        super().__init__(num_samples, seed, rank, world_size)
        self.rng_cpu = self._new_generator("cpu", seed)
        self._rng_cuda = {}

    def get_generator(self, device):
        device = torch.device(device)
        if device.type == "cpu":
            return self.rng_cpu
        key = str(device)
        if key not in self._rng_cuda:
            self._rng_cuda[key] = self._new_generator(device, self.seed)
        return self._rng_cuda[key]

    def randn(self, *size, dtype=torch.float, device="cpu"):
        indices = self.sample_indices(size[0])
        full = torch.randn(self.num_samples, *size[1:], generator=self.get_generator(device), dtype=dtype, device=device)
        return full[indices.to(full.device)]

    def randint(self, low, high, size, dtype=torch.long, device="cpu"):
        indices = self.sample_indices(size[0])
        full = torch.randint(
            low, high, (self.num_samples, *size[1:]), generator=self.get_generator(device), dtype=dtype, device=device
        )
        return full[indices.to(full.device)]

    def set_done_samples(self, done_samples):
        """Move the window to start at sample `done_samples` and restart the streams."""
        self.done_samples = done_samples
        self.set_seed(self.seed)

    def set_seed(self, seed):
        self.seed = seed
        self.rng_cpu.manual_seed(seed)
        for g in self._rng_cuda.values():
            g.manual_seed(seed)


class DeterministicIndividualGenerator(_WindowedGenerator):
    """One generator per sample index, seeded with index + num_samples·seed."""

    def __init__(self, num_samples, seed=0, rank=None, world_size=None):
        super().__init__(num_samples, seed, rank, world_size)
        self._rngs = {}
        self.set_seed(seed)

    def get_generator(self, device):
        """The list of per-sample generators living on `device`."""
        device = torch.device(device)
        key = "cpu" if device.type == "cpu" else str(device)
        if key not in self._rngs:
            self._rngs[key] = [
                self._new_generator(device, i + self.num_samples * self.seed) for i in range(self.num_samples)
            ]
        return self._rngs[key]

    def _per_sample(self, device, indices, draw):
        # one draw per distinct sample: rows clamped past the end repeat the last
        # sample's row instead of advancing its stream a second time
        gens = self.get_generator(device)
        rows = {i: draw(gens[i]) for i in dict.fromkeys(indices.tolist())}
        return torch.cat([rows[i] for i in indices.tolist()])

    def randn(self, *size, dtype=torch.float, device="cpu"):
        indices = self.sample_indices(size[0])
        return self._per_sample(device, indices, lambda g: torch.randn(1, *size[1:], generator=g, dtype=dtype, device=device))

    def randint(self, low, high, size, dtype=torch.long, device="cpu"):
        indices = self.sample_indices(size[0])
        return self._per_sample(
            device, indices, lambda g: torch.randint(low, high, (1, *size[1:]), generator=g, dtype=dtype, device=device)
        )

    def set_done_samples(self, done_samples):
        """Move the window; each sample's own stream simply continues."""
        self.done_samples = done_samples

    def set_seed(self, seed):
        self.seed = seed
        for gens in self._rngs.values():
            for i, g in enumerate(gens):
                g.manual_seed(i + self.num_samples * seed)


# ----------------------------------------------------------------------------
# Seeds of the training loops: pure functions of (seed, rank, step, purpose)

# Purposes of derived seeds, so the streams never coincide.
SEED_STEP, SEED_DATA_ORDER, SEED_FLIPS = 0, 1, 2


def derived_seed(*keys):
    """A 63-bit seed that is a pure function of non-negative integer ``keys``."""
    words = np.random.SeedSequence([int(k) for k in keys]).generate_state(2)
    return (int(words[0]) | (int(words[1]) << 32)) & (2**63 - 1)


def seed_all(seed):
    """Seed torch (CPU and CUDA), NumPy's and Python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
