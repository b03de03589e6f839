"""EDM's DDPM++ / NCSN++ network (`SongUNet`, Karras et al. 2022, Appendix F.2).

Module and parameter names follow EDM's, so an `EDMPrecond` state_dict with its
``model.`` prefix removed loads here with ``strict=True``. The network is called
like `UNetModel`: ``model(x, timesteps, y=None)`` with the KarrasDenoiser time
input ``timesteps = 250·ln σ`` and integer class labels; it converts them to
EDM's ``c_noise = ln(σ)/4`` and one-hot vectors inside.

Facts: ../shared/spec/EDM_NETWORKS.md. Our own code, written from those facts.
"""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# The two published configurations (EDM train.py --arch ddpmpp / ncsnpp).
ARCH_CONFIGS = {
    "ddpmpp": dict(
        embedding_type="positional",
        encoder_type="standard",
        decoder_type="standard",
        channel_mult_noise=1,
        resample_filter=(1, 1),
    ),
    "ncsnpp": dict(
        embedding_type="fourier",
        encoder_type="residual",
        decoder_type="standard",
        channel_mult_noise=2,
        resample_filter=(1, 3, 3, 1),
    ),
}


# --- initialisation (EDM: xavier_uniform scaled by init_weight, zero bias) -----
def _xavier_uniform_(tensor, fan_in, fan_out, gain):
    bound = gain * math.sqrt(6 / (fan_in + fan_out))
    with torch.no_grad():
        tensor.uniform_(-bound, bound)
    return tensor


def _separable_filter(taps):
    """f⊗f / (Σf)², shaped 1×1×k×k."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return (torch.outer(f, f) / f.sum() ** 2)[None, None]


class Linear(nn.Module):
    """Fully connected layer with EDM's parameter names and initialisation."""

    def __init__(self, in_features, out_features, bias=True, init_weight=1.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(
            _xavier_uniform_(torch.empty(out_features, in_features), in_features, out_features, init_weight)
        )
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), b)


class Conv2d(nn.Module):
    """Convolution with optional 2× up/down-sampling by a separable FIR filter.

    ``kernel=0`` is a pure resampling layer (no weights). ``fused_resample``
    (down only, as NCSN++'s ``aux_residual``) convolves first, then filters.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel,
        bias=True,
        up=False,
        down=False,
        resample_filter=(1, 1),
        fused_resample=False,
        init_weight=1.0,
    ):
        assert not (up and down)
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
        self.weight = None
        self.bias = None
        if kernel:
            w = torch.empty(out_channels, in_channels, kernel, kernel)
            self.weight = nn.Parameter(_xavier_uniform_(w, fan_in, fan_out, init_weight))
            if bias:
                self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("resample_filter", _separable_filter(resample_filter) if up or down else None)

    def forward(self, x):
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(
                    x, (4 * f).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad
                )
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.GroupNorm):
    """GroupNorm with groups = min(32, C // 4) and eps 1e-6, in the input's dtype."""

    def __init__(self, num_channels, eps=1e-6):
        super().__init__(min(32, num_channels // 4), num_channels, eps=eps)

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class PositionalEmbedding(nn.Module):
    """DDPM++ sinusoidal features [cos(c·f), sin(c·f)], f_j = 10⁻⁴^(j/(n/2−1))."""

    def __init__(self, num_channels, max_positions=10000):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions

    def forward(self, c):
        half = self.num_channels // 2
        freqs = (1 / self.max_positions) ** (torch.arange(half, dtype=torch.float32, device=c.device) / (half - 1))
        arg = torch.outer(c, freqs.to(c.dtype))
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """NCSN++ random Fourier features [cos(2π·c·f), sin(2π·c·f)], f ~ N(0, 16²) stored."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, c):
        arg = torch.outer(c, (2 * np.pi * self.freqs).to(c.dtype))
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class UNetBlock(nn.Module):
    """Residual block (DDPM++/NCSN++ settings) with optional 1-head self-attention."""

    def __init__(
        self,
        in_channels,
        out_channels,
        emb_channels,
        up=False,
        down=False,
        attention=False,
        dropout=0.0,
        resample_filter=(1, 1),
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.dropout = dropout
        resample = dict(up=up, down=down, resample_filter=resample_filter)
        self.norm0 = GroupNorm(in_channels)
        self.conv0 = Conv2d(in_channels, out_channels, 3, **resample)
        self.affine = Linear(emb_channels, out_channels)
        self.norm1 = GroupNorm(out_channels)
        self.conv1 = Conv2d(out_channels, out_channels, 3, init_weight=1e-5)
        self.skip = None
        if out_channels != in_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, 1, **resample)
        self.attention = attention
        if attention:
            self.norm2 = GroupNorm(out_channels)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, init_weight=math.sqrt(0.2))
            self.proj = Conv2d(out_channels, out_channels, 1, init_weight=1e-5)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        h = F.silu(self.norm1(h + self.affine(emb).to(h.dtype)[:, :, None, None]))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + (self.skip(x) if self.skip is not None else x)) * math.sqrt(0.5)
        if self.attention:
            x = (self._attend(x) + x) * math.sqrt(0.5)
        return x

    def _attend(self, x):
        n, c, height, width = x.shape
        # qkv channels are laid out (C, 3): channel c of q, k, v is output 3c, 3c+1, 3c+2
        q, k, v = self.qkv(self.norm2(x)).reshape(n, c, 3, height * width).unbind(2)
        w = torch.einsum("ncq,nck->nqk", q.float(), k.float() / math.sqrt(c)).softmax(dim=2).to(q.dtype)
        a = torch.einsum("nqk,nck->ncq", w, v)
        return self.proj(a.reshape(n, c, height, width))


class SongUNet(nn.Module):
    """DDPM++ / NCSN++ UNet of EDM with EDM's module names.

    :param timesteps: (forward) 250·ln σ, as KarrasDenoiser passes; c_noise = t/1000.
    :param y: (forward) integer labels [N] (or one-hot [N, label_dim]) when label_dim > 0.
    """

    def __init__(
        self,
        img_resolution,
        in_channels=3,
        out_channels=3,
        label_dim=0,
        augment_dim=0,
        model_channels=128,
        channel_mult=(1, 2, 2, 2),
        channel_mult_emb=4,
        num_blocks=4,
        attn_resolutions=(16,),
        dropout=0.10,
        label_dropout=0.0,
        embedding_type="positional",
        channel_mult_noise=1,
        encoder_type="standard",
        decoder_type="standard",
        resample_filter=(1, 1),
        use_fp16=False,
    ):
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"embedding_type must be positional or fourier, got {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type must be standard, skip or residual, got {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be standard or skip, got {decoder_type!r}")
        super().__init__()
        self.img_resolution = img_resolution
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = label_dropout
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.feature_suffix = f"_block{num_blocks - 1}"  # feature taps: each level's last block
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        block = dict(emb_channels=emb_channels, dropout=dropout, resample_filter=resample_filter)

        # Mapping network: noise (+ label, + augment) features -> emb
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)

        # Encoder
        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, 3)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(
                        caux, caux, 0, down=True, resample_filter=resample_filter
                    )
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux, cout, 3, down=True, resample_filter=resample_filter, fused_resample=True
                    )
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                attn = res in attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
        skips = [m.out_channels for name, m in self.enc.items() if "aux" not in name]

        # Decoder
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(
                        out_channels, out_channels, 0, up=True, resample_filter=resample_filter
                    )
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, init_weight=1e-5)

    # --- mixed precision (the torso; the mapping network stays float32) -----
    def convert_to_fp16(self):
        """Cast encoder/decoder weights to float16 and compute the torso in float16."""
        self.enc.half()
        self.dec.half()
        self.dtype = torch.float16

    def convert_to_fp32(self):
        self.enc.float()
        self.dec.float()
        self.dtype = torch.float32

    def embed(self, c_noise, class_labels=None, augment_labels=None):
        """The mapping network: emb from c_noise, one-hot labels and augment labels."""
        emb = self.map_noise(c_noise)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # sin half first
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([labels.shape[0], 1], device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def one_hot(self, y, batch, device):
        """Integer labels -> float one-hot [N, label_dim]; None -> zeros (EDM's default)."""
        if self.label_dim == 0:
            if y is not None:
                raise ValueError("pass y only to a class-conditional model (label_dim > 0)")
            return None
        if y is None:
            return torch.zeros(batch, self.label_dim, device=device)
        if y.ndim == 2:
            return y.float()
        if y.shape != (batch,):
            raise ValueError(f"y must have shape ({batch},), got {tuple(y.shape)}")
        return F.one_hot(y.long(), self.label_dim).float()

    def forward_edm(self, x, c_noise, class_labels=None, augment_labels=None, return_features=False):
        """EDM's own calling convention: F(x, c_noise = ln(σ)/4, one-hot labels).

        ``return_features``: also return the encoder features, the outputs of each
        resolution level's last block ``{res}x{res}_block{num_blocks-1}``
        (highest resolution first; the last one is the bottleneck).
        """
        features = []
        emb = self.embed(c_noise.float().reshape(-1), class_labels, augment_labels)
        out_dtype = x.dtype
        x = x.to(self.dtype)
        skips = []
        aux = x
        for name, m in self.enc.items():
            if "aux_down" in name:
                aux = m(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + m(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + m(aux)) / math.sqrt(2)
            elif isinstance(m, UNetBlock):
                x = m(x, emb)
                skips.append(x)
                if name.endswith(self.feature_suffix):
                    features.append(x)
            else:
                x = m(x)
                skips.append(x)
        aux = None
        tmp = None
        for name, m in self.dec.items():
            if "aux_up" in name:
                aux = m(aux)
            elif "aux_norm" in name:
                tmp = m(x)
            elif "aux_conv" in name:
                tmp = m(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != m.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = m(x, emb)
        out = aux.to(out_dtype)
        return (out, features) if return_features else out

    def forward(self, x, timesteps, y=None, augment_labels=None, return_features=False):
        """Apply to an NCHW batch; ``timesteps`` = 250·ln σ, ``y`` integer labels."""
        c_noise = timesteps.to(torch.float32) / 1000  # ln(σ)/4
        labels = self.one_hot(y, x.shape[0], x.device)
        return self.forward_edm(x, c_noise, labels, augment_labels, return_features)


def song_unet_from_flags(
    arch,
    image_size,
    num_channels=128,
    channel_mult=(2, 2, 2),
    num_res_blocks=4,
    attention_resolutions=(16,),
    dropout=0.13,
    class_cond=False,
    augment_dim=0,
    label_dropout=0.0,
    use_fp16=False,
    num_classes=10,
):
    """A DDPM++ (``arch='ddpmpp'``) or NCSN++ (``'ncsnpp'``) network from script-style values."""
    if arch not in ARCH_CONFIGS:
        raise ValueError(f"--arch must be one of adm, {', '.join(ARCH_CONFIGS)}, got {arch!r}")
    return SongUNet(
        img_resolution=image_size,
        label_dim=num_classes if class_cond else 0,
        augment_dim=augment_dim,
        model_channels=num_channels,
        channel_mult=tuple(channel_mult),
        num_blocks=num_res_blocks,
        attn_resolutions=tuple(attention_resolutions),
        dropout=dropout,
        label_dropout=label_dropout,
        use_fp16=use_fp16,
        **ARCH_CONFIGS[arch],
    )
