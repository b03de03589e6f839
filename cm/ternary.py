"""Integer ternary search, and the FID objective of the 2-step multistep schedule 0, t, steps−1.

`scripts/ternary_search.py` (as in the original release) picks the middle
index t of the consistency-model schedule ``ts = 0, t, steps-1`` that gives the
lowest FID. Each evaluation samples with the multistep sampler (same seed, so
every t sees the same noise and labels) and computes FID against reference
statistics.
"""

import torch.distributed as dist

from . import dist_util
from .metrics.evaluation import EvaluationError, compute_activations, feature_stats, frechet_distance, reference_stats
from .metrics.inception import InceptionWeightsMismatch, InceptionWeightsNotFound, load_inception
from .cli import UsageError
from .sample_util import sample_images


def ternary_search(f, lo, hi):
    """Minimise an integer function ``f`` on [lo, hi] by ternary search, evaluating each point once.

    ``f`` should be unimodal: strictly decreasing, then constant at its minimum
    (a flat bottom is fine), then strictly increasing. Each round compares the
    two inner third-points and drops the third that cannot hold a minimiser,
    so about 2·log_{3/2}(hi−lo) + 3 points are evaluated.

    Returns (argmin, f(argmin), evaluations), ``evaluations`` = {x: f(x)} in
    evaluation order; the argmin is the best evaluated point (ties: smallest x),
    which for a noisy ``f`` is never worse than the final bracket's best.
    """
    lo, hi = int(lo), int(hi)
    if lo > hi:
        raise ValueError(f"empty search range [{lo}, {hi}]")
    evaluations = {}

    def value(x):
        if x not in evaluations:
            evaluations[x] = f(x)
        return evaluations[x]

    while hi - lo > 2:
        third = (hi - lo) // 3
        m1, m2 = lo + third, hi - third
        f1, f2 = value(m1), value(m2)
        if f1 < f2:  # a minimiser lies left of m2
            hi = m2 - 1
        elif f1 > f2:  # a minimiser lies right of m1
            lo = m1 + 1
        else:  # both on the flat bottom, or on either side of it
            lo, hi = m1, m2
    for x in range(lo, hi + 1):
        value(x)
    best = min(evaluations, key=lambda x: (evaluations[x], x))
    return best, evaluations[best], evaluations


def _on_rank0(fn):
    """Run ``fn`` on rank 0 only; a user-facing error there is raised on every rank (no hang)."""
    result, error = None, None
    if dist_util.get_rank() == 0:
        try:
            result = fn()
        except (EvaluationError, InceptionWeightsNotFound, InceptionWeightsMismatch, UsageError) as e:
            error = str(e)
    if dist_util.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise UsageError(error)
    return result


def load_fid_reference(inception_path, ref, batch_size=100, device="cpu"):
    """(Inception, reference {"mu", "sigma"}) on rank 0, (None, None) on other ranks."""

    def load():
        model = load_inception(inception_path or None, device=device)
        return model, reference_stats(ref, model, batch_size, device, progress=False)

    return _on_rank0(load) or (None, None)


def fid_of(images, inception, ref, batch_size=100, device="cpu"):
    """FID of uint8 NHWC ``images`` against ``ref``, computed on rank 0 and shared with every rank."""
    fid = None
    if dist_util.get_rank() == 0:
        feats, _ = compute_activations(images, inception, batch_size, device, progress=False)
        fid = frechet_distance(*feature_stats(feats), ref["mu"], ref["sigma"])
    if dist_util.get_world_size() > 1:
        box = [fid]
        dist.broadcast_object_list(box, src=0)
        fid = box[0]
    return fid


def multistep_fid(
    model, diffusion, t, inception, ref, steps, fid_batch_size=100, device="cpu", begin=(0,), end=None,
    **sample_kwargs,
):
    """FID of samples from the multistep sampler with ts = begin + (t,) + end (default 0, t, steps−1)."""
    end = (steps - 1,) if end is None else tuple(end)
    images, _ = sample_images(
        model, diffusion, sampler="multistep", ts=[*begin, t, *end], steps=steps, device=device, **sample_kwargs
    )
    return fid_of(images, inception, ref, fid_batch_size, device)
