"""Samplers of training noise levels.

Index samplers (``uniform``, ``loss-second-moment``) draw indices into the
denoiser's ``num_timesteps``-point grid with importance weights; ``lognormal``
draws σ directly, ln σ ~ N(P_mean, P_std²) (Karras et al. 2022).
"""

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.distributed as dist

from .schedules import get_sigmas_karras

SCHEDULE_SAMPLERS = ("uniform", "lognormal", "loss-second-moment")


def draw_sigmas(sampler, diffusion, n, device):
    """(σ, importance weights, grid indices or None) for n samples of ``sampler``.

    An index sampler's indices are mapped onto the denoiser's ``num_timesteps``-point Karras grid.
    """
    if isinstance(sampler, ScheduleSampler):
        indices, weights = sampler.sample(n, device)
        d = diffusion
        return get_sigmas_karras(d.num_timesteps, d.sigma_min, d.sigma_max, d.rho, device=device)[indices], weights, indices
    sigmas, weights = sampler.sample(n, device)
    return sigmas, weights, None


def create_named_schedule_sampler(name, diffusion):
    """Build a schedule sampler by name."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    if name == "lognormal":
        return LogNormalSampler()
    raise ValueError(f"unknown schedule sampler {name!r}; choose one of {', '.join(SCHEDULE_SAMPLERS)}")


class ScheduleSampler(ABC):
    """Draws grid indices with probability ∝ weights() and returns importance weights."""

    @abstractmethod
    def weights(self):
        """Unnormalised, positive weight per grid index (NumPy array)."""

    def sample(self, batch_size, device):
        """(indices [N] long, importance weights [N] float = 1/(T·p_i))."""
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        indices = torch.from_numpy(indices_np).long().to(device)
        weights = torch.from_numpy(1 / (len(p) * p[indices_np])).float().to(device)
        return indices, weights


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self):
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler that adapts to the losses it has seen on every rank."""

    def update_with_local_losses(self, local_ts, local_losses):
        """Gather (index, loss) pairs from all ranks, then `update_with_all_losses`."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            self.update_with_all_losses(local_ts.tolist(), local_losses.tolist())
            return
        world = dist.get_world_size()
        sizes = [torch.zeros(1, dtype=torch.int64, device=local_ts.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([len(local_ts)], dtype=torch.int64, device=local_ts.device))
        sizes = [int(s.item()) for s in sizes]
        max_bs = max(sizes)
        ts_pad = torch.zeros(max_bs, dtype=local_ts.dtype, device=local_ts.device)
        loss_pad = torch.zeros(max_bs, dtype=local_losses.dtype, device=local_losses.device)
        ts_pad[: len(local_ts)] = local_ts
        loss_pad[: len(local_losses)] = local_losses
        ts_all = [torch.zeros_like(ts_pad) for _ in range(world)]
        loss_all = [torch.zeros_like(loss_pad) for _ in range(world)]
        dist.all_gather(ts_all, ts_pad)
        dist.all_gather(loss_all, loss_pad)
        timesteps = [x for y, n in zip(ts_all, sizes) for x in y[:n].tolist()]
        losses = [x for y, n in zip(loss_all, sizes) for x in y[:n].tolist()]
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """Update the weights from the losses of every rank (same on all ranks)."""


class LossSecondMomentResampler(LossAwareSampler):
    """Importance sampling ∝ √E[loss²] per index (Nichol & Dhariwal 2021), after warm-up."""

    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self):
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses):
            t = int(t)
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return bool((self._loss_counts == self.history_per_term).all())


class LogNormalSampler:
    """σ with ln σ ~ N(p_mean, p_std²); `even` stratifies the global batch over the quantiles."""

    def __init__(self, p_mean=-1.2, p_std=1.2, even=False, rank=None, world_size=None):
        self.p_mean = p_mean
        self.p_std = p_std
        self.even = even
        self._rank, self._world = rank, world_size

    def _rank_and_world(self):
        if self._rank is not None and self._world is not None:
            return self._rank, self._world
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def sample(self, bs, device):
        """(σ [N], weights of ones [N])."""
        if self.even:
            rank, world = self._rank_and_world()
            # one uniform draw in each of the global batch's equal-probability strata
            u = (torch.arange(rank * bs, (rank + 1) * bs, dtype=torch.float64) + torch.rand(bs, dtype=torch.float64)) / (
                world * bs
            )
            log_sigmas = (self.p_mean + self.p_std * (2**0.5) * torch.erfinv(2 * u - 1)).float().to(device)
        else:
            log_sigmas = self.p_mean + self.p_std * torch.randn(bs, device=device)
        sigmas = torch.exp(log_sigmas)
        return sigmas, torch.ones_like(sigmas)
