"""The TrigFlow view of an EDM-scaled network (Lu & Song 2024, §2 and §4.1) and sCM's logvar head.

TrigFlow time t̂ = atan2(σ, σ_d) ∈ [0, π/2), x̂ = cos t̂·x₀ + sin t̂·z with
z ~ N(0, σ_d²I), i.e. x̂ = cos t̂·x_σ for the EDM point x_σ = x₀ + σ·n. An EDM
denoiser D gives the TrigFlow network

    F(x̂, t̂) = (cos t̂·x̂ − D(x̂/cos t̂; σ_d tan t̂)) / (σ_d sin t̂),

and with EDM's scalings (c_skip·x cancels cos t̂·x̂, c_out = σ_d sin t̂,
c_in·x̂/cos t̂ = x̂/σ_d) this is identically −F_raw(x̂/σ_d, c_noise(σ_d tan t̂)):
our networks (`--arch adm|ddpmpp|ncsnpp`, NVIDIA's `.pkl`, OpenAI's JAX EDM)
need no change. Conversely a network trained as F is an EDM denoiser, which
is used as a consistency function f(x_σ, σ) = D(x_σ; σ) by the samplers.

The adaptive weight w_φ(t̂) = −logvar(t̂) of sCM is one Linear (``logvar_linear``)
on the network's sinusoidal time features: SongUNet's positional (or Fourier)
embedding of c_noise **before** its sin/cos swap (as FastGen), the ADM UNet's
`timestep_embedding` of 250·ln σ (the analogous point: the parameter-free
features that enter its ``time_embed``). The head is attached only for sCM
runs; its keys in a state_dict are what records that a checkpoint has it.
"""

import torch

from .jvp import central_difference, jvp
from .nn import LOGVAR_HEAD, append_dims, attach_logvar_head, has_logvar_head  # noqa: F401  (re-exported)
from .precond import SIGMA_DATA

TIME_TANGENT = 250.0  # d(250·ln(σ_d tan t̂))/dt̂ · cos t̂ sin t̂ = 250 exactly


def trigflow_time(sigma, sigma_data=SIGMA_DATA):
    """t̂ = atan2(σ, σ_d), float64."""
    return torch.atan2(sigma.double(), torch.tensor(sigma_data, dtype=torch.float64))


def edm_sigma(t_hat, sigma_data=SIGMA_DATA):
    """σ = σ_d·tan t̂."""
    return sigma_data * torch.tan(t_hat.double())


def time_input(t_hat, sigma_data=SIGMA_DATA):
    """The network's time input 250·ln(σ_d tan t̂), float64 (the network casts it)."""
    return 250.0 * torch.log(edm_sigma(t_hat, sigma_data))


def trigflow_point(x0, z, t_hat):
    """x̂ = cos t̂·x₀ + sin t̂·z (float64 arithmetic, in x₀'s dtype)."""
    c, s = (append_dims(f(t_hat.double()), x0.ndim) for f in (torch.cos, torch.sin))
    return (c * x0.double() + s * z.double()).to(x0.dtype)


def trigflow_F(net, x_hat, t_hat, sigma_data=SIGMA_DATA, **model_kwargs):
    """F(x̂, t̂) = −F_raw(x̂/σ_d, 250·ln(σ_d tan t̂)) of an EDM-scaled network ``net(x, timesteps)``."""
    return -net(x_hat / sigma_data, time_input(t_hat, sigma_data), **model_kwargs)


def trigflow_jvp(net, x_hat, t_hat, dxdt, sigma_data=SIGMA_DATA, rng=None, **model_kwargs):
    """(F, J): J = JVP of F at (x̂, t̂) along (cos t̂ sin t̂·dx̂/dt̂, cos t̂ sin t̂), forward-mode, no grad.

    In raw-network terms the tangent is cos t̂ sin t̂·(dx̂/dt̂)/σ_d on the input and
    exactly 250 on the time input. ``net`` is the unwrapped module.
    """
    cs = append_dims(torch.cos(t_hat.double()) * torch.sin(t_hat.double()), x_hat.ndim)
    x_in = x_hat / sigma_data
    t_in = time_input(t_hat, sigma_data)
    x_tan = (cs * dxdt.double() / sigma_data).to(x_in.dtype)
    t_tan = torch.full_like(t_in, TIME_TANGENT)
    out, tangent = jvp(
        lambda x, t: -net(x, t, **model_kwargs), (x_in, t_in), (x_tan, t_tan), module=net, rng=rng,
        device=x_hat.device,
    )
    return out, tangent


def trigflow_fd(net, path, t_hat, sigma_data=SIGMA_DATA, rng=None, rel_eps=1e-3, **model_kwargs):
    """J by central differences: cos t̂ sin t̂·(F(path(t̂ + ε)) − F(path(t̂ − ε)))/(2ε), float64.

    ``path(s)`` is x̂ at TrigFlow time s (float64 tensor [B]); ε = max(10⁻³·|t̂|, 10⁻⁶)
    and t̂ ± ε kept inside ±(π/2 − 10⁻⁵), as FastGen's finite-difference variant.
    """
    t_hat = t_hat.double()
    eps = torch.clamp(rel_eps * t_hat.abs(), min=1e-6)
    limit = torch.pi / 2 - 1e-5

    def at(s):
        s = s.clamp(-limit, limit)
        return path(s), s

    def f(x, s):
        return trigflow_F(net, x, s, sigma_data, **model_kwargs)

    diff = central_difference(f, at, t_hat, eps, rng=rng, device=t_hat.device)
    cs = append_dims(torch.cos(t_hat) * torch.sin(t_hat), diff.ndim)
    return cs * diff


# ----------------------------------------------------------------------------
# The adaptive-weight head (the layer itself: `cm.nn.attach_logvar_head`)


def logvar(net, t_hat, sigma_data=SIGMA_DATA):
    """ℓ(t̂) [B]: the head on the time features of 250·ln(σ_d tan t̂) (the paper's w = −ℓ)."""
    features = net.time_features(time_input(t_hat, sigma_data))
    head = getattr(net, LOGVAR_HEAD)
    return head(features.to(head.weight.dtype)).reshape(-1)
