"""OpenAI's JAX/Flax NCSN++ parameter tree → EDM ``SongUNet`` state_dict (pure functions).

The Flax NCSN++ of openai/consistency_models_cifar10 (score_sde's ``ncsnpp``
with Fourier embedding, BigGAN residual blocks, residual progressive input)
names its modules by class and creation index. Its forward pass creates
them in this order, which is also the order of EDM's SongUNet modules:

    GaussianFourierProjection_0, Dense_0, Dense_1       map_noise, map_layer0/1
    Conv_0                                              enc.{R}_conv
    per level l: num_blocks × (ResnetBlock [+ AttnBlock]) enc.{r}_block{i}
                 (not last) ResnetBlock(down), Downsample enc.{r/2}_down, enc.{r/2}_aux_residual
    ResnetBlock, AttnBlock, ResnetBlock                 dec.{rmin}_in0, dec.{rmin}_in1
    per level l (reversed): num_blocks+1 × ResnetBlock  dec.{r}_block{i} (attention on the last)
                 [AttnBlock], (l > 0) ResnetBlock(up)   dec.{2r}_up
    GroupNorm_0, Conv_1                                 dec.{R}_aux_norm, dec.{R}_aux_conv

`infer_config` reads nf, ch_mult, blocks per level and the attention levels
from the tree; `ncsnpp_layout` lists, for a config, every SongUNet entry with
its Flax sources and their shapes; `convert_tree` applies it (kernels HWIO →
OIHW, dense (in, out) → (out, in), q/k/v 1×1 layers → one channel-major qkv
conv, Fourier W → the ``freqs`` buffer). Every problem is a one-line
`FlaxFormatError` naming the path inside the tree (names escaped and cut by
`cm.formats.untrusted.safe_text`); counts, depth, levels and candidate layouts are bounded.
"""

import math
import re
from itertools import combinations

import numpy as np

from .flax_msgpack import FlaxFormatError, decode_leaf, is_array, leaf_shape
from .untrusted import MAX_DEPTH, MAX_IMAGE_SIZE, MAX_LAYOUTS

RESNET, ATTN, DOWN = "ResnetBlockBigGANpp", "AttnBlockpp", "Downsample"
SINGLE_MODULES = ("GaussianFourierProjection_0", "Dense_0", "Dense_1", "Conv_0", "Conv_1", "GroupNorm_0")
INDEXED = re.compile(rf"^({RESNET}|{ATTN}|{DOWN})_(\d{{1,6}})$")
MAX_LEVELS = 10  # resolution levels of a network read from a file
FIR_KERNEL = (1, 3, 3, 1)  # the published NCSN++ resampling filter
CIFAR_ATTN_RESOLUTION = 16  # NCSN++ CIFAR-10 configs attend at 16x16


def _join(prefix, *names):
    return "/".join([p for p in (prefix,) if p] + list(names))


def _counts(tree, prefix):
    """Number of modules of each indexed class; checks names and contiguous indices."""
    found = {RESNET: [], ATTN: [], DOWN: []}
    for name in tree:
        m = INDEXED.match(str(name))
        if m:
            found[m.group(1)].append(int(m.group(2)))
        elif name not in SINGLE_MODULES:
            raise FlaxFormatError(f"{_join(prefix, str(name))}: unknown module in an NCSN++ parameter tree")
    for cls, idx in found.items():
        if sorted(idx) != list(range(len(idx))):  # the first index that breaks 0, 1, 2, ...
            missing = next(i for i, j in enumerate(sorted(idx) + [None]) if i != j)
            raise FlaxFormatError(f"{_join(prefix, f'{cls}_{missing}')}: missing (indices must run 0..n-1)")
    for name in SINGLE_MODULES:
        if name not in tree:
            raise FlaxFormatError(f"{_join(prefix, name)}: missing (not an NCSN++ tree with Fourier embedding)")
    return {cls: len(idx) for cls, idx in found.items()}


def _shape(tree, prefix, path):
    """Shape of the leaf at ``path`` ("Module/Sub/leaf") without decoding it."""
    node = tree
    for name in path.split("/"):
        if not isinstance(node, dict) or name not in node:
            raise FlaxFormatError(f"{_join(prefix, path)}: missing")
        node = node[name]
    return leaf_shape(node, _join(prefix, path))


def _attention_from_order(tree, num_levels, num_blocks):
    """Attention levels from the tree's key order when it is Flax's creation order, else None."""
    order = [(m.group(1), int(m.group(2))) for m in map(INDEXED.match, map(str, tree)) if m and m.group(1) != DOWN]
    resnets = [i for cls, i in order if cls == RESNET]
    attns = [i for cls, i in order if cls == ATTN]
    if resnets != sorted(resnets) or attns != sorted(attns) or not attns or order[0][0] == ATTN:
        return None
    if all(cls == ATTN for cls, _ in order[-len(attns) :]):
        return None  # grouped by class (sorted keys): the interleaving is lost
    after = {}  # attention index -> index of the resnet block created just before it
    last = None
    for cls, i in order:
        if cls == RESNET:
            last = i
        else:
            after[i] = last
    levels = set()
    for rb in after.values():
        stage, level = _resnet_role(rb, num_levels, num_blocks)
        if stage in ("enc", "dec"):
            levels.add(level)
    return sorted(levels)


def _resnet_role(index, num_levels, num_blocks):
    """(stage, level) of the ``index``-th residual block: enc/down/mid/dec/up."""
    i = index
    for level in range(num_levels):
        if i < num_blocks:
            return "enc", level
        i -= num_blocks
        if level != num_levels - 1:
            if i == 0:
                return "down", level
            i -= 1
    if i < 2:
        return "mid", num_levels - 1
    i -= 2
    for level in reversed(range(num_levels)):
        if i < num_blocks + 1:
            return "dec", level
        i -= num_blocks + 1
        if level != 0:
            if i == 0:
                return "up", level
            i -= 1
    return None, None


def infer_config(tree, prefix="", image_size=32, attn_resolutions=None):
    """NCSN++ configuration of a Flax parameter tree (module name → leaf name → encoded array).

    ``image_size`` is not in the parameters (32 for CIFAR-10); ``attn_resolutions``
    is needed only when the tree's key order does not tell the attention levels
    and several choices fit the shapes.
    """
    counts = _counts(tree, prefix)
    num_levels = counts[DOWN] + 1
    if num_levels > MAX_LEVELS or not 1 <= image_size <= MAX_IMAGE_SIZE or image_size >> (num_levels - 1) < 1:
        raise FlaxFormatError(f"{_join(prefix, DOWN + '_*')}: {num_levels} resolution levels at image size "
                              f"{image_size} (at most {MAX_LEVELS} levels, image size up to {MAX_IMAGE_SIZE})")
    conv0, conv1 = _shape(tree, prefix, "Conv_0/kernel"), _shape(tree, prefix, "Conv_1/kernel")
    if len(conv0) != 4 or len(conv1) != 4 or 0 in conv0 or 0 in conv1:
        raise FlaxFormatError(f"{_join(prefix, 'Conv_0/kernel')}: shapes {conv0}, {conv1} (non-empty HWIO kernels)")
    in_channels, nf = conv0[-2:]
    out_channels = conv1[-1]
    # residual blocks: L·nb (enc) + (L−1) down + 2 mid + L·(nb+1) dec + (L−1) up
    rest = counts[RESNET] - 2 - 2 * (num_levels - 1) - num_levels
    if rest <= 0 or rest % (2 * num_levels):
        raise FlaxFormatError(
            f"{_join(prefix, RESNET + '_*')}: {counts[RESNET]} residual blocks fit no NCSN++ layout "
            f"with {num_levels} levels"
        )
    num_blocks = rest // (2 * num_levels)
    ch_mult = []
    for level in range(num_levels):
        path = f"{RESNET}_{level * (num_blocks + 1)}/Conv_0/kernel"  # first encoder block of the level
        width = _shape(tree, prefix, path)[-1]
        if width % nf or width < nf:
            raise FlaxFormatError(f"{_join(prefix, path)}: width {width} is not a multiple of nf {nf}")
        ch_mult.append(width // nf)
    # attention blocks: nb per attended level in the encoder, 1 in the middle, 1 per level in the decoder
    if (counts[ATTN] - 1) % (num_blocks + 1) or counts[ATTN] < 1:
        raise FlaxFormatError(f"{_join(prefix, ATTN + '_*')}: {counts[ATTN]} attention blocks fit no NCSN++ layout")
    num_attn_levels = (counts[ATTN] - 1) // (num_blocks + 1)
    if attn_resolutions is not None:
        attn_levels = sorted(lvl for lvl in range(num_levels) if image_size >> lvl in set(attn_resolutions))
    else:
        attn_levels = _attention_from_order(tree, num_levels, num_blocks)
        if attn_levels is None:
            widths = [_shape(tree, prefix, f"{ATTN}_{j}/NIN_3/b")[0] for j in range(counts[ATTN])]
            attn_levels = _attention_from_widths(widths, num_blocks, nf, ch_mult, num_attn_levels, image_size, prefix)
    if len(attn_levels) != num_attn_levels:
        raise FlaxFormatError(
            f"{_join(prefix, ATTN + '_*')}: {counts[ATTN]} attention blocks do not fit attention at levels "
            f"{attn_levels}"
        )
    return dict(
        image_size=image_size,
        in_channels=in_channels,
        out_channels=out_channels,
        nf=nf,
        ch_mult=tuple(ch_mult),
        num_blocks=num_blocks,
        attn_resolutions=tuple(image_size >> lvl for lvl in attn_levels),
    )


def _attention_from_widths(widths, num_blocks, nf, ch_mult, count, image_size, prefix):
    """Attention levels whose widths fit those of the attention blocks; ties go to the CIFAR-10 choice (16x16)."""
    num_levels = len(ch_mult)
    if math.comb(num_levels, count) > MAX_LAYOUTS:
        raise FlaxFormatError(f"{_join(prefix, ATTN + '_*')}: {math.comb(num_levels, count)} candidate attention "
                              f"layouts (at most {MAX_LAYOUTS}); pass attn_resolutions")
    fits = []
    for levels in combinations(range(num_levels), count):
        want = [nf * ch_mult[lvl] for lvl in levels for _ in range(num_blocks)] + [nf * ch_mult[-1]]
        want += [nf * ch_mult[lvl] for lvl in reversed(levels)]
        if want == widths:
            fits.append(list(levels))
    if not fits:
        raise FlaxFormatError(f"{_join(prefix, ATTN + '_*')}: attention widths {widths} fit no NCSN++ layout")
    for levels in fits:
        if [image_size >> lvl for lvl in levels] == [CIFAR_ATTN_RESOLUTION] * count:
            return levels
    if len(fits) > 1:
        raise FlaxFormatError(
            f"{_join(prefix, ATTN + '_*')}: the attention levels are ambiguous in this tree; pass attn_resolutions"
        )
    return fits[0]


def resample_filter(fir_kernel=FIR_KERNEL):
    """EDM's stored resampling filter f⊗f/(Σf)², shape (1, 1, k, k)."""
    f = np.asarray(fir_kernel, dtype=np.float64)
    return (np.outer(f, f) / f.sum() ** 2).astype(np.float32)[None, None]


def ncsnpp_layout(config):
    """Every SongUNet state_dict entry of ``config``, in EDM's order, with its Flax sources.

    Returns a list of (edm key, kind, [(flax path, flax shape), ...], torch shape);
    kind says how the sources become the tensor (see `_convert_entry`).
    """
    nf, mult, nb = config["nf"], config["ch_mult"], config["num_blocks"]
    levels, size = len(mult), config["image_size"]
    attn = {lvl for lvl in range(levels) if size >> lvl in set(config["attn_resolutions"])}
    emb = 4 * nf
    out = []

    def add(key, kind, sources, shape):
        out.append((key, kind, sources, tuple(shape)))

    def vec(key, path, n):
        add(key, "copy", [(path, (n,))], (n,))

    def conv(key, module, cin, cout, k=3, leaf="kernel", bias="bias", filt=False):
        add(key + ".weight", "conv", [(f"{module}/{leaf}", (k, k, cin, cout))], (cout, cin, k, k))
        vec(key + ".bias", f"{module}/{bias}", cout)
        if filt:
            add(key + ".resample_filter", "filter", [], (1, 1, len(FIR_KERNEL), len(FIR_KERNEL)))

    def dense(key, module, cin, cout):
        add(key + ".weight", "dense", [(f"{module}/kernel", (cin, cout))], (cout, cin))
        vec(key + ".bias", f"{module}/bias", cout)

    def norm(key, module, c):
        vec(key + ".weight", f"{module}/scale", c)
        vec(key + ".bias", f"{module}/bias", c)

    counter = {RESNET: 0, ATTN: 0}

    def take(cls):
        counter[cls] += 1
        return f"{cls}_{counter[cls] - 1}"

    def block(key, cin, cout, resample=False, attention=False):
        m = take(RESNET)
        norm(key + ".norm0", f"{m}/GroupNorm_0", cin)
        conv(key + ".conv0", f"{m}/Conv_0", cin, cout, filt=resample)
        dense(key + ".affine", f"{m}/Dense_0", emb, cout)
        norm(key + ".norm1", f"{m}/GroupNorm_1", cout)
        conv(key + ".conv1", f"{m}/Conv_1", cout, cout)
        if cin != cout or resample:
            conv(key + ".skip", f"{m}/Conv_2", cin, cout, k=1, filt=resample)
        if attention:
            a = take(ATTN)
            norm(key + ".norm2", f"{a}/GroupNorm_0", cout)
            qkv = [(f"{a}/NIN_{i}/W", (cout, cout)) for i in range(3)]
            add(key + ".qkv.weight", "qkv_weight", qkv, (3 * cout, cout, 1, 1))
            add(key + ".qkv.bias", "qkv_bias", [(f"{a}/NIN_{i}/b", (cout,)) for i in range(3)], (3 * cout,))
            add(key + ".proj.weight", "nin", [(f"{a}/NIN_3/W", (cout, cout))], (cout, cout, 1, 1))
            vec(key + ".proj.bias", f"{a}/NIN_3/b", cout)

    add("map_noise.freqs", "copy", [("GaussianFourierProjection_0/W", (nf,))], (nf,))
    dense("map_layer0", "Dense_0", 2 * nf, emb)
    dense("map_layer1", "Dense_1", emb, emb)

    # encoder; the down block and aux conv of level l+1 are made at the end of level l
    skips = [nf]
    cin = nf
    for lvl in range(levels):
        r = size >> lvl
        if lvl == 0:
            conv(f"enc.{r}x{r}_conv", "Conv_0", config["in_channels"], nf)
        else:
            block(f"enc.{r}x{r}_down", cin, cin, resample=True)
            aux_in = config["in_channels"] if lvl == 1 else nf * mult[lvl - 2]
            conv(f"enc.{r}x{r}_aux_residual", f"{DOWN}_{lvl - 1}/Conv2d_0", aux_in, cin, leaf="weight", filt=True)
            skips.append(cin)
        for i in range(nb):
            cout = nf * mult[lvl]
            block(f"enc.{r}x{r}_block{i}", cin, cout, attention=lvl in attn)
            cin = cout
            skips.append(cin)

    # decoder
    for lvl in reversed(range(levels)):
        r = size >> lvl
        if lvl == levels - 1:
            block(f"dec.{r}x{r}_in0", cin, cin, attention=True)
            block(f"dec.{r}x{r}_in1", cin, cin)
        else:
            block(f"dec.{r}x{r}_up", cin, cin, resample=True)
        for i in range(nb + 1):
            cout = nf * mult[lvl]
            block(f"dec.{r}x{r}_block{i}", cin + skips.pop(), cout, attention=lvl in attn and i == nb)
            cin = cout
    r = size
    norm(f"dec.{r}x{r}_aux_norm", "GroupNorm_0", cin)
    conv(f"dec.{r}x{r}_aux_conv", "Conv_1", cin, config["out_channels"])
    return out


def _leaves(tree, prefix="", depth=0):
    """(path, encoded array) for every leaf below ``tree``; a non-array leaf is an error."""
    if depth > MAX_DEPTH:
        raise FlaxFormatError(f"{prefix}: parameter tree nested over {MAX_DEPTH} deep")
    for name, value in tree.items():
        if type(name) is not str:
            raise FlaxFormatError(f"{_join(prefix, str(name))}: a key that is not a string")
        path = _join(prefix, name)
        if isinstance(value, dict) and not is_array(value):
            yield from _leaves(value, path, depth + 1)
        elif is_array(value):
            yield path, value
        else:
            raise FlaxFormatError(f"{path}: expected an array, found a msgpack {type(value).__name__}")


def _convert_entry(kind, arrays):
    """One SongUNet tensor from its Flax source arrays (see `ncsnpp_layout`)."""
    if kind == "copy":
        return arrays[0]
    if kind == "conv":  # HWIO -> OIHW
        return arrays[0].transpose(3, 2, 0, 1)
    if kind == "dense":  # (in, out) -> (out, in)
        return arrays[0].T
    if kind == "nin":  # 1x1 layer (in, out) -> conv (out, in, 1, 1)
        return arrays[0].T[:, :, None, None]
    if kind == "qkv_weight":  # output 3c+i is channel c of q (i=0), k (1), v (2): EDM's channel-major layout
        return np.stack([w.T for w in arrays], axis=1).reshape(-1, arrays[0].shape[0])[:, :, None, None]
    if kind == "qkv_bias":
        return np.stack(arrays, axis=1).reshape(-1)
    if kind == "filter":
        return resample_filter()
    raise AssertionError(kind)


def convert_tree(tree, config, prefix=""):
    """SongUNet state_dict (name → float32 numpy array, EDM order) from a Flax NCSN++ parameter tree."""
    layout = ncsnpp_layout(config)
    leaves = dict(_leaves(tree))
    used = set()
    for key, kind, sources, shape in layout:
        for path, want in sources:
            used.add(path)
            if path not in leaves:
                raise FlaxFormatError(f"{_join(prefix, path)}: missing (needed for {key})")
            got = leaf_shape(leaves[path], _join(prefix, path))
            if got != want:
                raise FlaxFormatError(
                    f"{_join(prefix, path)}: shape {got} does not fit NCSN++ {describe(config)} (expected {want})"
                )
    for path in leaves:
        if path not in used:
            raise FlaxFormatError(f"{_join(prefix, path)}: unknown entry for NCSN++ {describe(config)}")
    state = {}
    for key, kind, sources, shape in layout:
        arrays = [decode_leaf(leaves[p], _join(prefix, p)).astype(np.float32) for p, _ in sources]
        state[key] = np.ascontiguousarray(_convert_entry(kind, arrays), dtype=np.float32)
        assert state[key].shape == shape, (key, state[key].shape, shape)
    return state


def describe(config):
    """Short text of a config for messages."""
    return (
        f"(nf {config['nf']}, ch_mult {','.join(map(str, config['ch_mult']))}, {config['num_blocks']} blocks, "
        f"attention at {','.join(map(str, config['attn_resolutions']))})"
    )


def flax_parameter_count(config):
    """Parameters of the Flax NCSN++ of ``config`` (its Fourier frequencies included)."""
    return sum(int(np.prod(s)) for _, _, sources, _ in ncsnpp_layout(config) for _, s in sources)


def songunet_parameter_count(config):
    """Parameters of the SongUNet of ``config`` (buffers — freqs, resampling filters — excluded)."""
    return sum(
        int(np.prod(shape))
        for key, kind, _, shape in ncsnpp_layout(config)
        if kind != "filter" and key != "map_noise.freqs"
    )
