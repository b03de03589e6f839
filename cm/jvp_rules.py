"""Closed-form forward-mode rules for the layers that dominate a network's JVP on a CPU.

torch's own forward-mode formulas are correct but wasteful there: a
convolution's tangent conv(dx, W) + conv(x, dW) runs the second convolution
on a zero weight tangent (three convolutions per convolution), and GroupNorm's
tangent is decomposed into some twenty elementwise ops. Inside `forward_rules()`
(entered by `cm.jvp.jvp`) ``F.conv1d``/``F.conv2d``/``F.linear`` and
``F.group_norm`` go through `torch.autograd.Function`s whose ``jvp`` is the
closed form below, so `torch.func.jvp` of an unchanged network
(`cm.unet.UNetModel`, `cm.song_unet.SongUNet`) costs about two forwards.

The rules apply only without gradient, outside autocast and on float32/float64
tensors of one dtype; any other call (and every other op) keeps torch's rule.
The tangents are the same functions as torch's, up to float rounding
(`tests/test_jvp_rules.py` compares both, and finite differences, in float64).
"""

import functools

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# ----------------------------------------------------------------------------
# The tangents (pure functions; None is a zero tangent)


def bilinear_tangent(op, x, weight, dx, dweight, dbias, channel_dim):
    """Tangent of y = op(x, W) + b, op bilinear (convolution, matrix product): op(dx, W) + op(x, dW) + db."""
    terms = []
    if dx is not None:
        terms.append(op(dx, weight))
    if dweight is not None:
        terms.append(op(x, dweight))
    out = terms[0] if terms else None
    for term in terms[1:]:
        out = out + term
    if dbias is not None:
        shape = [1] * (out.ndim if out is not None else 2)
        shape[channel_dim] = -1
        out = dbias.reshape(shape) if out is None else out + dbias.reshape(shape)
    return out


def group_norm_tangent(x, mean, rstd, num_groups, weight, dx, dweight, dbias):
    """Tangent of y = γ·x̂ + β, x̂ = (x − μ)·r per (sample, group), r = 1/√(var + ε).

    dx̂ = r·(dx − mean(dx) − x̂·mean(dx·x̂)) over each group (the mean and the
    variance move with x), dy = γ·dx̂ + dγ·x̂ + dβ. ``mean``/``rstd`` [N, G] are
    the primal's statistics. Written as a few whole-tensor passes: with
    y = x − μ, γ·dx̂ = γr·(dx − mean(dx)) − γr³·mean(dx·y)·y.
    """
    n, c = x.shape[:2]
    per_group = c // num_groups
    shape = (n, num_groups, per_group, -1)  # [N, G, C/G, spatial]
    centred = x.reshape(shape) - mean.reshape(n, num_groups, 1, 1)
    r = rstd.reshape(n, num_groups, 1, 1)
    out = None
    if dx is not None:
        d = dx.reshape(shape)
        count = d[0, 0].numel()
        a = d.mean(dim=(2, 3), keepdim=True)
        m = torch.linalg.vecdot(d.flatten(2), centred.flatten(2)).reshape(n, num_groups, 1, 1) / count
        scale = r if weight is None else r * weight.reshape(1, num_groups, per_group, 1)  # γr [N, G, C/G, 1]
        out = (d - a).mul_(scale).addcmul_(centred, -scale * r * r * m).reshape(x.shape)
    affine_shape = (1, c) + (1,) * (x.ndim - 2)
    if dweight is not None:
        term = (centred * r).reshape(x.shape) * dweight.reshape(affine_shape)
        out = term if out is None else out + term
    if dbias is not None:
        term = dbias.reshape(affine_shape).expand(x.shape)
        out = term if out is None else out + term
    return out


# ----------------------------------------------------------------------------
# The Functions (forward: the primal op; jvp: the tangent above; no backward)


class _Fixed:
    """A parameter without a tangent, handed to a Function as a constant (functorch would give it zeros)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _split(t):
    """(t, None) if ``t`` may carry a tangent, else (None, _Fixed(t)): a captured parameter under `torch.func.jvp`."""
    if t is None or _is_wrapped is None or _is_wrapped(t):
        return t, None
    return None, _Fixed(t)


_is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)


def _params(weight, bias):
    """(weight, bias, fixed weight, fixed bias): each parameter goes in as a tensor input or as a constant."""
    (w, fw), (b, fb) = _split(weight), _split(bias)
    return w, b, fw, fb


def _value(t, fixed):
    return fixed.value if fixed is not None else t


class _Bilinear(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, bias, fixed_weight, fixed_bias, op, channel_dim):
        return op(x, _value(weight, fixed_weight), _value(bias, fixed_bias))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, fixed_weight, _, op, channel_dim = inputs
        ctx.save_for_forward(x, weight)
        ctx.fixed_weight, ctx.op, ctx.channel_dim = fixed_weight, op, channel_dim

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, *_):
        x, weight = ctx.saved_tensors
        weight = _value(weight, ctx.fixed_weight)
        return bilinear_tangent(lambda a, w: ctx.op(a, w, None), x, weight, dx, dweight, dbias, ctx.channel_dim)


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, bias, fixed_weight, fixed_bias, num_groups, eps):
        n, c = x.shape[:2]
        weight, bias = _value(weight, fixed_weight), _value(bias, fixed_bias)
        return torch.native_group_norm(x, weight, bias, n, c, x[0, 0].numel(), num_groups, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, fixed_weight, _, num_groups, _ = inputs
        _, mean, rstd = output
        ctx.save_for_forward(x, weight, mean, rstd)
        ctx.fixed_weight, ctx.num_groups = fixed_weight, num_groups
        ctx.mark_non_differentiable(mean, rstd)

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, *_):
        x, weight, mean, rstd = ctx.saved_tensors
        weight = _value(weight, ctx.fixed_weight)
        return group_norm_tangent(x, mean, rstd, ctx.num_groups, weight, dx, dweight, dbias), None, None


# ----------------------------------------------------------------------------
# Routing F.* calls to the Functions


def _arg(args, kwargs, index, name, default=None):
    return args[index] if len(args) > index else kwargs.get(name, default)


def _conv(func, args, kwargs):
    x, weight, bias = args[0], args[1], _arg(args, kwargs, 2, "bias")
    rest = dict(zip(("stride", "padding", "dilation", "groups"), args[3:]), **{k: v for k, v in kwargs.items()
                                                                            if k not in ("input", "weight", "bias")})
    return _Bilinear.apply(x, *_params(weight, bias), functools.partial(func, **rest), 1)


def _linear(func, args, kwargs):
    x, weight, bias = args[0], args[1], _arg(args, kwargs, 2, "bias")
    return _Bilinear.apply(x, *_params(weight, bias), func, -1)


def _group_norm(func, args, kwargs):
    x, num_groups = args[0], _arg(args, kwargs, 1, "num_groups")
    weight, bias, eps = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias"), _arg(args, kwargs, 4, "eps", 1e-5)
    if x.ndim < 2 or x.shape[1] % num_groups:
        return func(*args, **kwargs)
    return _GroupNorm.apply(x, *_params(weight, bias), num_groups, eps)[0]


_RULES = {F.conv1d: _conv, F.conv2d: _conv, F.linear: _linear, F.group_norm: _group_norm}


def _applies(args, kwargs):
    tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
    if not tensors or torch.is_grad_enabled():
        return False
    dtype, device = tensors[0].dtype, tensors[0].device
    if dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled(device.type):
        return False
    return all(t.dtype == dtype and t.device == device for t in tensors)


class _ForwardRules(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = _RULES.get(func)
        if rule is None or not _applies(args, kwargs):
            return func(*args, **kwargs)
        return rule(func, args, kwargs)


def forward_rules():
    """Context: convolutions, linear layers and GroupNorm take the closed-form rules above."""
    return _ForwardRules()
