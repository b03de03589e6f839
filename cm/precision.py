"""Precision and speed settings of the network: bf16 autocast, channels-last, torch.compile.

``--precision`` is one of

* ``fp32``: float32 everywhere (today's behaviour, bit for bit);
* ``bf16``: the network's matrix products and convolutions run under
  `torch.autocast` with bfloat16 (CPU and CUDA). The parameters, the optimiser,
  the EMAs and every checkpoint stay float32 ("master weights"), no loss scale
  is needed (bfloat16 has float32's exponent range). Only the network call is
  autocast: the preconditioning arithmetic (c_skip, c_out, c_in), the losses and
  the EMA updates stay float32, the network's output is cast back to float32,
  GroupNorm computes its statistics in float32 (`cm.nn.GroupNorm32`), and the
  attention softmax accumulates in float32 inside the fused attention kernels;
* ``fp16``: the original's float16 network with master weights and a dynamic
  loss scale (`cm.fp16_util`), CUDA only; on a CPU it falls back to float32
  with a warning.

``auto`` (the default) means fp16 when ``--use_fp16 True`` and fp32 otherwise,
so the original's spelling keeps working; ``--use_fp16 True`` together with
``--precision fp32`` or ``bf16`` is a contradiction and a one-line error.
"""

import contextlib
import functools
import importlib
import shutil

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "fp16")
PRECISION_HELP = "fp32, bf16 (autocast, float32 weights) or fp16 (as --use_fp16 True); auto: fp16 iff --use_fp16 True"
CHANNELS_LAST_HELP = "run the network in channels-last memory format"
COMPILE_HELP = "torch.compile the network (falls back to eager with a one-line message where it cannot compile)"


def resolve_precision(precision, use_fp16=False):
    """The effective precision name from ``--precision`` and ``--use_fp16``; ValueError on a contradiction."""
    precision = (precision or "auto").lower()
    if precision == "auto":
        return "fp16" if use_fp16 else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be auto, {', '.join(PRECISIONS)}; got {precision!r}")
    if use_fp16 and precision != "fp16":
        raise ValueError(f"--precision {precision} contradicts --use_fp16 True (which means --precision fp16)")
    return precision


def autocast(precision, device):
    """Context in which the network runs: bf16 autocast on ``device``'s type, else nothing."""
    if precision != "bf16":
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


class AutocastModel:
    """Calls ``model`` under `autocast` and returns float32; a plain callable, not a module.

    It owns no parameters, so state dicts, optimisers and DDP keep seeing the
    wrapped model itself.
    """

    def __init__(self, model, precision):
        self.model = model
        self.precision = precision

    def __call__(self, x, *args, **kwargs):
        device = (x[0] if isinstance(x, (list, tuple)) else x).device  # a list: feature maps (a GAN head)
        with autocast(self.precision, device):
            out = self.model(x, *args, **kwargs)
        return _to_float(out)

    def __getattr__(self, name):  # model attributes (dtype, num_classes, ...) stay reachable
        return getattr(self.__dict__["model"], name)


def _to_float(out):
    """float32 copies of the floating tensors in a network's output (a tensor, or tuples/lists/dicts of them)."""
    if torch.is_tensor(out):
        return out.float()
    if isinstance(out, (tuple, list)):
        return type(out)(_to_float(o) for o in out)
    if isinstance(out, dict):
        return {k: _to_float(v) for k, v in out.items()}
    return out


def wrap(model, precision, frozen=False):
    """``model`` itself unless ``precision`` is bf16, then an `AutocastModel` around it.

    ``frozen=True`` (sampling, a distillation teacher: weights that no optimiser
    touches) also stores the network's convolution and linear weights in
    bfloat16 once (`store_bf16_weights`), which gives the same numbers as
    casting them on every call.
    """
    if precision != "bf16":
        return model
    if frozen:
        store_bf16_weights(model)
    return AutocastModel(model, precision)


def _weight_layers():
    from . import song_unet

    return (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, song_unet.Conv2d, song_unet.Linear)


def store_bf16_weights(model):
    """Keep a frozen network's convolution and linear parameters in bfloat16 (in place); returns it.

    Under bf16 autocast these layers cast their float32 weights and biases to
    bfloat16 (round to nearest even) on every call, and autocast's cast cache
    holds those copies for the whole call. Casting once gives the same bfloat16
    values, so the outputs are bit for bit those of plain autocast, while the
    per-call casts and the float32 copies go: half the weight memory.
    Normalisation and embedding parameters and all buffers stay as they are.
    Only for weights that no optimiser updates.
    """
    layers = _weight_layers()
    for module in model.modules():
        if isinstance(module, layers):
            for name, param in module.named_parameters(recurse=False):
                if param.dtype == torch.float32:
                    param.data = param.data.to(torch.bfloat16)
    return model


# ----------------------------------------------------------------------------
# Channels-last and torch.compile


def to_channels_last(model):
    """Put the model's 4-D parameters in channels-last format (in place); returns it."""
    return model.to(memory_format=torch.channels_last)


@functools.lru_cache(maxsize=None)
def compile_unavailable_reason(device_type="cpu"):
    """Why torch.compile cannot run here (a short sentence), or None when it can."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if device_type == "cpu" and not any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "g++", "c++")):
        return "no C++ compiler found (inductor needs one for CPU code)"
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed (inductor needs it for CUDA code)"
    try:
        importlib.import_module("torch._inductor")
    except Exception as exc:  # any import failure means no compiler backend
        return f"torch inductor is unavailable ({type(exc).__name__})"
    return None


def compile_model(model, device_type="cpu", log=print):
    """Compile ``model`` in place (`nn.Module.compile`, state-dict keys unchanged); returns whether it did.

    Where the platform cannot compile, says so in one line through ``log`` and
    leaves the model eager.
    """
    reason = compile_unavailable_reason(device_type)
    if reason is not None:
        log(f"--compile True: {reason}; running the network eagerly")
        return False
    model.compile(dynamic=False)
    return True


def prepare_model(model, *, channels_last=False, compile=False, device_type="cpu", log=print):
    """Apply the memory format and compilation flags to a network (in place); returns it."""
    if channels_last:
        to_channels_last(model)
    if compile:
        compile_model(model, device_type, log=log)
    return model


# ----------------------------------------------------------------------------
# The scripts' flags


def add_speed_flags(parser):
    """Add --precision, --channels_last and --compile to an argparse parser."""
    from .script_util import str2bool

    parser.add_argument("--precision", default="auto", help=f"{PRECISION_HELP} (default: auto)")
    parser.add_argument("--channels_last", type=str2bool, default=False, help=f"{CHANNELS_LAST_HELP} (default: False)")
    parser.add_argument("--compile", type=str2bool, default=False, help=f"{COMPILE_HELP} (default: False)")
    return parser


def resolve_speed_args(args):
    """Resolve ``args.precision`` against ``args.use_fp16`` in place (one-line UsageError); returns it.

    Afterwards ``args.use_fp16`` is True exactly when the precision is fp16, so
    code that reads only ``use_fp16`` keeps doing the right thing.
    """
    from .cli import UsageError

    try:
        args.precision = resolve_precision(args.precision, getattr(args, "use_fp16", False))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    args.use_fp16 = args.precision == "fp16"
    return args.precision


def prepare_from_args(model, args, device_type="cpu", log=print):
    """`prepare_model` with the scripts' --channels_last and --compile (absent flags: off)."""
    return prepare_model(
        model,
        channels_last=getattr(args, "channels_last", False),
        compile=getattr(args, "compile", False),
        device_type=device_type,
        log=log,
    )
