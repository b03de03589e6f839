"""Noise grids and EMA/scale schedules beyond the golden points."""

import numpy as np
import pytest
import torch

from cm.schedules import create_ema_and_scales_fn, get_sigmas_karras, karras_sigma, sigma_at


def test_grid_endpoints_and_monotonicity():
    s = get_sigmas_karras(18, 0.002, 80.0, 7.0)
    assert len(s) == 19 and s[-1] == 0
    torch.testing.assert_close(s[0], torch.tensor(80.0))
    torch.testing.assert_close(s[-2], torch.tensor(0.002))
    assert (s[:-1] > s[1:]).all()


def test_one_definition_for_grid_points_and_indices():
    grid = get_sigmas_karras(40)
    for i in (0, 7, 22, 39):
        assert abs(sigma_at(i, 40) - grid[i].item()) <= 1e-6 * grid[i].item()
    # u works on floats, arrays and tensors alike
    u = np.array([0.0, 0.5, 1.0])
    np.testing.assert_allclose(karras_sigma(u), karras_sigma(torch.tensor(u)).numpy())


def test_progressive_scales_grow_from_start_to_end():
    fn = create_ema_and_scales_fn("fixed", 0.95, "progressive", 2, 150, 1000, 50)
    scales = [fn(k)[1] for k in range(0, 1001, 50)]
    assert scales[0] == 2 and scales[-1] == 151
    assert all(a <= b for a, b in zip(scales, scales[1:]))


def test_adaptive_ema_follows_exp_of_minus_c_over_n():
    fn = create_ema_and_scales_fn("adaptive", 0.95, "progressive", 2, 150, 1000, 50)
    for k in (0, 300, 1000):
        mu, n = fn(k)
        assert mu == pytest.approx(np.exp(2 * np.log(0.95) / (n - 1)))


def test_progdist_halves_then_ends_at_one():
    fn = create_ema_and_scales_fn("fixed", 0.0, "progdist", 8, 8, 10**6, 10)
    assert [fn(k)[1] for k in (0, 10, 19, 20, 30, 39, 40, 99)] == [8, 4, 4, 2, 2, 2, 1, 1]
    assert fn(0)[0] == 1.0


def test_unknown_mode_pair_is_an_error():
    with pytest.raises(ValueError, match="adaptive"):
        create_ema_and_scales_fn("adaptive", 0.9, "fixed", 2, 2, 10, 10)
