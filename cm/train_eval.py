"""Watching a run while it trains: FID of fixed-noise samples, and fixed-seed sample grids.

Every ``--eval_interval`` steps and at the end of a run, the network of each
evaluated EMA rate draws the evaluation set with each of the run's samplers
(`mode_samplers`: EDM Heun with ``--eval_steps``; the consistency modes one
step and two steps at the mode's intermediate level) and its Fréchet distance
to the reference statistics is logged as ``fid_<sampler>`` (several EMA
rates: ``fid_<sampler>_ema<rate>``), with ``eval_step`` (steps done) and
``eval_seconds``.

The evaluation set is the same at every evaluation and for any number of
processes: `cm.sample_util.sample_images` with the ``determ`` generator and
seed `EVAL_SEED` (class labels from its seeded label stream), i.e. exactly
``image_sample.py --seed 0 --num_samples <eval_num_samples>`` on the EMA
checkpoint, so ``fid.py`` on that ``.npz`` gives the logged number. Sampling is
split over the ranks; the features are computed on rank 0 in batches of
``--eval_batch_size`` (``fid.py``'s ``--batch_size``) and the FID is shared.

A feature extractor is any callable mapping uint8 NHWC images [N, H, W, 3] to
float features [N, d] (`inception_features` wraps the FID Inception; the
digits demo passes its classifier's penultimate layer). Reference statistics
(`reference_statistics`) come from an ``.npz`` of ``mu``/``sigma`` (what
``prepare_cifar10.py`` and ``fid.py --save_stats`` write) or of real images
``arr_0``, computed once at start-up. The samplers of a run come from its
recipe row (`recipe_samplers`).

Evaluation changes nothing in training: it samples a separate network loaded
with the EMA weights, and the global torch/NumPy/Python RNG states are saved
and restored around it (`preserved_rng`).
"""

import contextlib
import dataclasses
import random
import time

import numpy as np
import torch
import torch.distributed as dist

from . import dist_util, logger
from .cli import UsageError
from .metrics.evaluation import (
    EvaluationError,
    compute_activations,
    feature_stats,
    frechet_distance,
    is_stats_file,
    load_stats,
    npz_images_shape,
)
from .precision import wrap as precision_wrap
from .recipes import get_recipe
from .sample_util import save_grid_png, sample_images

EVAL_SEED = 0  # noise and labels of the evaluation set and of the grids (image_sample.py --seed 0)
GRID_SAMPLES = 64

EVAL_HELP = {
    "eval_interval": "every this many steps and at the end, FID of fixed-noise samples of the EMA network(s) "
    "with the mode's samplers, logged as fid_<sampler> (0: off)",
    "eval_ema": "EMA rate to evaluate (empty: every --ema_rate)",
    "eval_num_samples": "samples per FID, over all processes (the same noise and labels at every evaluation)",
    "eval_steps": "Heun steps of the EDM evaluation sampler (the teacher's; consistency modes sample 1 and 2 steps)",
    "eval_batch_size": "samples per process per batch while evaluating",
    "eval_ref": "FID reference: stats .npz (mu, sigma; prepare_cifar10.py writes one) or .npz of real images arr_0",
    "inception_path": "pytorch-fid's pt_inception-2015-12-05-6726825d.pth for --eval_interval (empty: "
    "$CM_INCEPTION_PATH)",
    "grid_samples": "samples in the fixed-seed grid samples_<step>.png written at each checkpoint, with the "
    "first --eval_ema rate and the first sampler (0: no grid)",
    "eval_features": "TorchScript feature network for the evaluation instead of the Inception: float NCHW "
    "images in [-1, 1] to [N, d] features (the digits demo passes its classifier's)",
}


def eval_flag_defaults():
    """The evaluation flags of edm_train.py and cm_train.py."""
    return dict(
        eval_interval=0,
        eval_ema="",
        eval_num_samples=10000,
        eval_steps=18,
        eval_batch_size=100,
        eval_ref="",
        inception_path="",
        eval_features="",
        grid_samples=GRID_SAMPLES,
    )


@dataclasses.dataclass(frozen=True)
class EvalSampler:
    """One way of drawing the evaluation set: its name (``fid_<name>``) and `sample_images` flags."""

    name: str
    sampler: str
    steps: int = 40
    ts: tuple = None
    sigmas: tuple = None
    flow_times: tuple = None  # --sampler meanflow

    def kwargs(self):
        return dict(
            sampler=self.sampler,
            steps=self.steps,
            ts=list(self.ts) if self.ts else None,
            sigmas=list(self.sigmas) if self.sigmas else None,
            flow_times=list(self.flow_times) if self.flow_times else None,
        )


def recipe_samplers(recipe=None, eval_steps=18):
    """The samplers a run of ``recipe`` (a `cm.recipes` row; None: EDM training) is evaluated with.

    The grid uses the first. EDM denoisers (teachers, progressive-distillation
    students): Heun with ``eval_steps`` steps. Consistency models: one step, and
    two steps at the row's intermediate level (``two_step_sigmas``, else
    ``two_step_ts`` of the 40-point grid). Flow models (MeanFlow): their flow
    sampler over the row's one- and two-step ``flow_times``.
    """
    if recipe is not None and recipe.flow_times:
        return tuple(EvalSampler(n, "meanflow", flow_times=t) for n, t in zip(("onestep", "twostep"), recipe.flow_times))
    if recipe is None or not recipe.is_consistency_function:
        return (EvalSampler("heun", "heun", steps=eval_steps),)
    if recipe.two_step_sigmas:
        two = EvalSampler("twostep", "multistep", sigmas=tuple(recipe.two_step_sigmas))
    else:
        two = EvalSampler("twostep", "multistep", steps=40, ts=tuple(recipe.two_step_ts))
    return EvalSampler("onestep", "onestep"), two


def mode_samplers(training_mode, eval_steps=18):
    """`recipe_samplers` of a ``--training_mode`` ("edm": the EDM loop)."""
    return recipe_samplers(None if training_mode == "edm" else get_recipe(training_mode), eval_steps)


# ----------------------------------------------------------------------------
# Features and reference statistics


def inception_features(path="", device="cpu", batch_size=100):
    """images ↦ pool3 features of the FID Inception (``fid.py``'s numbers; weights: path or $CM_INCEPTION_PATH)."""
    from .metrics.inception import load_inception

    model = load_inception(path or None, device=device)

    def features(images):
        return compute_activations(images, model, batch_size, device, progress=False)[0]

    return features


def torchscript_features(path, device="cpu", batch_size=100, flag="--eval_features"):
    """images ↦ features of a TorchScript network of float NCHW images in [−1, 1] (one-line error if unloadable)."""
    try:
        net = torch.jit.load(path, map_location=device).eval()
    except (OSError, RuntimeError, ValueError) as e:
        raise UsageError(f"{flag} {path}: not a loadable TorchScript file ({' '.join(str(e).split())[:200]})") from None

    @torch.no_grad()
    def features(images):
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(device)
            out.append(net(x.permute(0, 3, 1, 2).float() / 127.5 - 1).float().cpu().numpy())
        return np.concatenate(out)

    return features


def reference_statistics(path, features, flag="--eval_ref"):
    """(μ, Σ) from a stats ``.npz`` (mu, sigma) or from the ``features`` of an ``.npz``'s images ``arr_0``.

    Errors are one line naming ``flag``.
    """
    if not path:
        raise UsageError(f"{flag} is required: reference statistics (.npz with mu, sigma) or real images (arr_0)")
    try:
        if is_stats_file(path):
            stats = load_stats(path)
            return stats["mu"], stats["sigma"]
        npz_images_shape(path)
        with np.load(path, allow_pickle=False) as z:
            images = z["arr_0"]
        return feature_stats(features(images))
    except EvaluationError as e:
        raise UsageError(f"{flag}: {e}") from None


def check_reference(ref_stats, features, image_size, flag="--eval_ref"):
    """One-line error unless the extractor's features of ``image_size`` images match the reference's dimension."""
    probe = np.zeros((2, image_size, image_size, 3), np.uint8)
    dim = np.asarray(features(probe)).shape[1]
    if ref_stats[0].shape != (dim,):
        raise UsageError(f"{flag}: statistics of dimension {ref_stats[0].shape[0]}, the features have {dim}")


def fid_of_features(images, features, ref_stats):
    """FID of uint8 NHWC ``images`` against (μ, Σ): features on rank 0, the number on every rank."""
    fid = None
    if dist_util.get_rank() == 0:
        fid = frechet_distance(*feature_stats(np.asarray(features(images))), *ref_stats)
    if dist_util.get_world_size() > 1:
        box = [fid]
        dist.broadcast_object_list(box, src=0)
        fid = box[0]
    return fid


@contextlib.contextmanager
def preserved_rng():
    """Restore the global torch (CPU and CUDA), NumPy and Python RNG states on exit."""
    states = (
        torch.get_rng_state(),
        torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        np.random.get_state(),
        random.getstate(),
    )
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        if states[1] is not None:
            torch.cuda.set_rng_state_all(states[1])
        np.random.set_state(states[2])
        random.setstate(states[3])


# ----------------------------------------------------------------------------
# What the training loop calls


class TrainingEvaluator:
    """FID every ``interval`` steps (`due`, `evaluate`) and the sample grid at each checkpoint (`write_grid`).

    ``network``: a network of the trained model's architecture used only here
    (the EMA weights are loaded into it); ``diffusion``: its denoiser (the
    trained model's scalings); ``samplers``: `EvalSampler` s, the first also
    draws the grid. ``features``/``ref_stats`` are needed when ``interval`` > 0.
    ``ema``: the EMA rate evaluated (None: every rate the loop keeps).
    """

    def __init__(
        self,
        network,
        diffusion,
        samplers,
        *,
        image_size,
        class_cond=False,
        interval=0,
        num_samples=10000,
        batch_size=100,
        features=None,
        ref_stats=None,
        ema=None,
        precision=None,
        clip_denoised=True,
        grid_samples=GRID_SAMPLES,
        progress=False,
    ):
        if interval < 0:
            raise UsageError(f"--eval_interval must be 0 (off) or positive, got {interval}")
        if interval and num_samples < 2:
            raise UsageError(f"--eval_num_samples must be at least 2 for a covariance, got {num_samples}")
        if batch_size < 1:
            raise UsageError(f"--eval_batch_size must be positive, got {batch_size}")
        if interval and (features is None or ref_stats is None):
            raise UsageError("--eval_interval needs a feature extractor and reference statistics (--eval_ref)")
        self.network = network.eval().requires_grad_(False)
        self.diffusion = diffusion
        self.samplers = tuple(samplers)
        self.image_size, self.class_cond = image_size, class_cond
        self.interval, self.num_samples, self.batch_size = interval, num_samples, batch_size
        self.features, self.ref_stats = features, ref_stats
        self.ema = ema
        self.precision = precision
        self.clip_denoised = clip_denoised
        self.grid_samples = grid_samples
        self.progress = progress
        self._net = precision_wrap(self.network, precision, frozen=True)  # sampling: frozen weights

    def due(self, step, finished):
        """True when FID is due after ``step`` steps (a multiple of the interval, or the run's end)."""
        return self.interval > 0 and step > 0 and (step % self.interval == 0 or finished)

    def chosen(self, rates):
        """The EMA rates evaluated, out of the loop's ``rates``."""
        if self.ema is None:
            return list(rates)
        if self.ema not in rates:
            raise UsageError(f"--eval_ema {self.ema} is not one of the --ema_rate values {list(rates)}")
        return [self.ema]

    def _load(self, state_dict):
        self.network.load_state_dict(state_dict, strict=True)

    def sample(self, sampler, num_samples):
        """uint8 NHWC samples of the loaded network: noise and labels of `EVAL_SEED`, any world size."""
        images, _ = sample_images(
            self._net,
            self.diffusion,
            num_samples=num_samples,
            batch_size=self.batch_size,
            image_size=self.image_size,
            generator="determ",
            seed=EVAL_SEED,
            class_cond=self.class_cond,
            clip_denoised=self.clip_denoised,
            sigma_min=self.diffusion.sigma_min,
            sigma_max=self.diffusion.sigma_max,
            device=next(self.network.parameters()).device,
            progress=self.progress,
            **sampler.kwargs(),
        )
        return images

    def evaluate(self, step, ema_states):
        """{fid_<sampler>[_ema<rate>]: FID, eval_step, eval_seconds} for ``ema_states`` = {rate: () ↦ state_dict}."""
        start = time.perf_counter()
        rates = self.chosen(list(ema_states))
        out = {}
        with preserved_rng(), torch.no_grad():
            for rate in rates:
                self._load(ema_states[rate]())
                for s in self.samplers:
                    key = f"fid_{s.name}" if len(rates) == 1 else f"fid_{s.name}_ema{rate}"
                    out[key] = fid_of_features(self.sample(s, self.num_samples), self.features, self.ref_stats)
        out["eval_step"] = step
        out["eval_seconds"] = time.perf_counter() - start
        return out

    def write_grid(self, path, ema_states):
        """``path``: PNG of `GRID_SAMPLES` samples (the same noises every time) of the first chosen EMA rate."""
        rate = self.chosen(list(ema_states))[0]
        with preserved_rng(), torch.no_grad():
            self._load(ema_states[rate]())
            images = self.sample(self.samplers[0], self.grid_samples)
        if dist_util.get_rank() == 0:
            save_grid_png(path, images, count=self.grid_samples)
        return path


def log_evaluation(evaluator, step, ema_states):
    """``evaluator.evaluate`` at ``step``: its metrics logged with the step's values, a line with the FIDs."""
    metrics = evaluator.evaluate(step, ema_states)
    for key, value in metrics.items():
        logger.logkv(key, value)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("fid_"))
    logger.log(f"evaluation after {step} steps: {shown} ({metrics['eval_seconds']:.1f} s)")
    return metrics


def grid_filename(step):
    """``samples_<step>.png`` beside the checkpoint files of ``step``."""
    return f"samples_{step:06d}.png"


def build_evaluator(args, network, diffusion, recipe, ema_rates, features=None, device="cpu"):
    """The `TrainingEvaluator` of a training script's flags; every failure is a one-line error now.

    ``recipe``: the run's `cm.recipes` row (None: EDM training), which names its samplers.

    ``features`` (None: the FID Inception from ``--inception_path``) is only
    built when ``--eval_interval`` is on.
    """
    ema = None
    if args.eval_ema:
        try:
            ema = float(args.eval_ema)
        except ValueError:
            raise UsageError(f"--eval_ema must be one of the --ema_rate values, got {args.eval_ema!r}") from None
        if ema not in ema_rates:
            raise UsageError(f"--eval_ema {args.eval_ema} is not one of the --ema_rate values {list(ema_rates)}")
    if args.grid_samples < 0:
        raise UsageError(f"--grid_samples must be 0 (no grid) or positive, got {args.grid_samples}")
    if args.eval_steps < 1:
        raise UsageError(f"--eval_steps must be positive, got {args.eval_steps}")
    ref_stats = None
    if args.eval_interval > 0:
        if not args.eval_ref:
            raise UsageError("--eval_interval needs --eval_ref: reference statistics or real images (.npz)")
        with preserved_rng():  # building an extractor draws initial weights: training's streams stay untouched
            if features is None and args.eval_features:
                features = torchscript_features(args.eval_features, device, args.eval_batch_size)
            elif features is None:
                features = inception_features(args.inception_path, device, args.eval_batch_size)
            ref_stats = reference_statistics(args.eval_ref, features)
            check_reference(ref_stats, features, args.image_size)
    elif args.eval_ref or args.eval_features:
        raise UsageError("--eval_ref and --eval_features are only used with --eval_interval N (N > 0)")
    return TrainingEvaluator(
        network,
        diffusion,
        recipe_samplers(recipe, args.eval_steps),
        image_size=args.image_size,
        class_cond=args.class_cond,
        interval=args.eval_interval,
        num_samples=args.eval_num_samples,
        batch_size=args.eval_batch_size,
        features=features,
        ref_stats=ref_stats,
        ema=ema,
        precision=getattr(args, "precision", None),
        grid_samples=args.grid_samples,
    )
