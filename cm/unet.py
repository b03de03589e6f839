"""The ADM UNet (Dhariwal & Nichol) as used by consistency models.

Module names, nesting and parameter shapes are part of the checkpoint format:
the original's checkpoints load here with ``strict=True`` and ours load there.
"""

from abc import abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fp16_util import convert_module_to_f16, convert_module_to_f32
from .nn import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x, emb):
        """Apply the module to `x` given the embedding `emb`."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequential container that hands the embedding to the children that take it."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour ×2 upsampling, optionally followed by a 3×3 conv."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        assert x.shape[1] == self.channels
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """×2 downsampling: a stride-2 3×3 conv, or 2×2 average pooling."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            assert self.channels == self.out_channels
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally resampling."""

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_conv=False,
        use_scale_shift_norm=False,
        dims=2,
        use_checkpoint=False,
        up=False,
        down=False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )

        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )

        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x, emb):
        if self.updown:
            # resample between the norm/activation and the conv, on both paths
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out[(...,) + (None,) * (h.ndim - emb_out.ndim)]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttention(nn.Module):
    """Multi-head self-attention on a packed qkv tensor.

    Channel layout of qkv (part of the checkpoint format): (q | k | v) outermost,
    then head, then the head's channels. Computed in the input's dtype with
    ``scaled_dot_product_attention`` (scale 1/√head_dim).
    """

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        bs, width, length = qkv.shape
        assert width % (3 * self.n_heads) == 0
        ch = width // (3 * self.n_heads)
        # [B, 3, H, D, L] -> three tensors [B, H, L, D]
        q, k, v = qkv.reshape(bs, 3, self.n_heads, ch, length).transpose(-1, -2).unbind(1)
        if qkv.dtype == torch.bfloat16 and qkv.device.type == "cpu":
            out = _bf16_cpu_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(-1, -2).reshape(bs, self.n_heads * ch, length)


def _bf16_cpu_attention(q, k, v):
    """softmax(q kᵀ/√d) v with bfloat16 products and a float32 softmax (bf16 autocast on a CPU).

    torch's CPU attention kernels take these strided views through their
    generic path, whose bfloat16 softmax and its backward are slow; here the
    two products run in bfloat16 and the softmax in float32 (2–3x faster for
    a training step's attention at 16x16 on this project's CPU).
    """
    weights = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
    return torch.matmul(weights.float().softmax(dim=-1).to(v.dtype), v)


# The original has two classes whose layouts coincide in its consistency-models
# release; both names are kept for code that imports them.
QKVAttentionLegacy = QKVAttention


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection."""

    def __init__(
        self,
        channels,
        num_heads=1,
        num_head_channels=-1,
        use_checkpoint=False,
        use_new_attention_order=False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels != 0:
                raise ValueError(
                    f"channels {channels} are not divisible by num_head_channels {num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        # use_new_attention_order is accepted and, as in the original release,
        # does not change the qkv layout.
        self.norm = normalization(channels)
        self.qkv = conv_nd(2, channels, channels * 3, 1)
        self.attention = QKVAttention(self.num_heads)
        self.proj_out = zero_module(conv_nd(2, channels, channels, 1))

    def forward(self, x):
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x):
        b, c, *spatial = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3 * c, -1)
        h = self.attention(qkv).reshape(b, c, *spatial)
        return x + self.proj_out(h)


class UNetModel(nn.Module):
    """The full UNet with timestep (and optional class) conditioning.

    :param attention_resolutions: downsample factors (1, 2, 4, …) at which to
        put attention, e.g. ``(2,)`` for 16 px in a 32 px model.
    :param num_classes: if given, the model is class-conditional with that many classes.
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def res_block(ch_in, ch_out, **kw):
            return ResBlock(
                ch_in,
                time_embed_dim,
                dropout,
                out_channels=ch_out,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                **kw,
            )

        def attention(ch, heads):
            return AttentionBlock(
                ch,
                num_heads=heads,
                num_head_channels=num_head_channels,
                use_checkpoint=use_checkpoint,
                use_new_attention_order=use_new_attention_order,
            )

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))]
        )
        skip_chans = [ch]
        self.feature_blocks = []  # input_blocks index of each level's last block (feature taps)
        ds = 1
        # encoder: num_res_blocks residual blocks per level, then a downsampler
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            self.feature_blocks.append(len(self.input_blocks) - 1)
            if level != len(channel_mult) - 1:
                if resblock_updown:
                    down = res_block(ch, ch, down=True)
                else:
                    down = Downsample(ch, conv_resample, dims=dims, out_channels=ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch),
            attention(ch, num_heads),
            res_block(ch, ch),
        )

        # decoder: num_res_blocks + 1 blocks per level on the concatenated skip
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                skip_ch = skip_chans.pop()
                layers = [res_block(ch + skip_ch, int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    if resblock_updown:
                        layers.append(res_block(ch, ch, up=True))
                    else:
                        layers.append(Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1)),
        )

    def convert_to_fp16(self):
        """Cast the torso (encoder, middle, decoder) to float16."""
        self.input_blocks.apply(convert_module_to_f16)
        self.middle_block.apply(convert_module_to_f16)
        self.output_blocks.apply(convert_module_to_f16)

    def convert_to_fp32(self):
        """Cast the torso back to float32."""
        self.input_blocks.apply(convert_module_to_f32)
        self.middle_block.apply(convert_module_to_f32)
        self.output_blocks.apply(convert_module_to_f32)

    def forward(self, x, timesteps, y=None, return_features=False):
        """Apply the model to an NCHW batch.

        :param timesteps: a 1-D batch of (real-valued) time inputs, 250·ln σ.
        :param y: an [N] tensor of labels, if class-conditional.
        :param return_features: also return the encoder features, a list with the
            output of each resolution level's last block (highest resolution first;
            the last one is the bottleneck, the input of the middle block).
        """
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass y if and only if the model is class-conditional")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
            emb = emb + self.label_emb(y)

        skips = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        features = [skips[i] for i in self.feature_blocks]
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
        out = self.out(h.type(x.dtype))
        return (out, features) if return_features else out
