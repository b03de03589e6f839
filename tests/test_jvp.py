"""Forward-mode tangents through our networks (cm.jvp, cm.trigflow): against finite differences."""

import pytest
import torch
import torch.nn.functional as F

from cm.jvp import ForwardADError, central_difference, check_forward_ad, fork_rng, jvp
from cm.song_unet import song_unet_from_flags
from cm.trigflow import trigflow_F, trigflow_fd, trigflow_jvp, trigflow_point
from cm.unet import UNetModel

T_HATS = [0.002, 0.05, 0.4, 1.0, 1.45, 1.55]  # σ from 0.001 to 24 at σ_d = 0.5


def _network(arch, dropout=0.2):
    torch.manual_seed(0)
    if arch == "adm":
        # attention at both resolutions, scale-shift norm, resampling res blocks, gradient checkpointing
        net = UNetModel(
            8, 3, 32, 3, 1, (1, 2), dropout=dropout, channel_mult=(1, 2), num_head_channels=8,
            use_scale_shift_norm=True, resblock_updown=True, use_checkpoint=True,
        )
    else:
        net = song_unet_from_flags(
            arch, 8, num_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8, 4),
            dropout=dropout,
        )
    with torch.no_grad():  # move the zero-initialised output layers off zero
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.train()


def _float64(net):
    net.double()
    net.dtype = torch.float64  # the torso's compute dtype
    return net


@pytest.mark.parametrize("arch", ["adm", "ddpmpp", "ncsnpp"])
def test_jvp_matches_central_differences_in_float64(arch):
    """J by forward-mode AD (cm.jvp) = the FD derivative of F along (cos t̂ sin t̂·v, cos t̂ sin t̂) to 1e-6 relative.

    Dropout 0.2 in training mode: every call here runs under the same mask, so
    this also checks that the JVP pass sees the training pass's mask.
    """
    net = _float64(_network(arch))
    g = torch.Generator().manual_seed(1)
    n = len(T_HATS)
    x_hat = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    v = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    t_hat = torch.tensor(T_HATS, dtype=torch.float64)
    rng = fork_rng("cpu")
    F_ad, J = trigflow_jvp(net, x_hat, t_hat, v, rng=rng)
    cs = torch.cos(t_hat) * torch.sin(t_hat)
    eps = 1e-6

    def at(s):
        return x_hat + (s - t_hat)[:, None, None, None] * v, s

    fd = central_difference(lambda x, s: trigflow_F(net, x, s), at, t_hat, eps * cs, rng=rng)
    with torch.no_grad():
        torch.set_rng_state(rng["cpu"])
        F_plain = trigflow_F(net, x_hat, t_hat)
    fd = fd * cs[:, None, None, None]
    rel = (J - fd).flatten(1).abs().amax(1) / J.flatten(1).abs().amax(1)
    assert rel.max() < 1e-6, rel
    assert torch.allclose(F_ad, F_plain, rtol=0, atol=1e-12)  # same mask, same output


def test_jvp_dropout_mask_is_the_training_pass_mask():
    """Without the restored RNG the JVP's primal differs (another mask); with it, it is the training output."""
    net = _network("ddpmpp", dropout=0.5)
    x_hat = torch.randn(2, 3, 8, 8)
    t_hat = torch.tensor([0.3, 1.2], dtype=torch.float64)
    rng = fork_rng("cpu")
    F_train = trigflow_F(net, x_hat, t_hat)
    F_same, _ = trigflow_jvp(net, x_hat, t_hat, torch.randn_like(x_hat), rng=rng)
    F_other, _ = trigflow_jvp(net, x_hat, t_hat, torch.randn_like(x_hat))
    assert torch.equal(F_same, F_train.detach())
    assert not torch.allclose(F_other, F_train.detach())


def test_jvp_has_no_gradient_and_leaves_training_mode():
    net = _network("adm")
    x_hat = torch.randn(2, 3, 8, 8, requires_grad=True)
    t_hat = torch.tensor([0.3, 1.2], dtype=torch.float64)
    F_out, J = trigflow_jvp(net, x_hat, t_hat, torch.randn_like(x_hat))
    assert not F_out.requires_grad and not J.requires_grad
    assert net.training


def test_finite_difference_variant_estimates_the_sct_tangent():
    """--jvp fd along the conditional path ≈ the AD tangent along dx̂/dt̂ = cos t̂·z − sin t̂·x₀ (float32)."""
    net = _network("ddpmpp", dropout=0.0)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 3, 8, 8, generator=g).clamp(-1, 1)
    z = 0.5 * torch.randn(4, 3, 8, 8, generator=g)
    t_hat = torch.tensor([0.05, 0.4, 1.0, 1.4], dtype=torch.float64)
    x_hat = trigflow_point(x0, z, t_hat)
    c, s = (f(t_hat)[:, None, None, None] for f in (torch.cos, torch.sin))
    dxdt = (c * z.double() - s * x0.double()).float()
    _, J = trigflow_jvp(net, x_hat, t_hat, dxdt)
    J_fd = trigflow_fd(net, lambda u: trigflow_point(x0, z, u), t_hat)
    assert J_fd.dtype == torch.float64
    assert (J_fd - J.double()).abs().max() < 3e-2 * J.abs().max()


class _FusedKernel(torch.autograd.Function):
    """A fused kernel with a backward but no forward-mode rule, as flash-attention's autograd Function."""

    @staticmethod
    def forward(ctx, q):
        ctx.save_for_backward(q)
        return F.scaled_dot_product_attention(q, q, q)

    @staticmethod
    def backward(ctx, grad):
        (q,) = ctx.saved_tensors
        with torch.enable_grad():
            q = q.detach().requires_grad_(True)
            out = F.scaled_dot_product_attention(q, q, q)
        return torch.autograd.grad(out, q, grad)[0]


class _FusedAttention(torch.nn.Module):
    """A network layer that calls a fused attention kernel without a forward-mode rule."""

    def forward(self, x):
        q = x.flatten(2).transpose(1, 2).contiguous()[:, None]
        return _FusedKernel.apply(q)[:, 0].transpose(1, 2).reshape(x.shape)


class _NetWithFusedAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.attn = _FusedAttention()

    def forward(self, x, t):
        return self.attn(self.conv(x)) * t.float()[:, None, None, None]


def test_a_layer_without_forward_ad_is_one_line_naming_it():
    net = _NetWithFusedAttention()
    x, t = torch.randn(2, 3, 8, 8), torch.ones(2)
    with pytest.raises(ForwardADError) as info:
        check_forward_ad(net, (x, t), (x, t), module=net)
    message = str(info.value)
    assert "\n" not in message
    assert "layer attn (_FusedAttention)" in message and "--jvp fd" in message


@pytest.mark.parametrize("arch", ["adm", "ddpmpp"])
def test_our_attention_takes_forward_ad_in_float32(arch):
    """Our attention layers run the JVP (explicit products) where torch's fused kernel has no rule."""
    net = _network(arch, dropout=0.0)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, -300.0])
    out, tangent = jvp(lambda a, b: net(a, b), (x, t), (torch.randn_like(x), torch.ones(2)), module=net)
    assert torch.allclose(out, net(x, t).detach(), atol=1e-5)
    assert torch.isfinite(tangent).all() and tangent.abs().max() > 0
