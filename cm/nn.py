"""Layers and tensor helpers shared by the network and the denoiser."""

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always computes in float32 and returns the input's dtype.

    A bfloat16 input on a CPU goes straight to the mixed-dtype kernel, which
    accumulates the statistics in float32 with the float32 affine parameters
    (no float32 copy of the activations; bf16 autocast, `cm.precision`).
    """

    def forward(self, x):
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and self.weight is not None:
            return F.group_norm(x, self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        # a float64 network (the JVP tests) stays float64; everything else computes in float32
        return super().forward(x if x.dtype == torch.float64 else x.float()).type(x.dtype)


def normalization(channels):
    """The network's normalisation layer: GroupNorm with 32 groups."""
    return GroupNorm32(32, channels)


def conv_nd(dims, *args, **kwargs):
    """A 1-, 2- or 3-D convolution."""
    layers = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    if dims not in layers:
        raise ValueError(f"unsupported dimensions: {dims}")
    return layers[dims](*args, **kwargs)


def linear(*args, **kwargs):
    """A fully connected layer."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """A 1-, 2- or 3-D average pooling layer."""
    layers = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    if dims not in layers:
        raise ValueError(f"unsupported dimensions: {dims}")
    return layers[dims](*args, **kwargs)


def zero_module(module):
    """Zero every parameter of `module` in place and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module, scale):
    """Scale every parameter of `module` in place and return it."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


def mean_flat(tensor):
    """Mean over every dimension but the batch one."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def append_dims(x, target_dims):
    """Append singleton dimensions to `x` until it has `target_dims` dims."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}")
    return x[(...,) + (None,) * missing]


def append_zero(x):
    """Append a trailing 0 to a 1-D tensor."""
    return torch.cat([x, x.new_zeros([1])])


def check_time_inputs(time_inputs, r):
    """A two-time network needs r, a one-time network takes none (ValueError else)."""
    if time_inputs == 2 and r is None:
        raise ValueError("this network has two time inputs (time_inputs 2): pass r_timesteps")
    if time_inputs == 1 and r is not None:
        raise ValueError("r_timesteps given to a network with one time input (time_inputs 1)")


# A two-time network (``time_inputs=2``, MeanFlow's u(x, t, r)) differs from its one-time version only
# in the layers that read or add to the time features: each network lists them in ``TIME_KEYS``
# as {state_dict key: the dimension that doubles}; the first entry reads the features (dim 1).


def time_inputs_in(model, state_dict):
    """The number of time inputs of the network ``state_dict`` holds, as ``model`` would read it (None: unknown)."""
    key, dim = next(iter(model.TIME_KEYS.items()))
    w, ref = state_dict.get(key), model.state_dict()[key]
    per_time = ref.shape[dim] // model.time_inputs
    if not hasattr(w, "shape") or w.ndim != ref.ndim or w.shape[dim] % per_time:
        return None
    if [n for i, n in enumerate(w.shape) if i != dim] != [n for i, n in enumerate(ref.shape) if i != dim]:
        return None  # another network altogether: the shape check names it
    return w.shape[dim] // per_time


def widen_time_inputs(model, state_dict):
    """A one-time network's ``state_dict`` for the two-time ``model``: the new weights of r are zero.

    The widened network computes exactly what the one-time network did, whatever r
    (MeanFlow initialised from a pretrained flow or EDM model).
    """
    if model.time_inputs != 2 or time_inputs_in(model, state_dict) != 1:
        return state_dict
    state_dict = dict(state_dict)
    for key, dim in model.TIME_KEYS.items():
        if key in state_dict:
            w = state_dict[key]
            state_dict[key] = torch.cat([w, torch.zeros_like(w)], dim=dim)
    return state_dict


def timestep_embedding(timesteps, dim, max_period=10000, dtype=torch.float32):
    """Sinusoidal embedding of real-valued timesteps: [cos, sin] of t·exp(−ln(P)·i/half).

    Computed in ``dtype`` (float32, as the original; float64 for a float64 network).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=dtype, device=timesteps.device)
        / half
    )
    args = timesteps[:, None].to(dtype) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def update_ema(target_params, source_params, rate=0.99):
    """target ← rate·target + (1−rate)·source, in place (fused foreach kernels, same arithmetic)."""
    pairs = list(zip(target_params, source_params))
    if not pairs:
        return
    with torch.no_grad():
        targets = [targ for targ, _ in pairs]
        torch._foreach_mul_(targets, rate)
        torch._foreach_add_(targets, [src.to(targ.dtype) for targ, src in pairs], alpha=1 - rate)


def checkpoint(func, inputs, params, flag):
    """Run `func(*inputs)`, recomputing activations in the backward pass when `flag`.

    `params` is accepted for signature compatibility with the original; torch's
    non-reentrant checkpointing finds the parameters by itself.
    """
    if flag and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint as torch_checkpoint

        return torch_checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


# ----------------------------------------------------------------------------
# Attention under forward-mode AD

_explicit_attention = [False]


@contextlib.contextmanager
def explicit_attention():
    """Inside: attention layers compute softmax(q kᵀ/√d)·v by explicit products.

    torch's fused CPU attention kernel (`scaled_dot_product_attention`'s flash
    path) has no forward-mode derivative; the JVP (`cm.jvp`) runs the network
    in this context so its attention is made of ops that have one.
    """
    previous = _explicit_attention[0]
    _explicit_attention[0] = True
    try:
        yield
    finally:
        _explicit_attention[0] = previous


def explicit_attention_active():
    return _explicit_attention[0]


# ----------------------------------------------------------------------------
# sCM's adaptive-weight head (cm.trigflow): one Linear on the network's time features

LOGVAR_HEAD = "logvar_linear"


def attach_logvar_head(net):
    """Give ``net`` the log-variance head (Linear: time features → 1), zero-initialised (ℓ = 0 at start).

    ``net.time_features(timesteps)`` gives the features; the head's keys
    ``logvar_linear.weight``/``.bias`` in a state_dict record that it has one.
    """
    param = next(net.parameters())
    width = net.time_features(torch.zeros(1, device=param.device)).shape[1]
    head = nn.Linear(width, 1, device=param.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    setattr(net, LOGVAR_HEAD, head)
    return net


def has_logvar_head(net_or_state):
    """Whether a network, or a state_dict (any wrapper prefix), carries the head."""
    if isinstance(net_or_state, nn.Module):
        return isinstance(getattr(net_or_state, LOGVAR_HEAD, None), nn.Module)
    return any(k.split(".")[-2:-1] == [LOGVAR_HEAD] for k in net_or_state)
