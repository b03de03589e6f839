"""Training noise-level samplers."""

import numpy as np
import pytest
import torch

from cm.karras_diffusion import KarrasDenoiser
from cm.resample import LogNormalSampler, LossSecondMomentResampler, UniformSampler, create_named_schedule_sampler


def test_named_samplers():
    d = KarrasDenoiser(loss_norm="l2")
    assert isinstance(create_named_schedule_sampler("uniform", d), UniformSampler)
    assert isinstance(create_named_schedule_sampler("lognormal", d), LogNormalSampler)
    assert isinstance(create_named_schedule_sampler("loss-second-moment", d), LossSecondMomentResampler)
    with pytest.raises(ValueError, match="unknown schedule sampler 'cosine'"):
        create_named_schedule_sampler("cosine", d)


def test_uniform_indices_and_unit_weights():
    np.random.seed(0)
    idx, w = UniformSampler(KarrasDenoiser(loss_norm="l2")).sample(1000, "cpu")
    assert idx.min() >= 0 and idx.max() <= 39 and len(set(idx.tolist())) == 40
    assert torch.allclose(w, torch.ones(1000))


def test_lognormal_moments():
    torch.manual_seed(0)
    sigmas, w = LogNormalSampler().sample(200_000, "cpu")
    logs = sigmas.log()
    assert abs(logs.mean().item() + 1.2) < 0.02 and abs(logs.std().item() - 1.2) < 0.02
    assert torch.equal(w, torch.ones_like(w))


def test_lognormal_even_puts_one_draw_in_each_stratum_of_the_global_batch():
    world, bs = 3, 4
    logs = []
    for rank in range(world):
        sigmas, _ = LogNormalSampler(even=True, rank=rank, world_size=world).sample(bs, "cpu")
        logs.append(sigmas.log().double())
    logs = torch.cat(logs)
    # map back to quantiles with the normal CDF: sample j must fall in [j/12, (j+1)/12)
    u = 0.5 * (1 + torch.erf((logs + 1.2) / (1.2 * 2**0.5)))
    j = torch.arange(world * bs, dtype=torch.float64)
    assert ((u >= j / 12 - 1e-6) & (u < (j + 1) / 12 + 1e-6)).all()


def test_loss_second_moment_works_on_numpy_2_and_adapts():
    d = KarrasDenoiser(loss_norm="l2")
    s = LossSecondMomentResampler(d, history_per_term=2, uniform_prob=0.0)
    assert np.allclose(s.weights(), 1)
    for _ in range(2):
        ts = torch.arange(40)
        s.update_with_local_losses(ts, torch.where(ts == 5, 10.0, 1.0))
    w = s.weights()
    assert w.argmax() == 5 and w[5] == pytest.approx(10 * w[0])
    np.random.seed(0)
    idx, weights = s.sample(2000, "cpu")
    assert (idx == 5).float().mean() > 0.15
    assert weights[idx == 5][0].item() == pytest.approx(1 / (40 * w[5] / w.sum()), rel=1e-5)
