"""The TrigFlow view of our EDM-scaled networks and sCM's log-variance head."""

import pytest
import torch

from cm.checkpoint import load_model_state
from cm.karras_diffusion import KarrasDenoiser
from cm.nn import timestep_embedding
from cm.song_unet import song_unet_from_flags
from cm.trigflow import attach_logvar_head, has_logvar_head, logvar, trigflow_F, trigflow_point, trigflow_time
from cm.unet import UNetModel


def _network(arch):
    torch.manual_seed(0)
    if arch == "adm":
        net = UNetModel(8, 3, 32, 3, 1, (2,), channel_mult=(1, 2), num_head_channels=8)
    else:
        net = song_unet_from_flags(arch, 8, num_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                   attention_resolutions=(4,), dropout=0.0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


@pytest.mark.parametrize("arch", ["adm", "ddpmpp", "ncsnpp"])
def test_F_is_the_edm_denoiser_in_trigflow_coordinates(arch):
    """F(x̂, t̂) = (cos t̂·x̂ − D(x̂/cos t̂; σ_d tan t̂))/(σ_d sin t̂) with the denoiser sampling uses."""
    net = _network(arch)
    diffusion = KarrasDenoiser(sigma_data=0.5, distillation=False, loss_norm="l2")
    sigma = torch.tensor([0.01, 0.3, 2.0, 79.0], dtype=torch.float64)
    t_hat = trigflow_time(sigma)
    g = torch.Generator().manual_seed(0)
    x0, z = torch.randn(4, 3, 8, 8, generator=g).clamp(-1, 1), 0.5 * torch.randn(4, 3, 8, 8, generator=g)
    x_hat = trigflow_point(x0, z, t_hat)
    c, s = (f(t_hat)[:, None, None, None] for f in (torch.cos, torch.sin))
    with torch.no_grad():
        F = trigflow_F(net, x_hat, t_hat)
        _, D = diffusion.denoise(net, (x_hat.double() / c).float(), sigma.float())
        long_form = (c * x_hat.double() - D.double()) / (0.5 * s)
        x0_pred = c * x_hat.double() - 0.5 * s * F.double()  # the consistency function f(x̂, t̂)
    assert (F.double() - long_form).abs().max() < 2e-3 * long_form.abs().max()
    assert (x0_pred - D.double()).abs().max() < 1e-4


def test_logvar_head_reads_the_features_before_songunets_swap():
    net = attach_logvar_head(_network("ddpmpp"))
    with torch.no_grad():
        net.logvar_linear.weight.normal_()
        net.logvar_linear.bias.fill_(0.3)
    t_hat = torch.tensor([0.1, 1.0], dtype=torch.float64)
    c_noise = (0.25 * torch.log(0.5 * torch.tan(t_hat))).float()
    freqs = (1 / 10000) ** (torch.arange(8, dtype=torch.float32) / 7)
    arg = torch.outer(c_noise, freqs)
    features = torch.cat([arg.cos(), arg.sin()], dim=1)  # cos half first: before the swap
    want = features @ net.logvar_linear.weight[0] + 0.3
    assert torch.allclose(logvar(net, t_hat), want, atol=1e-5)


def test_adm_logvar_head_reads_its_timestep_embedding():
    net = attach_logvar_head(_network("adm"))
    with torch.no_grad():
        net.logvar_linear.weight.normal_()
    t_hat = torch.tensor([0.1, 1.0], dtype=torch.float64)
    features = timestep_embedding((250 * torch.log(0.5 * torch.tan(t_hat))).float(), 32)
    assert torch.allclose(logvar(net, t_hat), features @ net.logvar_linear.weight[0], atol=1e-5)


def test_head_is_zero_at_start_and_only_where_attached():
    net = _network("adm")
    plain_keys = set(net.state_dict())
    assert not has_logvar_head(net)
    attach_logvar_head(net)
    assert has_logvar_head(net) and has_logvar_head(net.state_dict())
    assert set(net.state_dict()) - plain_keys == {"logvar_linear.weight", "logvar_linear.bias"}
    assert torch.equal(logvar(net, torch.tensor([0.5], dtype=torch.float64)), torch.zeros(1))


@pytest.mark.parametrize("arch", ["adm", "ddpmpp"])
def test_a_checkpoint_with_the_head_gives_the_model_the_head(arch):
    """An sCM state loads strictly into a network built without the head; a plain state adds none."""
    trained = attach_logvar_head(_network(arch))
    with torch.no_grad():
        trained.logvar_linear.bias.fill_(1.5)
    fresh = _network(arch)
    load_model_state(fresh, {f"module.{k}": v for k, v in trained.state_dict().items()}, "sct.pt")
    assert has_logvar_head(fresh) and float(fresh.logvar_linear.bias.detach()) == 1.5
    plain = _network(arch)
    load_model_state(plain, _network(arch).state_dict(), "edm.pt")
    assert not has_logvar_head(plain)
