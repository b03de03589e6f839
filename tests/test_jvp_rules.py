"""The closed-form forward-mode rules (cm.jvp_rules): against torch's own rules and finite differences."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import profile

from cm.jvp_rules import forward_jvp, group_norm_tangent

F64 = torch.float64


def _torch_jvp(fn, x, v):
    with torch.no_grad():
        return torch.func.jvp(fn, (x,), (v,))


def _ours(fn, x, v):
    with torch.no_grad():
        return forward_jvp(fn, (x,), (v,))


def _close(a, b, rtol=1e-12):
    assert a.shape == b.shape and a.dtype == b.dtype
    scale = b.abs().max().clamp_min(1e-30)
    assert ((a - b).abs().max() / scale).item() <= rtol


def _layers():
    torch.manual_seed(0)
    affine = nn.GroupNorm(4, 8)
    nn.init.normal_(affine.weight)
    nn.init.normal_(affine.bias)
    const = torch.randn(8, 1, 1, dtype=F64)
    return {
        "conv2d": (nn.Conv2d(8, 6, 3, padding=1), (2, 8, 5, 5)),
        "conv2d_strided_groups": (nn.Conv2d(8, 4, 3, stride=2, groups=2, bias=False), (2, 8, 7, 7)),
        "conv1d": (nn.Conv1d(8, 24, 1), (2, 8, 9)),
        "conv_transpose2d": (nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1), (2, 8, 4, 4)),
        "linear": (nn.Linear(8, 6), (3, 8)),
        "group_norm": (affine, (2, 8, 5, 5)),
        "group_norm_no_affine_1d": (nn.GroupNorm(2, 8, affine=False), (2, 8, 3)),
        "group_norm_no_spatial": (nn.GroupNorm(4, 8), (3, 8)),
        "elementwise": (lambda a: (1 + a) * 2 - a / 3 + const * a - const + 2 * (const - a), (2, 8, 3, 3)),
        "elementwise_torch": (lambda a: torch.add(torch.mul(a, const), 1.5).div(const), (2, 8, 3, 3)),
    }


@pytest.mark.parametrize("name", list(_layers()))
def test_rule_is_torchs_rule_in_float64(name):
    """Primal and tangent of each rule = torch.func.jvp of the plain op (float64, to rounding)."""
    fn, shape = _layers()[name]
    if isinstance(fn, nn.Module):
        fn = fn.double()
    g = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(shape, generator=g, dtype=F64) + 2  # a mean well off zero: the centred form matters
    v = torch.randn(shape, generator=g, dtype=F64)
    (out, tangent), (ref_out, ref_tangent) = _ours(fn, x, v), _torch_jvp(fn, x, v)
    _close(out, ref_out, 0.0 if "group_norm" not in name else 1e-14)
    _close(tangent, ref_tangent)


@pytest.mark.parametrize("weight", [False, True])
def test_group_norm_tangent_matches_central_differences(weight):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 12, 4, 4, generator=g, dtype=F64) * 2 + 5
    dx = torch.randn(x.shape, generator=g, dtype=F64)
    gamma = torch.randn(12, generator=g, dtype=F64) if weight else None
    beta = torch.randn(12, generator=g, dtype=F64) if weight else None
    _, mean, rstd = torch.native_group_norm(x, gamma, beta, 2, 12, 16, 3, 1e-5)
    eps = 1e-6
    fd = (F.group_norm(x + eps * dx, 3, gamma, beta) - F.group_norm(x - eps * dx, 3, gamma, beta)) / (2 * eps)
    _close(group_norm_tangent(x, mean, rstd, 3, gamma, dx), fd, 1e-8)


def _convolutions(fn, x, v):
    with profile() as prof:
        _ours(fn, x, v)
    return sum(e.count for e in prof.key_averages() if e.key == "aten::convolution")


def test_a_convolutions_jvp_is_two_convolutions():
    """Primal and tangent, nothing for the weight's zero tangent (torch's rule runs three)."""
    conv = nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 6, 6)
    assert _convolutions(conv, x, torch.randn_like(x)) == 2


def test_tangents_of_parameters_keep_torchs_rule():
    """With dual weights (jvp in the parameters) the rules stand aside; the answer is torch's."""
    conv, norm = nn.Conv2d(8, 8, 3, padding=1).double(), nn.GroupNorm(4, 8).double()
    params = {**{"conv." + k: p for k, p in conv.named_parameters()}, **{"norm." + k: p for k, p in norm.named_parameters()}}
    dparams = {k: torch.randn_like(p) for k, p in params.items()}
    x = torch.randn(2, 8, 5, 5, dtype=F64)
    v = torch.randn_like(x)

    def fn(p, a):
        h = F.conv2d(a, p["conv.weight"], p["conv.bias"], padding=1)
        return F.group_norm(h, 4, p["norm.weight"], p["norm.bias"])

    def flat(a, *ps):
        return fn(dict(zip(params, ps)), a)

    primals, tangents = (x, *params.values()), (v, *dparams.values())
    with torch.no_grad():
        out, tangent = forward_jvp(flat, primals, tangents)
        ref = torch.func.jvp(flat, primals, tangents)
    _close(out, ref[0], 0.0)
    _close(tangent, ref[1])


def test_under_bf16_autocast_the_layer_rules_stand_aside():
    """Autocast casts inside the op; the rules do not run there, so the JVP is torch's, bit for bit."""
    lin = nn.Linear(16, 16)
    x = torch.randn(4, 16)
    v = torch.randn_like(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, tangent = _ours(lin, x, v)
        ref_out, ref_tangent = _torch_jvp(lin, x, v)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref_out) and torch.equal(tangent, ref_tangent)


def test_with_gradient_enabled_nothing_is_rerouted():
    conv = nn.Conv2d(2, 2, 1)
    x = torch.randn(1, 2, 3, 3)
    out, tangent = forward_jvp(conv, (x,), (x,))
    ref = _torch_jvp(conv, x, x)
    assert out.requires_grad  # the plain op ran, recording a graph
    assert torch.allclose(tangent, ref[1], rtol=1e-6, atol=1e-7)


def test_outputs_independent_of_the_input_get_a_zero_tangent_and_pytrees_pass():
    x = torch.randn(3, dtype=F64)
    with torch.no_grad():
        (a, (b, c)), (da, (db, dc)) = forward_jvp(lambda t: (t * 2, (torch.ones(2, dtype=F64), t.exp())), (x,), (x,))
    assert torch.equal(db, torch.zeros(2, dtype=F64)) and torch.equal(da, 2 * x)
    assert torch.allclose(dc, x.exp() * x)


def test_an_in_place_op_on_a_rules_output_leaves_the_inputs_tangent():
    x, v = torch.randn(2, 3, dtype=F64), torch.randn(2, 3, dtype=F64)

    def fn(a):
        y = a + 1
        y.mul_(3)  # forward AD updates y's tangent in place
        return a * 1.0, y

    (_, (da, dy)), ref = _ours(fn, x, v), _torch_jvp(fn, x, v)
    assert torch.equal(da, ref[1][0]) and torch.equal(dy, ref[1][1])


def test_channels_last_inputs_give_the_contiguous_answer():
    """(torch's own GroupNorm rule cannot take a channels-last tangent at all.)"""
    torch.manual_seed(3)
    norm, conv = nn.GroupNorm(4, 8).double(), nn.Conv2d(8, 8, 3, padding=1).double()

    def fn(a):
        return conv(norm(a)) + 1

    x, v = torch.randn(2, 8, 5, 5, dtype=F64), torch.randn(2, 8, 5, 5, dtype=F64)
    ref = _torch_jvp(fn, x, v)
    out, tangent = _ours(fn, x.to(memory_format=torch.channels_last), v.to(memory_format=torch.channels_last))
    assert torch.allclose(out, ref[0], rtol=0, atol=1e-13) and torch.allclose(tangent, ref[1], rtol=0, atol=1e-13)
