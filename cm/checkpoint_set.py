"""Reading and writing a training loop's checkpoint set (`CheckpointSet`, a base of `TrainLoop`).

A set of step k is ``modelNNNNNN.pt`` (written last), ``ema_<rate>_NNNNNN.pt``
per EMA rate, ``optNNNNNN.pt`` (the fp16 loss scale rides in it), the files of
the loop's ``_extra_checkpoint_kinds`` (e.g. ``target_modelNNNNNN.pt``) and
``metaNNNNNN.json``. ``--resume_checkpoint auto`` takes the newest set whose
files all load (`cm.faults.newest_usable_checkpoint`); a part missing beside
the model file starts from the model; an optimiser state that does not fit the
model is a one-line `CheckpointError`; saving is atomic per set
(`cm.faults.write_checkpoint_set`).
"""

import os

import torch
from torch.optim import RAdam

from . import dist_util, faults, logger, run_metadata
from .checkpoint import (
    CheckpointError,
    check_state_dict,
    checkpoint_filename,
    load_model_state,
    parse_resume_step,
    read_checkpoint,
    strip_wrapper_prefix,
)
from .cli import on_all_ranks
from .opt_layout import is_original_fp16_layout, to_per_parameter


def float_copies(params):
    """Detached float32 copies (EMA and target masters)."""
    return [p.detach().to(torch.float32, copy=True) for p in params]


class CheckpointSet:
    """The checkpoint half of a training loop.

    Expects of the loop: ``model``, ``mp_trainer``, ``opt``, ``step``, ``rank``,
    ``world_size``, ``ema_rate``, ``ema_params``, ``logging_dir``,
    ``weight_decay``, ``lr``, ``run_flags``, ``resume_checkpoint``.
    """

    def _resolve_resume(self, resume_checkpoint):
        """The model file to resume from, or None; "auto" = newest usable set in logging_dir."""
        if resume_checkpoint != "auto":
            return resume_checkpoint or None
        path = None
        if self.rank == 0:
            path = faults.newest_usable_checkpoint(self.logging_dir, self.ema_rate, self._extra_checkpoint_kinds())
        path = dist_util.broadcast_object(path)
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

    def _resume_part(self, kind, module):
        """Load the resumed set's ``kind`` file into ``module``; False when there is none."""
        found = self._sibling(kind)
        if found is None:
            return False
        load_model_state(module, found[1], found[0])
        return True

    def _load_params(self, path, state):
        """Float32 parameter list (model order) from a state_dict, checked against the model."""
        state, _ = strip_wrapper_prefix(state, self.model.state_dict())
        check_state_dict(self.model.state_dict(), state, path)
        return float_copies(self.mp_trainer.state_dict_to_master_params(state))

    def _load_ema(self, rate):
        found = self._sibling("ema", rate)
        if found is None:
            return float_copies(self.mp_trainer.master_params)
        return self._load_params(*found)

    def _new_optimizer(self):
        return RAdam(self.mp_trainer.master_params, lr=self.lr, betas=self.adam_betas, weight_decay=self.weight_decay)

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

    def _extra_checkpoint_kinds(self):
        """Hook: kinds of the files `_extra_checkpoint_files` writes (a resumable set needs them)."""
        return ()

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
