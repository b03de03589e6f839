"""Mixed-precision helpers: module casting and the fp16-on-CPU fallback."""

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
