"""Closed-form forward-mode rules for the layers that dominate a network's JVP on a CPU.

torch's own forward-mode formulas are correct but wasteful there: a
convolution's tangent conv(dx, W) + conv(x, dW) also convolves the zero
tangent of the weight (three convolutions per convolution), GroupNorm's
tangent is some twenty elementwise ops, and any op with one constant operand
(a bias, ``1 + scale``, ``q·d^−½``) does arithmetic on a zero tangent through a
slow Python fallback. Inside `forward_rules()` (entered by `cm.jvp.jvp`, which
runs `torch.autograd.forward_ad`) these calls compute primal and tangent
directly: ``F.conv1d``/``conv2d``/``conv_transpose2d``/``linear`` and
``F.group_norm`` with constant parameters, and ``add``/``sub``/``mul``/``div``
with one constant operand. The networks (`cm.unet.UNetModel`,
`cm.song_unet.SongUNet`) are unchanged.

The layer rules apply only without gradient, outside autocast and on
float32/float64 tensors of one dtype; any other call (and every other op)
keeps torch's rule. The tangents are the same functions as torch's, up to
float rounding (`tests/test_jvp_rules.py` compares both, and finite
differences, in float64).
"""

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

# ----------------------------------------------------------------------------
# The tangents (pure functions; None is a zero tangent)


def group_norm_tangent(x, mean, rstd, num_groups, weight, dx):
    """Tangent of y = γ·x̂ + β along dx, x̂ = (x − μ)·r per (sample, group), r = 1/√(var + ε).

    dx̂ = r·(dx − mean(dx) − x̂·mean(dx·x̂)) over each group (the mean and the
    variance move with x), dy = γ·dx̂. ``mean``/``rstd`` [N, G] are
    the primal's statistics; γ (``weight``, or None) is a constant. Written as a
    few whole-tensor passes: with y = x − μ, γ·dx̂ = γr·(dx − mean(dx)) − γr³·mean(dx·y)·y.
    """
    n, c = x.shape[:2]
    per_group = c // num_groups
    shape = (n, num_groups, per_group, -1)  # [N, G, C/G, spatial]
    centred = x.reshape(shape) - mean.reshape(n, num_groups, 1, 1)
    r = rstd.reshape(n, num_groups, 1, 1)
    d = dx.reshape(shape)
    a = d.mean(dim=(2, 3), keepdim=True)
    m = torch.linalg.vecdot(d.flatten(2), centred.flatten(2)).reshape(n, num_groups, 1, 1) / d[0, 0].numel()
    scale = r if weight is None else r * weight.reshape(1, num_groups, per_group, 1)  # γr [N, G, C/G, 1]
    return (d - a).mul_(scale).addcmul_(centred, -scale * r * r * m).reshape(x.shape)


# ----------------------------------------------------------------------------
# Routing: primal and tangent of a dual input computed directly (make_dual of the two)


def _tangent(t):
    """The tangent of ``t`` at the current forward-AD level (None: a constant)."""
    return fwAD.unpack_dual(t).tangent if isinstance(t, torch.Tensor) else None


def _primal(t):
    return fwAD.unpack_dual(t).primal if isinstance(t, torch.Tensor) else t


def _layer_applies(tensors):
    tensors = [t for t in tensors if t is not None]
    dtype, device = tensors[0].dtype, tensors[0].device
    if dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled(device.type):
        return False
    return all(t.dtype == dtype and t.device == device for t in tensors)


def _arg(args, kwargs, index, name, default=None):
    return args[index] if len(args) > index else kwargs.get(name, default)


def _layer(func, args, kwargs):
    """A convolution or linear layer with constant parameters: y = op(x, W, b), dy = op(dx, W) (no bias)."""
    x, weight = args[0], _arg(args, kwargs, 1, "weight")
    bias = _arg(args, kwargs, 2, "bias")
    dx = _tangent(x)
    if dx is None or _tangent(weight) is not None or _tangent(bias) is not None or not _layer_applies([x, weight, bias]):
        return None
    rest, options = args[3:], {k: v for k, v in kwargs.items() if k not in ("input", "weight", "bias")}
    x = _primal(x)
    out = func(x, weight, bias, *rest, **options)
    return fwAD.make_dual(out, func(dx, weight, None, *rest, **options))


def _group_norm(func, args, kwargs):
    x, num_groups = args[0], _arg(args, kwargs, 1, "num_groups")
    weight, bias = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    eps = _arg(args, kwargs, 4, "eps", 1e-5)
    dx = _tangent(x)
    if (dx is None or _tangent(weight) is not None or _tangent(bias) is not None or x.ndim < 2
            or x.shape[1] % num_groups or not _layer_applies([x, weight, bias])):
        return None
    x = _primal(x)
    n, c = x.shape[:2]
    out, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, x[0, 0].numel(), num_groups, eps)
    return fwAD.make_dual(out, group_norm_tangent(x, mean, rstd, num_groups, weight, dx))


def _elementwise(func, args, kwargs):
    """add/sub/mul/div of a dual tensor and a constant (number or tensor without tangent)."""
    if kwargs or len(args) != 2:
        return None
    a, b = args
    da, db = _tangent(a), _tangent(b)
    if not isinstance(a, torch.Tensor) or (da is None) == (db is None):
        return None
    pa, pb = _primal(a), _primal(b)
    out = func(pa, pb)
    if func in (torch.Tensor.mul, torch.mul):
        tangent = da * pb if da is not None else pa * db
    elif func in (torch.Tensor.div, torch.div):
        if da is None:
            return None
        tangent = da / pb
    else:  # add/sub: the dual operand's tangent, copied (an in-place op on the output must not change it)
        tangent = da.clone() if da is not None else (db.clone() if func in (torch.Tensor.add, torch.add) else -db)
    if tangent.shape != out.shape:
        return None
    return fwAD.make_dual(out, tangent.to(out.dtype))


_RULES = {
    F.conv1d: _layer, F.conv2d: _layer, F.conv_transpose2d: _layer, F.linear: _layer, F.group_norm: _group_norm,
    **{f: _elementwise for f in (torch.Tensor.add, torch.Tensor.sub, torch.Tensor.mul, torch.Tensor.div,
                                 torch.add, torch.sub, torch.mul, torch.div)},
}


class _ForwardRules(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = _RULES.get(func)
        out = None if rule is None or not args or torch.is_grad_enabled() else rule(func, args, kwargs)
        return func(*args, **kwargs) if out is None else out


def forward_rules():
    """Context: the calls above take the closed-form rules (inside a `torch.autograd.forward_ad.dual_level`)."""
    return _ForwardRules()


def forward_jvp(fn, primals, tangents):
    """(fn(*primals), its tangent along ``tangents``) by `torch.autograd.forward_ad` with the rules above.

    As `torch.func.jvp` for a function of tensors returning a tensor or a
    (nested) tuple/list of them; an output independent of the inputs gets a zero tangent.
    """
    with fwAD.dual_level(), forward_rules():
        out = fn(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
        flat, spec = tree_flatten(out)
        pairs = [fwAD.unpack_dual(o) for o in flat]
    primal = [p.primal for p in pairs]
    tangent = [torch.zeros_like(p.primal) if p.tangent is None else p.tangent for p in pairs]
    return spec.unflatten(primal), spec.unflatten(tangent)
