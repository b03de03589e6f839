"""Training loops: EDM denoiser training (`TrainLoop`) and the consistency loop
(`CMTrainLoop`), which trains every row of the recipe table `cm.recipes`.

One step k (0-based) of either loop:

1. when a seed is given, reseed torch/NumPy/random from (seed, rank, k), so
   the noise levels, noise and dropout of step k do not depend on how the run
   got there; with `StepBatches` (what the scripts use) batch k is itself a
   function of (seed, rank, k);
2. ``_before_step()`` (progdist: a new N makes the student the teacher);
3. split the batch into micro-batches and accumulate their gradients, each
   weighted by its share of the batch, so the sum is the batch-mean gradient
   whatever the micro-batch size; under DistributedDataParallel only the last
   micro-batch all-reduces;
4. one RAdam step at lr·(1 − k/lr_anneal_steps) (constant when 0), skipped in
   fp16 when the gradients overflow (see `MixedPrecisionTrainer`);
5. EMA updates ema_r ← r·ema_r + (1−r)·θ for every rate r, then
   ``_after_step()`` (the target θ⁻ ← μ·θ⁻ + (1−μ)·θ, μ from ``ema_scale_fn(k)``).

After it, ``loop.step`` = k+1 steps are done; checkpoints carry that number.
A skipped fp16 step does not count and is retried on the same batch (the
original also counts only taken steps, but draws a new batch).

Resuming is bit-exact (tested on CPU for every mode) because nothing a step
does depends on the path to it: RNGs and data are functions of (seed, rank,
k), the learning rate of k, and the checkpoint set (`cm.checkpoint_set`) holds
the rest. Not covered: the loss-second-moment sampler's loss history (not
checkpointed), a different world size or batch size, non-deterministic CUDA
kernels; schedules of total_training_steps differ between different totals.

Logged per step: every loss term, its mean per noise bin ``<term>_q0..q3``
(fixed quarters of the ρ-ramp between σ_min and σ_max, the original's
``4·t/T`` quartile: q0 is σ < 0.169, q1 up to 2.51, q2 up to 17.5, q3 above),
grad_norm, param_norm, lr, lg_loss_scale (fp16), bad_steps (non-fp16: steps
skipped for a non-finite loss or gradient), step and samples = (step+1)·global
batch; the consistency loop adds its row's level (num_scales, or ECT's stage)
and target_ema, and for a loss of pairs (iCT/ECT) t_mean, r_over_t (mean r/t)
and r_zero (share of r = 0).
"""

import contextlib
import os

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from . import dist_util, faults, logger, recipes, run_metadata
from .checkpoint import load_model_state
from .checkpoint_set import CheckpointSet, float_copies
from .cli import on_all_ranks, parse_ema_rates  # noqa: F401  (parse_ema_rates: re-exported)
from .loss_logging import log_loss_dict, log_recipe_losses
from .fp16_util import MixedPrecisionTrainer, master_params_to_model_params, master_params_to_state_dict
from .nn import LOGVAR_HEAD, has_logvar_head, update_ema
from .precision import resolve_precision, wrap as precision_wrap
from .random_util import SEED_STEP, derived_seed, seed_all  # noqa: F401  (derived_seed, seed_all: re-exported)
from .recipes import CM_TRAINING_MODES  # noqa: F401  (re-exported)
from .resample import LogNormalSampler, LossAwareSampler, draw_sigmas
from .schedules import noise_bins  # noqa: F401  (re-exported)
from .step_data import StepBatches  # noqa: F401  (re-exported: tests import it from here)
from .train_eval import grid_filename, log_evaluation
from .train_script import per_rank_batch_size  # noqa: F401  (re-exported)

NO_GRAD_SYNC_ENV = dist_util.NO_GRAD_SYNC_ENV  # the debug switch (no gradient all-reduce), re-exported


# ----------------------------------------------------------------------------
# The EDM loop


class TrainLoop(CheckpointSet):
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
        adam_betas=(0.9, 0.999),
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
        self.adam_betas = tuple(adam_betas)
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
        self.mp_trainer = MixedPrecisionTrainer(model=self.model, use_fp16=use_fp16, fp16_scale_growth=fp16_scale_growth)
        self.use_fp16 = self.mp_trainer.use_fp16
        self.opt = self._new_optimizer()
        self.ema_params = [self._load_ema(rate) for rate in self.ema_rate]
        self._load_optimizer()
        self._setup_networks()
        self.ddp_model = self._wrap_model()
        self._wrap_networks()

    # --- construction -----------------------------------------------------
    def _setup_networks(self):
        """Hook: load/prepare the other networks once the model and optimiser exist."""

    def _wrap_networks(self):
        """The student as the losses call it, wrapped once: DDP (when distributed), then precision."""
        self.student = self._net(self.ddp_model)

    def _wrap_model(self):
        return dist_util.wrap_ddp(self.model, log=logger.log)

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
        with faults.StopOnSigterm() as stop:
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
        self._evaluated_step = self.step
        return log_evaluation(self.evaluator, self.step, self._ema_states())

    def _seed_step(self):
        if self.seed is not None:
            seed_all(derived_seed(self.seed, self.rank, self.step, SEED_STEP))

    def _lr_factor(self):
        """Hook: a factor on the lr of this step (a recipe's warm-up); 1."""
        return 1.0

    def _set_lr(self):
        lr = self.lr * self._lr_factor()
        if self.lr_anneal_steps:
            lr = lr * max(0.0, 1.0 - self.step / self.lr_anneal_steps)
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
        bad = self.bad_steps.check(self.mp_trainer.master_params, self.step, self._last_checkpoint, logger)
        if bad:
            self.mp_trainer.zero_grad()
        return bad

    def _start_batch(self, batch, cond):
        """Zero the gradients; the batch and its conditioning on this process's device."""
        self.mp_trainer.zero_grad()
        device = dist_util.dev()
        return batch.to(device), {k: v.to(device) for k, v in cond.items()}

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
        """(σ, importance weights, grid indices or None) for n samples (`cm.resample.draw_sigmas`)."""
        return draw_sigmas(self.schedule_sampler, self.diffusion, n, device)

    def forward_backward(self, batch, cond):
        batch, cond = self._start_batch(batch, cond)
        n, device = batch.shape[0], batch.device
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

    def save(self):
        """`CheckpointSet.save`, then the fixed-seed sample grid ``samples_<step>.png`` beside the checkpoint."""
        super().save()
        directory = self.checkpoint_dir()
        if directory is not None and self.evaluator is not None and self.evaluator.grid_samples:
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
            state = self.teacher_model.state_dict()
            if has_logvar_head(self.model) and not has_logvar_head(state):
                # an sCM student keeps its own (fresh) log-variance head: the teacher has none
                own = self.model.state_dict()
                state = {**state, **{k: v for k, v in own.items() if k.startswith(LOGVAR_HEAD + ".")}}
            load_model_state(self.model, state, "the teacher model")

    def _setup_networks(self):
        if self.target_model is not None:
            if not self._resume_part("target_model", self.target_model):
                self.target_model.load_state_dict(self.mp_trainer.master_params_to_state_dict())
            dist_util.sync_params(self.target_model.parameters())
            self.target_model.requires_grad_(False)
            self.target_model.train()
            if self.mp_trainer.loss_scaling:
                self.target_master_params = float_copies(self.target_model.parameters())
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
        target = {"ema": self.target_model, "online": self.model, "unwrapped": self.model}.get(row.target)
        wrap_target = row.target != "unwrapped"  # a forward-mode pass runs on the bare module, in float32
        teacher = None
        if self.teacher_model is not None:
            # frozen: under bf16 its weights are stored in bf16 once (autocast's numbers, cast once)
            teacher = precision_wrap(self.teacher_model, self.precision, frozen=row.frozen_bf16_teacher)
        self.nets = recipes.Networks(
            student=self.student,
            target=None if target is None else self._net(target) if wrap_target else target,
            teacher=teacher,
            teacher_diffusion=self.teacher_diffusion,
            extra={name: self._net(module) for name, module in self.extra_networks.items()},
        )

    def _new_optimizer(self):
        if self.recipe.new_optimizer is None:
            return super()._new_optimizer()
        return self.recipe.new_optimizer(self.mp_trainer.master_params, self.lr, self.weight_decay)

    def _lr_factor(self):
        if self.recipe.lr_factor is None:
            return 1.0
        return self.recipe.lr_factor(self.step, self.loss_options)

    def _clip_gradients(self):
        """The row's gradient clipping (its ``grad_clip_option`` names the max-norm flag); logs the norm before."""
        max_norm = self.loss_options[self.recipe.grad_clip_option]
        norm = torch.nn.utils.clip_grad_norm_(self.mp_trainer.master_params, max_norm)
        logger.logkv_mean("grad_norm_before_clip", float(norm))

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
        self.ema_params = [float_copies(self.mp_trainer.master_params) for _ in self.ema_rate]

    def forward_backward(self, batch, cond):
        batch, cond = self._start_batch(batch, cond)
        n = batch.shape[0]
        target_ema, level = self.ema_scale_fn(self.step)
        for part, last in self._micro_batches(batch, cond):
            micro_cond = {k: v[part] for k, v in cond.items()}
            with self._sync_context(last):
                losses = self.recipe.loss(self.diffusion, self.nets, batch[part], level, micro_cond, self.loss_options)
                self._backward(losses["loss"].sum() / n)
            log_recipe_losses(self.diffusion, losses, self.recipe.monitors)
        if self.recipe.grad_clip_option:
            self._clip_gradients()
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
