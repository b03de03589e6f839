"""LPIPS (Zhang et al. 2018) with a VGG16 trunk whose max pools are average pools.

This is the distance the original consistency-models code gets from
``piq.LPIPS(replace_pooling=True, reduction="none")``:

    d(x, y) = sum_l mean_hw( w_l . (f_l(x) - f_l(y))^2 )

where f_l is the VGG16 activation after relu1_2, relu2_2, relu3_3, relu4_3,
relu5_3, unit-normalised over channels (f / (||f||_2 + 1e-10)), and w_l >= 0 are
the LPIPS v0.1 linear heads (1x1 conv, C -> 1, no bias).

No weights ship with this package. ``load_lpips`` reads ONE torch file holding
the torchvision VGG16 ImageNet conv weights (``features.N.weight/bias``) and the
heads (``lin0.weight`` .. ``lin4.weight``); ``scripts/convert_lpips_weights.py``
makes it from the two public files.
"""
import os
import re

import torch
import torch.nn as nn

__all__ = [
    "LPIPS",
    "LPIPSWeightsMissing",
    "LPIPSWeightsError",
    "load_lpips",
    "convert_weights",
    "LPIPS_PATH_ENV",
]

LPIPS_PATH_ENV = "CM_LPIPS_PATH"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EPS = 1e-10  # feature normalisation, as in lpips.normalize_tensor and piq

# torchvision vgg16().features up to relu5_3: ints are 3x3 convs (out channels),
# "P" a 2x2 pool. Each conv is followed by a ReLU, so indices match torchvision's.
VGG16_CFG = (64, 64, "P", 128, 128, "P", 256, 256, 256, "P", 512, 512, 512, "P", 512, 512, 512)
# Indices in `features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
TAP_INDICES = (3, 8, 15, 22, 29)
TAP_CHANNELS = (64, 128, 256, 512, 512)
# Indices in `features` of the 13 convs (torchvision state_dict key numbers).
CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)

VGG16_SOURCE = (
    "torchvision's VGG16 ImageNet weights vgg16-397923af.pth "
    "(https://download.pytorch.org/models/vgg16-397923af.pth)"
)
LIN_SOURCE = "the LPIPS v0.1 VGG heads lpips/weights/v0.1/vgg.pth inside the `lpips` pip package"
CONVERT_COMMAND = (
    "python scripts/convert_lpips_weights.py --vgg16 vgg16-397923af.pth --lin vgg.pth --out lpips_vgg.pt"
)


class LPIPSWeightsMissing(FileNotFoundError):
    """The LPIPS weights file was not given or does not exist."""


class LPIPSWeightsError(ValueError):
    """The LPIPS weights (or converter inputs) have missing, extra or misshapen entries."""


def _make_features():
    layers = []
    in_ch = 3
    for v in VGG16_CFG:
        if v == "P":
            # piq replace_pooling=True: MaxPool2d(2, 2) -> AvgPool2d(2, 2).
            layers.append(nn.AvgPool2d(kernel_size=2, stride=2))
        else:
            layers.append(nn.Conv2d(in_ch, v, kernel_size=3, padding=1))
            layers.append(nn.ReLU())  # not in-place: the tapped activations must survive
            in_ch = v
    return nn.Sequential(*layers)


def _unit_normalise(f):
    """Scale each spatial feature vector to unit L2 norm over channels."""
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS)


class LPIPS(nn.Module):
    """LPIPS-VGG16 (v0.1 heads, average pooling); frozen and always in eval mode.

    Built with random weights; use `load_lpips` for the real ones. The
    state_dict holds `features.N.weight/bias` (torchvision numbering) and
    `lin0.weight` .. `lin4.weight` ([1, C, 1, 1]); mean/std are non-persistent.
    """

    def __init__(self):
        super().__init__()
        self.features = _make_features()
        for k, c in enumerate(TAP_CHANNELS):
            self.add_module(f"lin{k}", nn.Conv2d(c, 1, kernel_size=1, bias=False))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def lins(self):
        return [getattr(self, f"lin{k}") for k in range(len(TAP_CHANNELS))]

    def train(self, mode=True):
        """Always stays in eval mode (the metric is fixed)."""
        return super().train(False)

    def taps(self, x):
        """ImageNet-normalise x in [0,1] and return the five unit-normalised VGG activations."""
        h = (x - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAP_INDICES:
                out.append(_unit_normalise(h))
        return out

    def forward(self, x, y):
        """Per-sample LPIPS distance [N] between x and y, both NCHW RGB in [0, 1].

        No resizing or range mapping happens here: the caller maps [-1,1] images
        to [0,1] and resizes (the original bilinearly upsamples to 224 px when
        smaller than 256). Height and width must be at least 16 (relu5_3 sits
        behind four 2x2 pools). Gradients flow to x and y; the weights are frozen.
        """
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS wants two [N,3,H,W] tensors of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if min(x.shape[-2:]) < 16:
            raise ValueError(f"LPIPS needs images of at least 16x16 pixels, got {tuple(x.shape[-2:])}")
        # x and y go through separately so identical inputs give exactly 0.
        total = 0
        for lin, fx, fy in zip(self.lins, self.taps(x), self.taps(y)):
            total = total + lin((fx - fy) ** 2).mean(dim=(2, 3))
        return total[:, 0]


def _expected_shapes():
    with torch.device("meta"):  # shapes only, no allocation or init cost
        return {k: tuple(v.shape) for k, v in LPIPS().state_dict().items()}


def _check_state(state, what, prefix=""):
    """Raise LPIPSWeightsError naming the first missing, unexpected or misshapen key.

    Only our state_dict keys starting with `prefix` are expected.
    """
    if not isinstance(state, dict):
        raise LPIPSWeightsError(f"{what}: expected a dict of tensors, got {type(state).__name__}")
    expected = {k: v for k, v in _expected_shapes().items() if k.startswith(prefix)}
    for key, shape in expected.items():
        if key not in state:
            raise LPIPSWeightsError(f"{what}: missing key {key!r} (shape {list(shape)})")
        value = state[key]
        if not torch.is_tensor(value):
            raise LPIPSWeightsError(f"{what}: key {key!r} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != shape:
            raise LPIPSWeightsError(f"{what}: key {key!r} has shape {list(value.shape)}, expected {list(shape)}")
    for key in state:
        if key not in expected:
            raise LPIPSWeightsError(f"{what}: unexpected key {key!r}")


def _missing_message(path):
    where = f"LPIPS weights file {path!r} does not exist" if path else (
        f"no LPIPS weights file given (--lpips_path or {LPIPS_PATH_ENV})")
    return (
        f"{where}; it must be one torch file holding the VGG16 ImageNet conv weights and the LPIPS v0.1 "
        f"VGG linear heads, made from {VGG16_SOURCE} and {LIN_SOURCE} with `{CONVERT_COMMAND}`; "
        f"pass it with --lpips_path or the {LPIPS_PATH_ENV} environment variable"
    )


def load_lpips(path=None, device="cpu"):
    """Build LPIPS with real weights from `path`, else $CM_LPIPS_PATH (strict load)."""
    path = path or os.environ.get(LPIPS_PATH_ENV) or None
    if path is None or not os.path.isfile(path):
        raise LPIPSWeightsMissing(_missing_message(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line report
        detail = (str(e).strip().splitlines() or [""])[0]
        raise LPIPSWeightsError(f"cannot read LPIPS weights {path!r}: {type(e).__name__}: {detail}") from None
    _check_state(state, f"LPIPS weights {path!r}")
    model = LPIPS()
    model.load_state_dict(state, strict=True)
    return model.to(device)


# lpips package head keys: "lin0.model.1.weight" (Dropout then Conv2d); also
# accept "lin0.model.0.weight" (saved without dropout) and a bare "lin0.weight".
_LIN_KEY = re.compile(r"^lin([0-9]+)\.(?:model\.[0-9]+\.)?weight$")


def convert_weights(vgg16_state, lin_state):
    """Merge a torchvision VGG16 state_dict and an lpips v0.1 head file into our layout.

    `classifier.*` entries of the VGG16 state_dict are dropped; anything else
    that does not fit raises LPIPSWeightsError naming the key.
    """
    if not isinstance(vgg16_state, dict):
        raise LPIPSWeightsError(f"VGG16 weights: expected a state_dict, got {type(vgg16_state).__name__}")
    if not isinstance(lin_state, dict):
        raise LPIPSWeightsError(f"LPIPS head weights: expected a state_dict, got {type(lin_state).__name__}")
    features = {k: v for k, v in vgg16_state.items() if not k.startswith("classifier.")}
    _check_state(features, "VGG16 weights", prefix="features.")
    heads = {}
    for key, value in lin_state.items():
        m = _LIN_KEY.match(key)
        if m is None:
            raise LPIPSWeightsError(f"LPIPS head weights: unexpected key {key!r} (want lin0..lin4 .model.1.weight)")
        new_key = f"lin{m.group(1)}.weight"
        if new_key in heads:
            raise LPIPSWeightsError(f"LPIPS head weights: two entries for {new_key!r} (second is {key!r})")
        heads[new_key] = value
    _check_state(heads, "LPIPS head weights", prefix="lin")
    out = {**features, **heads}
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}
