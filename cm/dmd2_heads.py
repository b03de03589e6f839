"""DMD2's GAN discriminator heads (Yin et al. 2024, §4.3) and the feature taps they read.

A head maps one feature map [B, C, R, R] to one logit per sample: stride-2 4×4
convolutions halve R down to 4, a 4×4/stride-4 convolution takes it to 1×1 (a
R×R one when R < 4), each followed by GroupNorm and SiLU, and a 1×1 convolution
gives the logit. With R = 8 this is the official DMD2 head on the 8×8 bottleneck
of its ImageNet UNet; with R = 16 or 8 it is FastGen's ``Discriminator_EDM`` head
(same layers and module indices, so FastGen's state dict loads).

`FeatureDiscriminator` holds one head per tapped feature and concatenates their
logits to [B, heads]. Two placements use it:
- ``bottleneck``: one head on the trainable fake score's bottleneck (the last
  encoder feature), trained together with that encoder (official DMD2);
- ``teacher``: one head per encoder level of the frozen real score, only the
  heads learn (FastGen's CIFAR-10 DMD2).
`seed_head` is the seed project's head for a 3×32×32 input, kept for its golden
numbers (it reads the fake score's raw output F).
"""

import torch
import torch.nn as nn

GAN_PLACEMENTS = ("bottleneck", "teacher", "raw")


def gn_groups(channels):
    """GroupNorm groups of FastGen's heads: C//4 for C ≤ 32, else the largest divisor ≤ 32."""
    if channels <= 32:
        return max(1, channels // 4)
    return max(g for g in range(1, 33) if channels % g == 0)


def conv_head(channels, resolution):
    """One logit head for a [B, channels, resolution, resolution] feature map."""
    layers, r, c = [], int(resolution), int(channels)
    groups = gn_groups(c)
    while r > 4 and r % 2 == 0:
        layers += [nn.Conv2d(c, c, 4, 2, 1), nn.GroupNorm(groups, c), nn.SiLU()]
        r //= 2
    k = 4 if r == 4 else r
    layers += [nn.Conv2d(c, c, k, k, 0), nn.GroupNorm(groups, c), nn.SiLU(), nn.Conv2d(c, 1, 1)]
    return nn.Sequential(*layers)


def seed_head(in_channels=3, width=768):
    """The seed's `cls_pred_branch` for a 3×32×32 input: 32 → 16 → 4 → 1."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 4, 2, 1),
        nn.GroupNorm(32, width),
        nn.SiLU(),
        nn.Conv2d(width, width, 4, 4, 0),
        nn.GroupNorm(32, width),
        nn.SiLU(),
        nn.Conv2d(width, 1, 4, 1, 0),
    )


class FeatureDiscriminator(nn.Module):
    """Heads on the feature maps ``features[i]`` for i in ``feature_indices``; logits [B, heads].

    :param shapes: (channels, resolution) of every tapped feature, in tap order.
    """

    def __init__(self, shapes, feature_indices):
        super().__init__()
        self.feature_indices = [int(i) for i in feature_indices]
        for i in self.feature_indices:
            if not -len(shapes) <= i < len(shapes):
                raise ValueError(f"feature index {i} out of range for {len(shapes)} taps")
        self.discriminator_heads = nn.ModuleList(
            [conv_head(*shapes[i]) for i in self.feature_indices]
        )

    def forward(self, features):
        logits = [
            head(features[i]).reshape(features[i].shape[0], 1)
            for head, i in zip(self.discriminator_heads, self.feature_indices)
        ]
        return torch.cat(logits, dim=1)


@torch.no_grad()
def feature_shapes(model, image_size, in_channels=3, num_classes=None):
    """(channels, resolution) of each feature tap of `model` (one probe forward pass)."""
    x = torch.zeros(2, in_channels, image_size, image_size, device=_device(model))
    t = torch.zeros(2, device=x.device)
    y = None if not num_classes else torch.zeros(2, dtype=torch.long, device=x.device)
    was_training = model.training
    model.eval()
    _, feats = model(x, t, y, return_features=True)
    model.train(was_training)
    return [(f.shape[1], f.shape[-1]) for f in feats]


def _device(model):
    return next(model.parameters()).device


def build_discriminator(placement, network, image_size, in_channels=3, num_classes=None):
    """The GAN discriminator of a placement: ``bottleneck`` (one head) or ``teacher`` (every level).

    ``network`` is the one whose features the heads read (the fake score or the teacher).
    """
    if placement not in ("bottleneck", "teacher"):
        raise ValueError(f"GAN placement must be bottleneck or teacher, got {placement!r}")
    shapes = feature_shapes(network, image_size, in_channels, num_classes)
    indices = [len(shapes) - 1] if placement == "bottleneck" else list(range(len(shapes)))
    return FeatureDiscriminator(shapes, indices)
