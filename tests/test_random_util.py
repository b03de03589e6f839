"""Seeded generators: per-sample noise independent of batch size and world size."""

import pytest
import torch

from cm.random_util import get_generator

SHAPE = (3, 4, 4)


def draw_all(name, num_samples, batch_size, rank=0, world_size=1, draws=2, seed=5):
    """Noise rows per sample index, drawn the way a sampling loop does (window per batch)."""
    gen = get_generator(name, num_samples, seed, rank=rank, world_size=world_size)
    rows = {}
    done = 0
    while done < num_samples:
        gen.set_done_samples(done)
        batch = [gen.randn(batch_size, *SHAPE) for _ in range(draws)]
        indices = [done + rank + world_size * j for j in range(batch_size)]
        for j, k in enumerate(indices):
            if k < num_samples:
                rows[k] = torch.stack([b[j] for b in batch])
        done += world_size * batch_size
    return rows


@pytest.mark.parametrize("name", ["determ", "determ-indiv"])
def test_noise_per_sample_is_independent_of_batch_size(name):
    a = draw_all(name, 10, 4)
    b = draw_all(name, 10, 3)
    c = draw_all(name, 10, 10)
    assert sorted(a) == sorted(b) == sorted(c) == list(range(10))
    for k in range(10):
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("name", ["determ", "determ-indiv"])
def test_noise_per_sample_is_independent_of_world_size(name):
    single = draw_all(name, 11, 2)
    ranks = {}
    for rank in range(3):
        ranks.update(draw_all(name, 11, 2, rank=rank, world_size=3))
    assert sorted(ranks) == list(range(11))
    for k in range(11):
        assert torch.equal(single[k], ranks[k])


def test_determ_first_draw_is_rows_of_one_seeded_draw():
    gen = get_generator("determ", 6, 42)
    expected = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(42))
    assert torch.equal(gen.randn(6, *SHAPE), expected)
    gen = get_generator("determ", 6, 42, rank=1, world_size=2)
    assert torch.equal(gen.randn(3, *SHAPE), expected[1::2])


def test_determ_indiv_seeds_each_sample_with_index_plus_num_samples_times_seed():
    gen = get_generator("determ-indiv", 4, 3)
    got = gen.randn(4, *SHAPE)
    for i in range(4):
        expected = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(i + 4 * 3))
        assert torch.equal(got[i : i + 1], expected)


def test_padding_rows_past_the_end_do_not_disturb_the_last_sample():
    gen = get_generator("determ-indiv", 5, 0)
    gen.set_done_samples(4)
    first = gen.randn(3, *SHAPE)  # sample 4 plus two padding rows
    assert torch.equal(first[0], first[1])
    alone = get_generator("determ-indiv", 5, 0)
    alone.set_done_samples(4)
    alone_rows = alone.randn(1, *SHAPE)
    assert torch.equal(first[0], alone_rows[0])
    assert torch.equal(gen.randn(3, *SHAPE)[0], alone.randn(1, *SHAPE)[0])


def test_randint_follows_the_same_windows():
    a = get_generator("determ", 8, 1).randint(0, 10, (8,))
    gen = get_generator("determ", 8, 1, rank=1, world_size=2)
    assert torch.equal(gen.randint(0, 10, (4,)), a[1::2])


def test_dummy_uses_the_global_rng():
    torch.manual_seed(9)
    a = get_generator("dummy").randn(2, 3)
    torch.manual_seed(9)
    assert torch.equal(a, torch.randn(2, 3))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown generator 'nope'"):
        get_generator("nope", 4, 0)
    with pytest.raises(ValueError, match="rank 2"):
        get_generator("determ", 4, 0, rank=2, world_size=2)
