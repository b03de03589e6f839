"""Mixed precision: module casting, the fp16-on-CPU fallback, master weights and loss scaling."""

import math
import warnings

import torch
import torch.nn as nn

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_warned_cpu_fp16 = False


def convert_module_to_f16(module):
    """Cast a convolution's weight and bias to float16 (other modules untouched)."""
    if isinstance(module, _CONV_TYPES):
        module.weight.data = module.weight.data.half()
        if module.bias is not None:
            module.bias.data = module.bias.data.half()


def convert_module_to_f32(module):
    """Cast a convolution's weight and bias back to float32."""
    if isinstance(module, _CONV_TYPES):
        module.weight.data = module.weight.data.float()
        if module.bias is not None:
            module.bias.data = module.bias.data.float()


def resolve_use_fp16(use_fp16):
    """Return whether float16 can really be used: only with a CUDA device.

    float16 math on a CPU is about 400x slower than float32, so without CUDA a
    request for it is downgraded to float32 with a single warning per process.
    """
    global _warned_cpu_fp16
    if not use_fp16 or torch.cuda.is_available():
        return bool(use_fp16)
    if not _warned_cpu_fp16:
        warnings.warn(
            "--use_fp16 True needs a CUDA device; none found, running in float32",
            RuntimeWarning,
            stacklevel=2,
        )
        _warned_cpu_fp16 = True
    return False


# ----------------------------------------------------------------------------
# Master parameters and the dynamic loss scale

INITIAL_LOG_LOSS_SCALE = 20.0


def make_master_params(model_params):
    """Float32 copies of the model's parameters, detached leaves that the optimiser owns."""
    return [p.detach().to(torch.float32, copy=True).requires_grad_(True) for p in model_params]


def model_grads_to_master_grads(model_params, master_params):
    """Copy (and upcast) the model's gradients onto the master parameters; None stays None."""
    for p, master in zip(model_params, master_params):
        master.grad = None if p.grad is None else p.grad.detach().to(torch.float32, copy=True)


def master_params_to_model_params(model_params, master_params):
    """Copy the master values into the model's parameters, casting to their dtype."""
    with torch.no_grad():
        for p, master in zip(model_params, master_params):
            p.copy_(master)


def master_params_to_state_dict(model, master_params):
    """The model's `state_dict` with every parameter replaced by its master value.

    Keys, order and buffers are the model's, so the result is a plain checkpoint.
    """
    state_dict = model.state_dict()
    names = [name for name, _ in model.named_parameters()]
    if len(names) != len(master_params):
        raise ValueError(f"{len(master_params)} master params for a model with {len(names)} parameters")
    for name, master in zip(names, master_params):
        state_dict[name] = master.detach()
    return state_dict


def state_dict_to_master_params(model, state_dict):
    """Float32 master parameters, in `model.named_parameters()` order, from a state_dict."""
    return make_master_params([state_dict[name] for name, _ in model.named_parameters()])


def zero_grad(params):
    """Drop the gradients of ``params``."""
    for p in params:
        p.grad = None


class MixedPrecisionTrainer:
    """Owns the parameters the optimiser updates, and the loss scale in fp16 mode.

    Without loss scaling the master parameters ARE the model's parameters. With
    it (``use_fp16`` on a CUDA device) the model is converted to float16, the
    optimiser steps float32 master copies, and the loss is multiplied by
    2**lg_loss_scale before backward. A step whose gradients contain inf/NaN is
    skipped and halves the scale (lg −1); every good step grows lg by
    ``fp16_scale_growth``.

    ``use_fp16`` goes through `resolve_use_fp16`, so on a CPU it means float32.
    ``loss_scaling`` (default: the resolved ``use_fp16``) turns on master copies
    and loss scaling without converting the model, which lets the fp16
    bookkeeping run, and be tested, on float32 models.
    """

    def __init__(
        self,
        *,
        model,
        use_fp16=False,
        fp16_scale_growth=1e-3,
        initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE,
        loss_scaling=None,
    ):
        self.model = model
        self.use_fp16 = resolve_use_fp16(use_fp16)
        self.loss_scaling = self.use_fp16 if loss_scaling is None else bool(loss_scaling)
        self.fp16_scale_growth = fp16_scale_growth
        self.lg_loss_scale = float(initial_lg_loss_scale)
        self.model_params = list(model.parameters())
        self.master_params = self.model_params
        if self.loss_scaling:
            self.master_params = make_master_params(self.model_params)
        if self.use_fp16:
            model.convert_to_fp16()

    def zero_grad(self):
        """Drop the model's (and the masters') gradients."""
        zero_grad(self.model_params)
        if self.master_params is not self.model_params:
            zero_grad(self.master_params)

    def backward(self, loss):
        """Backward of ``loss``, times 2**lg_loss_scale when loss scaling."""
        if self.loss_scaling:
            loss = loss * (2**self.lg_loss_scale)
        loss.backward()

    def optimize(self, opt):
        """Step ``opt`` on the master parameters; False when the step was skipped."""
        from . import logger  # here, not at import time: the network imports this module

        if self.loss_scaling:
            return self._optimize_scaled(opt, logger)
        grad_norm, param_norm = self.norms()
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)
        opt.step()
        return True

    def _optimize_scaled(self, opt, logger):
        logger.logkv_mean("lg_loss_scale", self.lg_loss_scale)
        model_grads_to_master_grads(self.model_params, self.master_params)
        scale = 2**self.lg_loss_scale
        grad_norm, param_norm = self.norms(grad_scale=scale)
        if not math.isfinite(grad_norm):
            self.lg_loss_scale -= 1
            logger.log(f"found inf/NaN gradients; step skipped, lg_loss_scale lowered to {self.lg_loss_scale:g}")
            self.zero_grad()
            return False
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)
        for p in self.master_params:
            if p.grad is not None:
                p.grad.mul_(1.0 / scale)
        opt.step()
        self.zero_grad()
        master_params_to_model_params(self.model_params, self.master_params)
        self.lg_loss_scale += self.fp16_scale_growth
        return True

    def norms(self, grad_scale=1.0):
        """(gradient L2 norm / grad_scale, parameter L2 norm) of the master parameters."""
        with torch.no_grad():
            grads = [p.grad.float() for p in self.master_params if p.grad is not None]
            params = [p.float() for p in self.master_params]
            grad_norm = torch.stack(torch._foreach_norm(grads)).norm().item() / grad_scale if grads else 0.0
            param_norm = torch.stack(torch._foreach_norm(params)).norm().item() if params else 0.0
        return grad_norm, param_norm

    def master_params_to_state_dict(self, master_params=None):
        """Plain model state_dict of ``master_params`` (default: the trainer's own)."""
        return master_params_to_state_dict(self.model, self.master_params if master_params is None else master_params)

    def state_dict_to_master_params(self, state_dict):
        """Float32 parameter list, in the model's order, from a state_dict."""
        return state_dict_to_master_params(self.model, state_dict)

    def load_master_params(self, master_params):
        """Set the masters (and the model) to ``master_params`` in place."""
        with torch.no_grad():
            for p, value in zip(self.master_params, master_params):
                p.copy_(value)
        if self.master_params is not self.model_params:
            master_params_to_model_params(self.model_params, self.master_params)
