"""Training loops: EDM denoiser training (`TrainLoop`) and consistency distillation,
consistency training and progressive distillation (`CMTrainLoop`).

One step k (0-based) of either loop:

1. when a seed is given, reseed torch/NumPy/random from (seed, rank, k), so
   the noise levels, noise and dropout of step k do not depend on how the run
   got there (resuming is exact);
2. take the next batch; with `StepBatches` (what the scripts use) batch k is
   itself a function of (seed, rank, k);
3. split the batch into micro-batches and accumulate their gradients, each
   weighted by its share of the batch, so the sum is the batch-mean gradient
   whatever the micro-batch size; under DistributedDataParallel only the last
   micro-batch all-reduces;
4. one RAdam step at lr·(1 − k/lr_anneal_steps) (constant when 0), skipped in
   fp16 when the gradients overflow (see `MixedPrecisionTrainer`);
5. EMA updates ema_r ← r·ema_r + (1−r)·θ for every rate r; in the consistency
   loop also the target θ⁻ ← μ·θ⁻ + (1−μ)·θ with μ from ``ema_scale_fn(k)``.

After it, ``loop.step`` = k+1 steps are done; checkpoints carry that number.
A skipped fp16 step does not count and is retried on the same batch (the
original also counts only taken steps, but draws a new batch).

Resuming is bit-exact (tested on CPU: 4 straight steps and 2 + resume + 2
give identical model, EMA, optimiser and target files) because nothing a step
does depends on the path to it: RNGs and data are functions of (seed, rank,
k), the learning rate of k, and the checkpoint holds the rest (the fp16 loss
scale rides in the opt file). Not covered: the loss-second-moment sampler's
loss history (not checkpointed), a different world size or batch size, and
non-deterministic CUDA kernels. Schedules that depend on
total_training_steps (progressive N, adaptive μ) of course differ between
runs given different totals.

Logged per step: every loss term, its mean per noise bin ``<term>_q0..q3``,
grad_norm, param_norm, lr, lg_loss_scale (fp16), bad_steps (non-fp16: steps
skipped so far for a non-finite loss or gradient), step (index of the step just
taken) and samples = (step+1)·global batch; the consistency loop adds
num_scales (ECT: stage) and target_ema, and for iCT/ECT t_mean, r_over_t
(mean r/t of the pair of noise levels) and r_zero (share of r = 0). Noise bins are FIXED quarters of the Karras
ρ-ramp between σ_min and σ_max (the original's ``4·t/T`` quartile applied to
the position on the ρ-schedule): q0 is σ < 0.169, q1 up to 2.51, q2 up to
17.5, q3 above (for σ_min 0.002, σ_max 80, ρ 7). Fixed bins, unlike quartiles
of each batch, compare across steps and between the two loops.
"""

import contextlib
import inspect
import os
import random
import signal
import threading
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim import RAdam
from torch.utils.data import DataLoader

from . import dist_util, faults, image_datasets, logger, run_metadata
from .checkpoint import (
    CheckpointError,
    check_state_dict,
    checkpoint_filename,
    load_model_state,
    parse_resume_step,
    read_checkpoint,
    strip_wrapper_prefix,
)
from .cli import UsageError, on_all_ranks
from .fp16_util import (
    MixedPrecisionTrainer,
    master_params_to_model_params,
    master_params_to_state_dict,
)
from .nn import update_ema
from .precision import resolve_precision, wrap as precision_wrap
from .opt_layout import is_original_fp16_layout, to_per_parameter
from . import recipes
from .recipes import CM_TRAINING_MODES  # noqa: F401  (re-exported)
from .resample import LogNormalSampler, LossAwareSampler, ScheduleSampler
from .schedules import get_sigmas_karras
from .train_eval import grid_filename

# Debug switch: with several processes, train WITHOUT DistributedDataParallel
# (no gradient all-reduce), so a test can tell synced ranks from unsynced ones.
NO_GRAD_SYNC_ENV = "CM_NO_GRAD_SYNC"

# Purposes of derived seeds, so the streams never coincide.
_SEED_STEP, _SEED_DATA_ORDER, _SEED_FLIPS = 0, 1, 2


# ----------------------------------------------------------------------------
# Small pure helpers


def parse_ema_rates(ema_rate):
    """EMA rates from a float, a comma list ("0.999,0.9999") or a sequence."""
    if isinstance(ema_rate, (int, float)):
        items = [ema_rate]
    elif isinstance(ema_rate, str):
        items = [x for x in ema_rate.split(",") if x.strip()]
    else:
        items = list(ema_rate)
    try:
        rates = [float(x) for x in items]
    except (TypeError, ValueError):
        raise ValueError(f"--ema_rate must be a comma list of numbers in [0, 1], got {ema_rate!r}") from None
    for r in rates:
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"--ema_rate values must lie in [0, 1], got {r}")
    return rates


def per_rank_batch_size(global_batch_size, batch_size, world_size):
    """(per-process batch size, warning text or None); batch_size -1 splits the global one."""
    if batch_size > 0:
        return batch_size, None
    if batch_size != -1:
        raise ValueError(f"--batch_size must be positive or -1, got {batch_size}")
    per_rank = global_batch_size // world_size
    if per_rank < 1:
        # every rank has it: a UsageError, printed once
        raise UsageError(f"--global_batch_size {global_batch_size} is smaller than the {world_size} processes")
    note = None
    if global_batch_size % world_size:
        note = (
            f"WARNING: global_batch_size {global_batch_size} is not divisible by {world_size} processes; "
            f"using {per_rank} per process ({per_rank * world_size} in all)"
        )
    return per_rank, note


def derived_seed(*keys):
    """A 63-bit seed that is a pure function of non-negative integer ``keys``."""
    words = np.random.SeedSequence([int(k) for k in keys]).generate_state(2)
    return (int(words[0]) | (int(words[1]) << 32)) & (2**63 - 1)


def seed_all(seed):
    """Seed torch (CPU and CUDA), NumPy's and Python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def noise_bins(sigmas, sigma_min, sigma_max, rho=7.0):
    """Bin 0..3 per σ: quarters of the ρ-ramp from σ_min (bin 0) to σ_max (bin 3)."""
    s = sigmas.detach().float().clamp(sigma_min, sigma_max) ** (1 / rho)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((s - lo) / (hi - lo) * 4).floor().clamp(0, 3).long()


def log_loss_dict(diffusion, sigmas, losses):
    """Log the batch mean of every loss term and its mean per noise bin (``_q0``..``_q3``)."""
    bins = noise_bins(sigmas, diffusion.sigma_min, diffusion.sigma_max, diffusion.rho).cpu().numpy()
    for key, values in losses.items():
        values = values.detach().float().cpu().numpy()
        logger.logkv_mean(key, values.mean())
        for b, v in zip(bins, values):
            logger.logkv_mean(f"{key}_q{b}", v)


def _float_copies(params):
    """Detached float32 copies (EMA and target masters)."""
    return [p.detach().to(torch.float32, copy=True) for p in params]


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device():
    if _distributed() and dist.get_backend() == "nccl":
        return dist_util.dev()
    return torch.device("cpu")


def _no_buffer_broadcast():
    """DDP keyword for "do not broadcast buffers before each forward" (the original's
    broadcast_buffers=False; newer torch spells it forward_sync_buffers and warns on the old one)."""
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


# ----------------------------------------------------------------------------
# Data whose batch k depends only on (seed, rank, k)


class _PartlyBad:
    """A batch some of whose files failed to decode: the collated rest (or None) and the failures."""

    def __init__(self, good, bad):
        self.good = good
        self.bad = bad


def _collate(items):
    """Default collation; samples that failed to decode are set aside in a `_PartlyBad`."""
    good = [item for item in items if isinstance(item, tuple)]
    if len(good) == len(items):
        return tuple(torch.utils.data.default_collate(items))
    bad = [item for item in items if not isinstance(item, tuple)]
    return _PartlyBad(tuple(torch.utils.data.default_collate(good)) if good else None, bad)


class _StepBatchSampler:
    """Index lists of batches start, start+1, ... of a `StepBatches` (endless)."""

    def __init__(self, batches, start):
        self.batches = batches
        self.start = start

    def __iter__(self):
        step = self.start
        while True:
            yield self.batches.indices(step)
            step += 1


class StepBatches:
    """Endless (images, cond) batches where batch k is a function of (seed, rank, k).

    Epoch e = k // (len(dataset) // batch_size) visits this rank's shard in a
    permutation seeded by (seed, rank, e) (the last partial batch is dropped,
    as with ``drop_last``); each batch's left-right flips are drawn from a
    generator seeded by (seed, rank, k). ``seek(k)`` makes the next batch batch
    k, which is how a resumed run continues exactly where it stopped.
    ``dataset`` is an `image_datasets.ImageDataset` built without random flips.
    Images are decoded when their batch is due: an unreadable one is a one-line
    DataError naming it, or with ``skip_bad_images`` a warning, and the batch
    goes on without it.
    """

    def __init__(self, dataset, batch_size, seed=0, rank=None, random_flip=True, num_workers=1,
                 skip_bad_images=False):
        if len(dataset) < batch_size:
            raise ValueError(f"{len(dataset)} images in this shard, fewer than the batch size {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = dist_util.get_rank() if rank is None else rank
        self.random_flip = random_flip
        self.num_workers = num_workers
        self.skip_bad_images = skip_bad_images
        self.steps_per_epoch = len(dataset) // batch_size
        self._step = 0
        self._iter = None
        self._perm = (None, None)

    def indices(self, step):
        """Dataset indices of batch ``step``."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(derived_seed(self.seed, self.rank, epoch, _SEED_DATA_ORDER))
            self._perm = (epoch, torch.randperm(len(self.dataset), generator=g))
        return self._perm[1][pos * self.batch_size : (pos + 1) * self.batch_size].tolist()

    def seek(self, step):
        """Make the next batch batch ``step``."""
        if step != self._step or self._iter is None:
            self._iter = None
            self._step = step

    def __iter__(self):
        return self

    def _without_bad_images(self, batch):
        """The readable part of a batch, or a DataError naming the first unreadable file."""
        first = batch.bad[0]
        if not self.skip_bad_images:
            raise image_datasets.DataError(f"cannot read image {first.path}: {first.reason}")
        for item in batch.bad:
            warnings.warn(f"--skip_bad_images: leaving out unreadable image {item.path} ({item.reason})", stacklevel=3)
        if batch.good is None:
            raise image_datasets.DataError(f"every image of batch {self._step} is unreadable, e.g. {first.path}")
        return batch.good

    def __next__(self):
        if self._iter is None:
            loader = DataLoader(
                self.dataset,
                batch_sampler=_StepBatchSampler(self, self._step),
                num_workers=self.num_workers,
                collate_fn=_collate,
            )
            self._iter = iter(loader)
        batch = next(self._iter)
        if isinstance(batch, _PartlyBad):
            batch = self._without_bad_images(batch)
        images, cond = batch
        if self.random_flip:
            g = torch.Generator().manual_seed(derived_seed(self.seed, self.rank, self._step, _SEED_FLIPS))
            flip = torch.rand(images.shape[0], generator=g) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        self._step += 1
        return images, cond


def load_training_data(
    *, data_dir, batch_size, image_size, class_cond=False, seed=0, random_flip=True, num_workers=1,
    skip_bad_images=False,
):
    """This rank's training batches as `StepBatches`, after `image_datasets.load_data`'s checks.

    The folder is validated by ``load_data`` itself (same one-line DataErrors);
    its files, classes, sharding and preprocessing are reused as they are.
    Images are not opened up front (50k files): each is decoded when first due.
    """
    image_datasets.load_data(
        data_dir=data_dir,
        batch_size=batch_size,
        image_size=image_size,
        class_cond=class_cond,
        num_workers=0,
        check_images=False,
    )
    files = image_datasets.list_image_files(data_dir)
    classes = image_datasets.class_ids(files) if class_cond else None
    dataset = image_datasets.ImageDataset(
        image_size,
        files,
        classes=classes,
        shard=dist_util.get_rank(),
        num_shards=dist_util.get_world_size(),
        random_flip=False,
    )
    return StepBatches(
        dataset, batch_size, seed=seed, random_flip=random_flip, num_workers=num_workers,
        skip_bad_images=skip_bad_images,
    )


# ----------------------------------------------------------------------------
# SIGTERM: finish the step, save, stop


class _StopOnSigterm:
    """Records SIGTERM while the loop runs; `requested()` agrees across ranks."""

    _UNSET = object()

    def __enter__(self):
        self.received = False
        self._previous = self._UNSET
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        if self._previous is not self._UNSET:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
        return False

    def requested(self):
        """True on every rank when any rank got SIGTERM (collective with several processes)."""
        if not _distributed():
            return self.received
        flag = torch.tensor([int(self.received)], device=_collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# ----------------------------------------------------------------------------
# The EDM loop


class TrainLoop:
    """EDM training of a denoiser (Karras et al. 2022) with RAdam, EMAs and checkpoints.

    Extra keywords over the original: ``total_training_steps`` (stop after
    that many steps; 0 = only ``lr_anneal_steps`` stops it), ``logging_dir``
    (where checkpoints go and where ``resume_checkpoint="auto"`` looks; None =
    ``logger.get_dir()`` at save time) and ``seed`` (None = no reseeding).
    ``schedule_sampler`` defaults to log-normal σ; an index sampler's indices
    are mapped onto the denoiser's ``num_timesteps``-point Karras grid.
    ``resume_checkpoint`` is "", a ``modelNNNNNN.pt`` path, or "auto".
    """

    def __init__(
        self,
        *,
        model,
        diffusion,
        data,
        batch_size,
        microbatch,
        lr,
        ema_rate,
        log_interval,
        save_interval,
        resume_checkpoint,
        use_fp16=False,
        fp16_scale_growth=1e-3,
        schedule_sampler=None,
        weight_decay=0.0,
        lr_anneal_steps=0,
        total_training_steps=0,
        logging_dir=None,
        seed=None,
        precision=None,
        max_bad_steps=20,
        run_flags=None,
        evaluator=None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if log_interval < 1:
            raise ValueError(f"--log_interval must be positive, got {log_interval}")
        if seed is not None and seed < 0:
            raise ValueError(f"--seed must be non-negative, got {seed}")
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.ema_rate = parse_ema_rates(ema_rate)
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.schedule_sampler = schedule_sampler or LogNormalSampler()
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps
        self.total_training_steps = total_training_steps
        self.logging_dir = logging_dir or None
        self.seed = seed
        self.rank = dist_util.get_rank()
        self.world_size = dist_util.get_world_size()
        self.global_batch = batch_size * self.world_size
        self.step = 0
        self._saved_step = None
        self.bad_steps = faults.BadStepGuard(max_bad_steps)
        self._nan_steps = faults.injected_nan_steps()
        self.run_flags = run_flags
        self.evaluator = evaluator  # cm.train_eval.TrainingEvaluator: FID every N steps, grids at checkpoints
        self._evaluated_step = None
        self._weights_only = False  # resumed from a file that is not modelNNNNNN.pt

        # bf16: autocast network calls over float32 weights (cm.precision); None = from use_fp16
        self.precision = resolve_precision(precision, use_fp16)
        use_fp16 = self.precision == "fp16"
        self.resume_checkpoint = self._resolve_resume(resume_checkpoint)
        self._last_checkpoint = self.resume_checkpoint
        if self.rank == 0 and self.resume_checkpoint:
            run_metadata.warn_changed_flags(self.resume_checkpoint, run_flags, self.world_size)
        self._load_model()
        self.mp_trainer = MixedPrecisionTrainer(
            model=self.model, use_fp16=use_fp16, fp16_scale_growth=fp16_scale_growth
        )
        self.use_fp16 = self.mp_trainer.use_fp16
        self.opt = self._new_optimizer()
        self.ema_params = [self._load_ema(rate) for rate in self.ema_rate]
        self._load_optimizer()
        self._setup_networks()
        self.ddp_model = self._wrap_model()
        self._wrap_networks()

    # --- construction -----------------------------------------------------
    def _resolve_resume(self, resume_checkpoint):
        """The model file to resume from, or None; "auto" = newest usable set in logging_dir."""
        if resume_checkpoint != "auto":
            return resume_checkpoint or None
        path = None
        if self.rank == 0:
            path = faults.newest_usable_checkpoint(self.logging_dir, self.ema_rate, self._extra_checkpoint_kinds())
        path = _broadcast_object(path)
        if path is None:
            logger.log(f"--resume_checkpoint auto: no checkpoint in {self.logging_dir}; starting from scratch")
        return path

    def _initial_weights(self):
        """Hook: set the model's weights before a checkpoint (if any) is loaded."""

    def _load_model(self):
        self._initial_weights()
        if self.resume_checkpoint:
            try:
                self.step = parse_resume_step(self.resume_checkpoint)
            except CheckpointError:
                # the original's parse_resume_step_from_filename: any other name (an EMA file) is step 0
                self._weights_only = True
                logger.log(
                    f"WARNING: --resume_checkpoint {self.resume_checkpoint} is not a modelNNNNNN.pt file: "
                    "its weights initialise the model at step 0; no EMA, optimiser or target file is loaded"
                )
            logger.log(f"loading model from checkpoint: {self.resume_checkpoint}")
            state = read_checkpoint(self.resume_checkpoint)
            load_model_state(self.model, state, self.resume_checkpoint)
        dist_util.sync_params(self.model.parameters())
        dist_util.sync_params(self.model.buffers())

    def _sibling(self, kind, rate=None):
        """(path, state) of a part of the resumed checkpoint, or None when absent."""
        if not self.resume_checkpoint or self._weights_only:
            return None
        name = checkpoint_filename(kind, self.step, rate)
        path = os.path.join(os.path.dirname(self.resume_checkpoint), name)
        try:
            state = read_checkpoint(path)
        except FileNotFoundError:
            logger.log(f"no {name} beside {self.resume_checkpoint}; starting it from the model")
            return None
        logger.log(f"loading {path}")
        return path, state

    def _load_params(self, path, state):
        """Float32 parameter list (model order) from a state_dict, checked against the model."""
        state, _ = strip_wrapper_prefix(state, self.model.state_dict())
        check_state_dict(self.model.state_dict(), state, path)
        return _float_copies(self.mp_trainer.state_dict_to_master_params(state))

    def _load_ema(self, rate):
        found = self._sibling("ema", rate)
        if found is None:
            return _float_copies(self.mp_trainer.master_params)
        return self._load_params(*found)

    def _new_optimizer(self):
        return RAdam(self.mp_trainer.master_params, lr=self.lr, weight_decay=self.weight_decay)

    def _load_optimizer(self):
        found = self._sibling("opt")
        if found is None:
            return
        path, state = found
        state = dict(state)
        lg_loss_scale = state.pop("lg_loss_scale", None)
        shapes = [tuple(p.shape) for p in self.model.parameters()]
        if is_original_fp16_layout(state, shapes):
            logger.log(f"{path}: the original's float16 layout (two flat master tensors); split per parameter")
            state = to_per_parameter(state, shapes)
        self._check_optimizer_state(path, state)
        try:
            self.opt.load_state_dict(state)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{path} does not fit the model built from the flags: {exc}") from None
        for group in self.opt.param_groups:
            group["weight_decay"] = self.weight_decay
        if lg_loss_scale is not None and self.mp_trainer.loss_scaling:
            self.mp_trainer.lg_loss_scale = float(lg_loss_scale)

    def _check_optimizer_state(self, path, state):
        """One-line error when the optimiser state's parameters do not match the model's."""
        if not isinstance(state.get("state"), dict) or not isinstance(state.get("param_groups"), list):
            raise CheckpointError(f"{path}: not an optimiser state_dict")
        params = self.mp_trainer.master_params
        saved = [i for g in state["param_groups"] for i in g.get("params", [])]
        if len(saved) != len(params):
            raise CheckpointError(
                f"{path} does not fit the model built from the flags: "
                f"{len(saved)} parameters in the optimiser state, {len(params)} in the model"
            )
        names = [name for name, _ in self.model.named_parameters()]
        for index, p, name in zip(saved, params, names):
            for key, value in state["state"].get(index, {}).items():
                if torch.is_tensor(value) and value.ndim > 0 and tuple(value.shape) != tuple(p.shape):
                    raise CheckpointError(
                        f"{path} does not fit the model built from the flags: optimiser {key} of {name} "
                        f"has shape {tuple(value.shape)} in the checkpoint, {tuple(p.shape)} in the model"
                    )

    def _setup_networks(self):
        """Hook: load/prepare the other networks once the model and optimiser exist."""

    def _wrap_networks(self):
        """The student as the losses call it, wrapped once: DDP (when distributed), then precision."""
        self.student = self._net(self.ddp_model)

    def _extra_checkpoint_kinds(self):
        """Hook: kinds of the files `_extra_checkpoint_files` writes (a resumable set needs them)."""
        return ()

    def _wrap_model(self):
        if not _distributed():
            return self.model
        if os.environ.get(NO_GRAD_SYNC_ENV):
            logger.log(f"WARNING: {NO_GRAD_SYNC_ENV} is set: gradients are NOT synchronised across processes")
            return self.model
        cuda = dist_util.dev().type == "cuda"
        return DDP(
            self.model,
            device_ids=[dist_util.dev()] if cuda else None,
            output_device=dist_util.dev() if cuda else None,
            bucket_cap_mb=128,
            **_no_buffer_broadcast(),
            find_unused_parameters=False,
        )

    # --- the loop -----------------------------------------------------------
    def finished(self):
        """True once lr_anneal_steps or total_training_steps (when > 0) steps are done."""
        if self.lr_anneal_steps and self.step >= self.lr_anneal_steps:
            return True
        return bool(self.total_training_steps) and self.step >= self.total_training_steps

    def run_loop(self):
        """Train until `finished()` or SIGTERM; checkpoint every save_interval steps and at the end."""
        if hasattr(self.data, "seek"):
            self.data.seek(self.step)
        start, logged = self.step, self.step
        with _StopOnSigterm() as stop:
            while not self.finished():
                before = self.step
                # a bad image on one rank ends every rank with its line, not a lost-peer error
                batch, cond = on_all_ranks(lambda: next(self.data))
                self.run_step(batch, cond)
                if self.step != before:
                    if self.evaluator is not None and self.evaluator.due(self.step, self.finished()):
                        self.evaluate()
                    # no periodic save amid non-finite steps: the last good set stays the newest
                    due = self.save_interval > 0 and self.step % self.save_interval == 0
                    if due and not self.bad_steps.in_a_row:
                        self.save()
                    if self.step % self.log_interval == 0:
                        logger.dumpkvs()
                        logged = self.step
                if stop.requested():
                    logger.log(f"SIGTERM received: stopping after step {self.step}")
                    break
        if self.evaluator is not None and self.evaluator.interval and self.step not in (start, self._evaluated_step):
            self.evaluate()  # stopped early: the end's evaluation
            logged = None
        if self.step != logged:
            logger.dumpkvs()
        if self.step != start and self._saved_step != self.step:
            self.save()

    def _ema_states(self):
        """{rate: () ↦ the EMA weights as a model state_dict} (built only when asked for)."""
        return {
            rate: (lambda params=params: self.mp_trainer.master_params_to_state_dict(params))
            for rate, params in zip(self.ema_rate, self.ema_params)
        }

    def evaluate(self):
        """The evaluator's FID of the EMA network(s) now, logged with this step's values."""
        metrics = self.evaluator.evaluate(self.step, self._ema_states())
        for key, value in metrics.items():
            logger.logkv(key, value)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("fid_"))
        logger.log(f"evaluation after {self.step} steps: {shown} ({metrics['eval_seconds']:.1f} s)")
        self._evaluated_step = self.step
        return metrics

    def _seed_step(self):
        if self.seed is not None:
            seed_all(derived_seed(self.seed, self.rank, self.step, _SEED_STEP))

    def _set_lr(self):
        lr = self.lr
        if self.lr_anneal_steps:
            lr = self.lr * max(0.0, 1.0 - self.step / self.lr_anneal_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        logger.logkv("lr", lr)

    def run_step(self, batch, cond):
        """One optimiser step on ``batch``; returns whether the step was taken."""
        self._seed_step()
        self._before_step()
        self._set_lr()  # after _before_step: a fresh optimiser (progdist's new stage) runs at the logged lr
        self.forward_backward(batch, cond)
        if self._skip_bad_step():  # a non-finite step is not retried: the same batch would repeat it
            self.log_step()
            self.step += 1
            return False
        took_step = self.mp_trainer.optimize(self.opt)
        if took_step:
            self._update_ema()
            self._after_step()
        self.log_step()
        if took_step:  # as in the original, a skipped fp16 step does not count
            self.step += 1
        elif hasattr(self.data, "seek"):
            self.data.seek(self.step)  # retry the same step on the same batch
        return took_step

    def _before_step(self):
        """Hook: called at the start of every step, after the step's reseeding."""

    def _after_step(self):
        """Hook: called after every taken optimiser step, after the EMA update."""

    def _backward(self, loss):
        """Backward of ``loss`` (NaN on the steps of the test switch CM_INJECT_NAN_STEPS)."""
        self.mp_trainer.backward(faults.maybe_inject_nan(loss, self.step, self._nan_steps))

    def _skip_bad_step(self):
        """True when this step's gradients are not finite: they are dropped and the step counted.

        fp16 keeps its own loss-scale logic. Raises faults.TrainingStopped after
        max_bad_steps such steps in a row.
        """
        if self.mp_trainer.loss_scaling:
            return False
        if faults.grads_finite(self.mp_trainer.master_params):
            self.bad_steps.good()
            logger.logkv("bad_steps", self.bad_steps.total)
            return False
        self.mp_trainer.zero_grad()
        logger.log(f"step {self.step}: loss or gradients not finite; step skipped")
        logger.logkv("bad_steps", self.bad_steps.total + 1)
        self.bad_steps.bad(self.step, self._last_checkpoint)
        return True

    def _micro_batches(self, batch, cond):
        """(slice, is_last) over the batch in micro-batch pieces."""
        n = batch.shape[0]
        for i in range(0, n, self.microbatch):
            yield slice(i, i + self.microbatch), i + self.microbatch >= n

    def _net(self, model):
        """``model`` as the losses call it: under bf16 autocast when --precision bf16."""
        return precision_wrap(model, self.precision)

    def _sync_context(self, last):
        """Gradients are all-reduced in the last micro-batch's backward only."""
        if isinstance(self.ddp_model, DDP) and not last:
            return self.ddp_model.no_sync()
        return contextlib.nullcontext()

    def _sample_sigmas(self, n, device):
        """(σ, importance weights, grid indices or None) for n samples."""
        if isinstance(self.schedule_sampler, ScheduleSampler):
            indices, weights = self.schedule_sampler.sample(n, device)
            d = self.diffusion
            grid = get_sigmas_karras(d.num_timesteps, d.sigma_min, d.sigma_max, d.rho, device=device)
            return grid[indices], weights, indices
        sigmas, weights = self.schedule_sampler.sample(n, device)
        return sigmas, weights, None

    def forward_backward(self, batch, cond):
        self.mp_trainer.zero_grad()
        device = dist_util.dev()
        batch = batch.to(device)
        cond = {k: v.to(device) for k, v in cond.items()}
        n = batch.shape[0]
        # σ and noise for the whole batch first: micro-batching changes nothing but memory
        sigmas, weights, indices = self._sample_sigmas(n, device)
        noise = torch.randn_like(batch)
        batch_losses = []
        for part, last in self._micro_batches(batch, cond):
            with self._sync_context(last):
                losses = self.diffusion.training_losses(
                    self.student,
                    batch[part],
                    sigmas[part],
                    model_kwargs={k: v[part] for k, v in cond.items()},
                    noise=noise[part],
                )
                self._backward((losses["loss"] * weights[part]).sum() / n)
            log_loss_dict(self.diffusion, sigmas[part], {k: v * weights[part] for k, v in losses.items()})
            batch_losses.append(losses["loss"].detach())
        if isinstance(self.schedule_sampler, LossAwareSampler):
            self.schedule_sampler.update_with_local_losses(indices, torch.cat(batch_losses))

    def _update_ema(self):
        for rate, params in zip(self.ema_rate, self.ema_params):
            update_ema(params, self.mp_trainer.master_params, rate=rate)

    def log_step(self):
        logger.logkv("step", self.step)
        logger.logkv("samples", (self.step + 1) * self.global_batch)

    # --- checkpoints --------------------------------------------------------
    def checkpoint_dir(self):
        """Where checkpoints go: logging_dir, else the logger's directory."""
        return self.logging_dir or logger.get_dir()

    def _extra_checkpoint_files(self):
        """Hook: [(kind, state_dict)] saved before the model file."""
        return []

    def checkpoint_state(self):
        """[(file name, state)] of the checkpoint of the current step, model file last."""
        opt_state = self.opt.state_dict()
        if self.mp_trainer.loss_scaling:
            opt_state["lg_loss_scale"] = self.mp_trainer.lg_loss_scale
        files = [(checkpoint_filename("opt", self.step), opt_state)]
        for rate, params in zip(self.ema_rate, self.ema_params):
            state = self.mp_trainer.master_params_to_state_dict(params)
            files.append((checkpoint_filename("ema", self.step, rate), state))
        for kind, state in self._extra_checkpoint_files():
            files.append((checkpoint_filename(kind, self.step), state))
        files.append((checkpoint_filename("model", self.step), self.mp_trainer.master_params_to_state_dict()))
        return files

    def save(self):
        """Write the checkpoint set of the current step on rank 0, agreed by every rank.

        Each file is serialised, then written atomically, model file last, with
        ``metaNNNNNN.json`` beside it; a failure on rank 0 (disk full, ...)
        removes the new set's files and raises the same one-line error on
        every rank, leaving the previous set the newest complete one.
        """
        directory = self.checkpoint_dir()

        def write():
            if self.rank != 0:
                return
            if directory is None:
                raise ValueError("no logging directory to save checkpoints in (call logger.configure first)")
            files = self.checkpoint_state()
            meta = run_metadata.metadata_bytes(self.step, self.run_flags, self.world_size)
            files.insert(len(files) - 1, (run_metadata.metadata_filename(self.step), meta))
            faults.write_checkpoint_set(directory, files)
            logger.log(f"saved checkpoint of step {self.step} in {directory}")

        on_all_ranks(write)
        self._saved_step = self.step
        if directory is not None:
            self._last_checkpoint = os.path.join(directory, checkpoint_filename("model", self.step))
            if self.evaluator is not None and self.evaluator.grid_samples:  # the fixed-seed grid beside it
                path = os.path.join(directory, grid_filename(self.step))
                on_all_ranks(lambda: self.evaluator.write_grid(path, self._ema_states()))


# ----------------------------------------------------------------------------
# The consistency loop


class CMTrainLoop(TrainLoop):
    """The consistency loop: one row of `cm.recipes.RECIPES` per ``training_mode``.

    Consistency distillation / training (Song et al. 2023), progressive
    distillation, iCT and ECT differ only in their row: its loss, its schedule
    ``ema_scale_fn(step)`` = (target EMA μ, level: N or ECT's stage), and the
    networks it needs. ``teacher_model``: the EDM teacher (eval mode, no
    gradients); when given, the student (and the target) start as copies of it
    unless a checkpoint is resumed. ``target_model``: the target network θ⁻ of
    the rows whose target is "ema" (an "online" row's target is the student
    under no_grad). ``huber_c`` (None: the loss's default, iCT's 0.00054·√d;
    ECT's 0), ``ect_q``, ``p_mean``/``p_std`` (ln t ~ N(p_mean, p_std²)) and
    ``loss_options`` (further loss flags by name) go to the row's loss.
    ``extra_networks``: {name: module} of the row's ``extra_networks``.
    """

    def __init__(
        self,
        *,
        target_model,
        teacher_model,
        teacher_diffusion,
        training_mode,
        ema_scale_fn,
        total_training_steps,
        huber_c=None,
        ect_q=2.0,
        p_mean=recipes.P_MEAN,
        p_std=recipes.P_STD,
        loss_options=None,
        extra_networks=None,
        **kwargs,
    ):
        self.recipe = row = recipes.get_recipe(training_mode)
        if row.needs_teacher and teacher_model is None:
            raise ValueError(f"training_mode {training_mode} needs a teacher model")
        if row.target == "ema" and target_model is None:
            raise ValueError(f"training_mode {training_mode} needs a target model")
        if row.target != "ema" and target_model is not None:
            raise ValueError(f"training_mode {training_mode} has no EMA target network; pass target_model=None")
        extra_networks = dict(extra_networks or {})
        if sorted(extra_networks) != sorted(row.extra_networks):
            raise ValueError(f"training_mode {training_mode} needs the extra networks {list(row.extra_networks)}")
        if not total_training_steps > 0:
            raise ValueError(f"--total_training_steps must be positive, got {total_training_steps}")
        self.training_mode = training_mode
        self.target_model = target_model
        self.teacher_model = teacher_model
        self.teacher_diffusion = teacher_diffusion
        self.extra_networks = extra_networks
        self.ema_scale_fn = ema_scale_fn
        self.target_master_params = None
        self.loss_options = {**dict(huber_c=huber_c, ect_q=ect_q, p_mean=p_mean, p_std=p_std), **(loss_options or {})}
        super().__init__(total_training_steps=total_training_steps, **kwargs)
        if self.lr_anneal_steps and self.lr_anneal_steps < total_training_steps:
            logger.log(
                f"WARNING: --lr_anneal_steps {self.lr_anneal_steps} < --total_training_steps "
                f"{total_training_steps}: the lr is 0 from step {self.lr_anneal_steps} on"
            )

    def finished(self):
        """True once total_training_steps steps are done (SPEC §8; lr_anneal_steps only decays the lr)."""
        return self.step >= self.total_training_steps

    def _initial_weights(self):
        if self.teacher_model is not None and not self.resume_checkpoint:
            load_model_state(self.model, self.teacher_model.state_dict(), "the teacher model")

    def _resume_part(self, kind, module):
        """Load the resumed set's ``kind`` file into ``module``; False when there is none."""
        found = self._sibling(kind)
        if found is None:
            return False
        load_model_state(module, found[1], found[0])
        return True

    def _setup_networks(self):
        if self.target_model is not None:
            if not self._resume_part("target_model", self.target_model):
                self.target_model.load_state_dict(self.mp_trainer.master_params_to_state_dict())
            dist_util.sync_params(self.target_model.parameters())
            self.target_model.requires_grad_(False)
            self.target_model.train()
            if self.mp_trainer.loss_scaling:
                self.target_master_params = _float_copies(self.target_model.parameters())
            else:
                self.target_master_params = list(self.target_model.parameters())
            if self.use_fp16:
                self.target_model.convert_to_fp16()
        if self.teacher_model is not None:
            if "teacher_model" in self.recipe.checkpoint_files:
                self._resume_part("teacher_model", self.teacher_model)
            dist_util.sync_params(self.teacher_model.parameters())
            self.teacher_model.requires_grad_(False)
            self.teacher_model.eval()
            if self.use_fp16:
                self.teacher_model.convert_to_fp16()
        for name, module in self.extra_networks.items():
            self._resume_part(name, module)
            dist_util.sync_params(module.parameters())

    def _wrap_networks(self):
        """Every network the loss calls, wrapped once: precision (autocast), DDP for the student."""
        super()._wrap_networks()
        row = self.recipe
        target = {"ema": self.target_model, "online": self.model}.get(row.target)
        teacher = None
        if self.teacher_model is not None:
            # frozen: under bf16 its weights are stored in bf16 once (autocast's numbers, cast once)
            teacher = precision_wrap(self.teacher_model, self.precision, frozen=row.frozen_bf16_teacher)
        self.nets = recipes.Networks(
            student=self.student,
            target=self._net(target) if target is not None else None,
            teacher=teacher,
            teacher_diffusion=self.teacher_diffusion,
            extra={name: self._net(module) for name, module in self.extra_networks.items()},
        )

    def _before_step(self):
        if self.recipe.teacher_follows_student:
            self._maybe_promote_student()

    def _after_step(self):
        if self.target_model is not None:
            self._update_target_ema()
        if self.recipe.after_step is not None:
            self.recipe.after_step(self)

    def _maybe_promote_student(self):
        """At the first step of a new level (progdist's N): teacher ← student, fresh optimiser and EMAs."""
        if self.step == 0:
            return
        level = self.ema_scale_fn(self.step)[1]
        previous = self.ema_scale_fn(self.step - 1)[1]
        if level == previous:
            return
        symbol = "N" if self.recipe.level_name == "num_scales" else self.recipe.level_name
        logger.log(f"{self.training_mode}: {symbol} {previous} -> {level} at step {self.step}; the student becomes the teacher")
        self.teacher_model.load_state_dict(self.mp_trainer.master_params_to_state_dict())
        self.opt = self._new_optimizer()
        self.ema_params = [_float_copies(self.mp_trainer.master_params) for _ in self.ema_rate]

    def forward_backward(self, batch, cond):
        self.mp_trainer.zero_grad()
        device = dist_util.dev()
        batch = batch.to(device)
        cond = {k: v.to(device) for k, v in cond.items()}
        n = batch.shape[0]
        target_ema, level = self.ema_scale_fn(self.step)
        for part, last in self._micro_batches(batch, cond):
            micro_cond = {k: v[part] for k, v in cond.items()}
            with self._sync_context(last):
                losses = self.recipe.loss(self.diffusion, self.nets, batch[part], level, micro_cond, self.loss_options)
                self._backward(losses["loss"].sum() / n)
            log_loss_dict(self.diffusion, losses["sigmas"], {"loss": losses["loss"]})
            if "r" in losses:  # a pair of levels (t, r) per sample
                logger.logkv_mean("t_mean", losses["sigmas"].mean().item())
                logger.logkv_mean("r_over_t", (losses["r"] / losses["sigmas"]).mean().item())
                logger.logkv_mean("r_zero", (losses["r"] == 0).float().mean().item())
        logger.logkv(self.recipe.level_name, level)
        logger.logkv("target_ema", target_ema)

    def _update_target_ema(self):
        target_ema, _ = self.ema_scale_fn(self.step)
        update_ema(self.target_master_params, self.mp_trainer.master_params, rate=target_ema)
        if self.mp_trainer.loss_scaling:
            master_params_to_model_params(list(self.target_model.parameters()), self.target_master_params)

    def _extra_checkpoint_kinds(self):
        return tuple(self.recipe.checkpoint_files) + tuple(self.recipe.extra_networks)

    def _extra_checkpoint_files(self):
        files = []
        if "target_model" in self.recipe.checkpoint_files:
            files.append(("target_model", master_params_to_state_dict(self.target_model, self.target_master_params)))
        if "teacher_model" in self.recipe.checkpoint_files:
            teacher = {k: v.float() if v.is_floating_point() else v for k, v in self.teacher_model.state_dict().items()}
            files.append(("teacher_model", teacher))
        for name, module in self.extra_networks.items():
            files.append((name, module.state_dict()))
        return files
