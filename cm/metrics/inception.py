"""Inception-v3 as used for FID (the TensorFlow 2015-12-05 graph, ported to PyTorch).

The module and parameter names follow pytorch-fid / torchvision's ``Inception3`` so
that pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` loads with
``strict=True``. ``FIDInceptionV3.forward`` returns the 2048-d pool3 features used
for FID and precision/recall, and the 1008 logits used for the Inception Score.

Differences from the ImageNet Inception-v3 (they matter, see
``tests/data/inception_fid_*`` and the golden README):
  * BatchNorm eps is 1e-3;
  * the pool branches of the A, C and first E blocks average with
    ``count_include_pad=False`` (TensorFlow's border handling);
  * the pool branch of the last E block (``Mixed_7c``) is a max pool.
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
)
ENV_VAR = "CM_INCEPTION_PATH"
INPUT_SIZE = 299
NUM_FEATURES = 2048
NUM_LOGITS = 1008


class InceptionWeightsNotFound(FileNotFoundError):
    """The FID Inception weights file is missing; the message says what to download."""


class InceptionWeightsMismatch(ValueError):
    """The file exists but is not the FID Inception state_dict."""


class ConvUnit(nn.Module):
    """Conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU; torchvision calls it BasicConv2d."""

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _same(in_ch, out_ch, kh, kw=None):
    """Stride-1 conv unit that keeps the spatial size (padding k//2 per axis)."""
    kw = kh if kw is None else kw
    return ConvUnit(in_ch, out_ch, (kh, kw), padding=(kh // 2, kw // 2))


def _avg_pool_tf(x):
    # 3x3 average, stride 1; border windows divide by the number of real pixels (TF).
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35 block (Mixed_5b/5c/5d): [1x1, 5x5, double 3x3, pool]."""

    def __init__(self, in_ch, pool_ch):
        super().__init__()
        self.branch1x1 = _same(in_ch, 64, 1)
        self.branch5x5_1 = _same(in_ch, 48, 1)
        self.branch5x5_2 = _same(48, 64, 5)
        self.branch3x3dbl_1 = _same(in_ch, 64, 1)
        self.branch3x3dbl_2 = _same(64, 96, 3)
        self.branch3x3dbl_3 = _same(96, 96, 3)
        self.branch_pool = _same(in_ch, pool_ch, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b5, b3, bp], 1)


class BlockB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): [3x3 s2, double 3x3 s2, max pool]."""

    def __init__(self, in_ch):
        super().__init__()
        self.branch3x3 = ConvUnit(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = _same(in_ch, 64, 1)
        self.branch3x3dbl_2 = _same(64, 96, 3)
        self.branch3x3dbl_3 = ConvUnit(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, 3, stride=2)
        return torch.cat([b3, b3d, bp], 1)


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convs (Mixed_6b-6e): [1x1, 7x7, double 7x7, pool]."""

    def __init__(self, in_ch, c7):
        super().__init__()
        self.branch1x1 = _same(in_ch, 192, 1)
        self.branch7x7_1 = _same(in_ch, c7, 1)
        self.branch7x7_2 = _same(c7, c7, 1, 7)
        self.branch7x7_3 = _same(c7, 192, 7, 1)
        self.branch7x7dbl_1 = _same(in_ch, c7, 1)
        self.branch7x7dbl_2 = _same(c7, c7, 7, 1)
        self.branch7x7dbl_3 = _same(c7, c7, 1, 7)
        self.branch7x7dbl_4 = _same(c7, c7, 7, 1)
        self.branch7x7dbl_5 = _same(c7, 192, 1, 7)
        self.branch_pool = _same(in_ch, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = x
        for name in ("1", "2", "3", "4", "5"):
            b7d = getattr(self, "branch7x7dbl_" + name)(b7d)
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b7, b7d, bp], 1)


class BlockD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): [3x3 s2, 7x7 then 3x3 s2, max pool]."""

    def __init__(self, in_ch):
        super().__init__()
        self.branch3x3_1 = _same(in_ch, 192, 1)
        self.branch3x3_2 = ConvUnit(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _same(in_ch, 192, 1)
        self.branch7x7x3_2 = _same(192, 192, 1, 7)
        self.branch7x7x3_3 = _same(192, 192, 7, 1)
        self.branch7x7x3_4 = ConvUnit(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for name in ("1", "2", "3", "4"):
            b7 = getattr(self, "branch7x7x3_" + name)(b7)
        bp = F.max_pool2d(x, 3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class BlockE(nn.Module):
    """8x8 block with split 1x3/3x1 outputs (Mixed_7b, Mixed_7c).

    ``pool="avg"`` (Mixed_7b): TF-style average pool; ``pool="max"`` (Mixed_7c): max pool,
    a quirk of the TF graph that pytorch-fid reproduces.
    """

    def __init__(self, in_ch, pool):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = _same(in_ch, 320, 1)
        self.branch3x3_1 = _same(in_ch, 384, 1)
        self.branch3x3_2a = _same(384, 384, 1, 3)
        self.branch3x3_2b = _same(384, 384, 3, 1)
        self.branch3x3dbl_1 = _same(in_ch, 448, 1)
        self.branch3x3dbl_2 = _same(448, 384, 3)
        self.branch3x3dbl_3a = _same(384, 384, 1, 3)
        self.branch3x3dbl_3b = _same(384, 384, 3, 1)
        self.branch_pool = _same(in_ch, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        t = self.branch3x3_1(x)
        b3 = [self.branch3x3_2a(t), self.branch3x3_2b(t)]
        t = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = [self.branch3x3dbl_3a(t), self.branch3x3dbl_3b(t)]
        if self.pool == "avg":
            p = _avg_pool_tf(x)
        else:
            p = F.max_pool2d(x, 3, stride=1, padding=1)
        bp = self.branch_pool(p)
        return torch.cat([b1, *b3, *b3d, bp], 1)


def preprocess(images):
    """uint8 (0..255) or float (0..1) NCHW RGB -> float32 NCHW at 299x299 in [-1, 1].

    pytorch-fid's order: /255, bilinear resize (align_corners=False, no antialias), 2x-1.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected NCHW RGB images, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        x = images.float() / 255.0
    elif images.is_floating_point():
        x = images.float()
    else:
        raise ValueError(f"expected uint8 or float images, got {images.dtype}")
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2.0 * x - 1.0


class FIDInceptionV3(nn.Module):
    """Inception-v3 FID network: ``forward(images) -> (pool3 [N, 2048], logits [N, 1008])``.

    ``images``: NCHW RGB, uint8 in 0..255 or float in [0, 1], any size (resized to 299).
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvUnit(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvUnit(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvUnit(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvUnit(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvUnit(80, 192, 3)
        self.Mixed_5b = BlockA(192, pool_ch=32)
        self.Mixed_5c = BlockA(256, pool_ch=64)
        self.Mixed_5d = BlockA(288, pool_ch=64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, c7=128)
        self.Mixed_6c = BlockC(768, c7=160)
        self.Mixed_6d = BlockC(768, c7=160)
        self.Mixed_6e = BlockC(768, c7=192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, pool="avg")
        self.Mixed_7c = BlockE(2048, pool="max")
        self.fc = nn.Linear(NUM_FEATURES, NUM_LOGITS)

    def features(self, x):
        """Preprocessed [N, 3, 299, 299] input in [-1, 1] -> pool3 [N, 2048]."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # 147x147
        x = F.max_pool2d(x, 3, stride=2)  # 73x73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # 71x71
        x = F.max_pool2d(x, 3, stride=2)  # 35x35
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)  # 17x17
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        x = self.Mixed_7a(x)  # 8x8
        x = self.Mixed_7c(self.Mixed_7b(x))
        return x.mean(dim=(2, 3))  # global average pool -> pool3

    def forward(self, images):
        pool3 = self.features(preprocess(images))
        # Dropout (p=0.5) sits before fc in torchvision; it is the identity in eval mode.
        logits = self.fc(pool3)
        return pool3, logits


def resolve_weights_path(path=None):
    """The weights path from the argument, else $CM_INCEPTION_PATH; one-line error if missing."""
    where = "--inception_path" if path else f"${ENV_VAR}"
    path = path or os.environ.get(ENV_VAR) or None
    hint = (
        f"download pytorch-fid's {WEIGHTS_FILENAME} from {WEIGHTS_URL} "
        f"and pass its path with --inception_path (or set {ENV_VAR})"
    )
    if path is None:
        raise InceptionWeightsNotFound(f"FID Inception weights not given: {hint}")
    if not os.path.isfile(path):
        raise InceptionWeightsNotFound(f"FID Inception weights not found at {path!r} (from {where}): {hint}")
    return path


def load_inception(path=None, device="cpu"):
    """The FID Inception in eval mode, weights from ``path`` or $CM_INCEPTION_PATH."""
    path = resolve_weights_path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt/truncated file or not a torch file at all
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InceptionWeightsMismatch(
            f"cannot read FID Inception weights {path!r} ({msg}); expected pytorch-fid's {WEIGHTS_FILENAME}"
        ) from None
    model = FIDInceptionV3()
    check_state_dict(state, model.state_dict(), path)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False)


def check_state_dict(state, expected, path):
    """Raise a one-line InceptionWeightsMismatch naming the first difference."""
    if not isinstance(state, dict):
        raise InceptionWeightsMismatch(
            f"{path!r} holds a {type(state).__name__}, not a state_dict; expected pytorch-fid's {WEIGHTS_FILENAME}"
        )
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {extra[0]!r}"
        raise InceptionWeightsMismatch(
            f"{path!r} is not the FID Inception state_dict ({what}, {len(missing)} missing, "
            f"{len(extra)} unexpected); expected pytorch-fid's {WEIGHTS_FILENAME}"
        )
    for k, v in expected.items():
        if not torch.is_tensor(state[k]) or state[k].shape != v.shape:
            got = tuple(state[k].shape) if torch.is_tensor(state[k]) else type(state[k]).__name__
            raise InceptionWeightsMismatch(
                f"{path!r}: {k} has shape {got}, expected {tuple(v.shape)}; "
                f"expected pytorch-fid's {WEIGHTS_FILENAME}"
            )
