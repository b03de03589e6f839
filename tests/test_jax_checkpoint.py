"""OpenAI's JAX/Flax NCSN++ checkpoints: reader, mapping onto SongUNet, golden outputs, bad input."""

import msgpack
import numpy as np
import pytest
import torch

from cm.formats.flax_msgpack import FlaxFormatError, read_msgpack_tree
from cm.formats.jax_checkpoint import (
    flags_from_config,
    is_jax_checkpoint,
    load_jax_checkpoint,
    model_from_flags,
    read_jax_checkpoint,
)
from cm.formats.jax_ncsnpp import flax_parameter_count, infer_config, ncsnpp_layout, songunet_parameter_count
from cm.karras_diffusion import KarrasDenoiser

from golden import DATA
from song_helpers import one_thread  # noqa: F401  (autouse fixture: one torch thread for tiny models)

JAX = DATA / "jax"
CKPT = JAX / "checkpoint_80"
# the published CD configuration (configs/cifar10_ve_cd.py): nf 128, ch_mult 2,2,2, 4 blocks, attention at 16
FULL = dict(image_size=32, in_channels=3, out_channels=3, nf=128, ch_mult=(2, 2, 2), num_blocks=4,
            attn_resolutions=(16,))


def pack_array(a):
    """Flax's array encoding: extension 1 holding msgpack [shape, dtype name, bytes]."""
    a = np.asarray(a)
    return msgpack.ExtType(1, msgpack.packb([list(a.shape), a.dtype.name, a.tobytes()]))


def write_tree(path, tree):
    path.write_bytes(msgpack.packb(tree, use_bin_type=True))
    return path


def golden_tree():
    return read_msgpack_tree(CKPT)


def outputs(model, distillation):
    d = np.load(JAX / "expected.npz")
    x, sigma = torch.from_numpy(d["x"]), torch.from_numpy(d["sigma"])
    with torch.no_grad():
        return KarrasDenoiser(distillation=distillation).denoise(model, x, sigma)


def test_params_ema_reproduces_the_jax_outputs():
    model, flags = load_jax_checkpoint(CKPT, image_size=16)
    assert not model.training
    assert flags["arch"] == "ncsnpp" and flags["channel_mult"] == "1,2" and flags["attention_resolutions"] == "8"
    d = np.load(JAX / "expected.npz")
    raw, distilled = outputs(model, distillation=True)
    _, denoised = outputs(model, distillation=False)
    for name, got in (("raw", raw), ("distilled", distilled), ("denoised", denoised)):
        assert (got - torch.from_numpy(d[name])).abs().max().item() < 1e-4, name


@pytest.mark.parametrize("which", ["params", "target_params"])
def test_other_parameter_sets_differ(which):
    model, _ = load_jax_checkpoint(CKPT, which=which, image_size=16)
    _, distilled = outputs(model, distillation=True)
    d = np.load(JAX / "expected.npz")
    assert (distilled - torch.from_numpy(d["distilled"])).abs().max().item() > 1e-2


def test_inferred_config_and_tree_match_the_golden_description():
    tree = golden_tree()["params_ema"]
    config = infer_config(tree, "params_ema", image_size=16)
    assert config == dict(image_size=16, in_channels=3, out_channels=3, nf=8, ch_mult=(1, 2), num_blocks=1,
                          attn_resolutions=(8,))
    listed = [line.split("\t") for line in (JAX / "param_tree.txt").read_text().splitlines()]
    want = [(path, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())) for path, shape in listed]
    sources = [src for _, _, srcs, _ in ncsnpp_layout(config) for src in srcs]
    assert sorted(sources) == sorted(want)  # every leaf used once, with its shape
    assert flax_parameter_count(config) == 48763  # meta.json "params"


def test_full_cd_config_matches_edm_manifest_and_parameter_counts():
    manifest = [line.split("\t")[:2] for line in (DATA / "edm" / "manifest_ncsnpp_uncond_cifar10.txt").read_text()
                .splitlines()]
    edm = [(k[len("model."):], tuple(int(s) for s in shape.strip("()").split(",") if s.strip()))
           for k, shape in manifest if "map_augment" not in k]  # EDM's optional augmentation map
    assert [(key, shape) for key, _, _, shape in ncsnpp_layout(FULL)] == edm
    assert flax_parameter_count(FULL) == 56_395_651
    assert songunet_parameter_count(FULL) == 56_395_523
    with torch.device("meta"):  # our network built from the flags, without allocating it
        model = model_from_flags(flags_from_config(FULL))
    assert sum(p.numel() for p in model.parameters()) == 56_395_523


def test_converted_state_loads_strict_into_ncsnpp_built_from_flags():
    state_dict, flags = read_jax_checkpoint(CKPT, image_size=16)
    model = model_from_flags(flags)
    assert sum(p.numel() for p in model.parameters()) == 48763 - 8  # Fourier frequencies are a buffer
    model.load_state_dict(state_dict, strict=True)


def test_state_layouts(tmp_path):
    full = golden_tree()
    ema = full["params_ema"]
    ref, _ = read_jax_checkpoint(CKPT, image_size=16)
    state = {k: v for k, v in full.items() if k != "target_params"}  # State
    sorted_bare = {k: ema[k] for k in sorted(ema)}  # key order lost (jax tree_map sorts dict keys)
    for name, tree in [("state", state), ("bare", ema), ("variables", {"params": ema}), ("sorted", sorted_bare)]:
        sd, flags = read_jax_checkpoint(write_tree(tmp_path / name, tree), image_size=16)
        assert flags["attention_resolutions"] == "8", name
        assert all(torch.equal(sd[k], ref[k]) for k in ref), name
    with pytest.raises(FlaxFormatError, match=r"no target_params in this state \(parameter sets present: "
                                               r"params_ema, params\)"):
        read_jax_checkpoint(tmp_path / "state", which="target_params", image_size=16)


def test_detection(tmp_path):
    assert is_jax_checkpoint(CKPT)
    torch.save({"a": torch.zeros(1)}, tmp_path / "m.pt")
    assert not is_jax_checkpoint(tmp_path / "m.pt")


def _one_line(excinfo):
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def _corrupt(tmp_path, edit):
    tree = golden_tree()
    edit(tree["params_ema"])
    return write_tree(tmp_path / "bad", tree)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.__setitem__("Foo_0", {"w": pack_array(np.zeros(2, np.float32))}),
         "params_ema/Foo_0: unknown module"),
        (lambda t: t["Conv_1"].__setitem__("kernel", {"__msgpack_chunked_array__": True, "shape": [3]}),
         "params_ema/Conv_1/kernel: chunked array encoding is not supported"),
        (lambda t: t["Conv_1"].__setitem__("kernel", msgpack.ExtType(3, b"\x00")),
         "params_ema/Conv_1/kernel: unsupported array encoding (msgpack extension 3"),
        (lambda t: t["Conv_1"].__setitem__("kernel", pack_array(np.zeros((3, 3, 8, 3), np.complex64))),
         "params_ema/Conv_1/kernel: unsupported array dtype 'complex64'"),
        (lambda t: t["ResnetBlockBigGANpp_5"]["Conv_1"].__setitem__("kernel",
                                                                    pack_array(np.zeros((3, 3, 16, 12), "f4"))),
         "params_ema/ResnetBlockBigGANpp_5/Conv_1/kernel: shape (3, 3, 16, 12) does not fit NCSN++"),
        (lambda t: t.pop("ResnetBlockBigGANpp_9"), "params_ema/ResnetBlockBigGANpp_*: 9 residual blocks fit no"),
        (lambda t: t["Conv_0"].__setitem__("extra", pack_array(np.zeros(1, "f4"))),
         "params_ema/Conv_0/extra: unknown entry"),
    ],
    ids=["unknown-module", "chunked", "extension-3", "dtype", "shape", "block-count", "unknown-leaf"],
)
def test_bad_trees_name_the_path(tmp_path, edit, message):
    with pytest.raises(FlaxFormatError) as excinfo:
        load_jax_checkpoint(_corrupt(tmp_path, edit), image_size=16)
    assert message in _one_line(excinfo)


def test_not_a_state(tmp_path):
    path = write_tree(tmp_path / "other", {"step": 3, "opt": {"0": 1}})
    with pytest.raises(FlaxFormatError) as excinfo:
        load_jax_checkpoint(path)
    assert "not a consistency-model state or NCSN++ parameter tree (top-level keys: step, opt)" in _one_line(excinfo)
    (tmp_path / "junk").write_bytes(b"\xc1\xc1 not msgpack")
    with pytest.raises(FlaxFormatError) as excinfo:
        load_jax_checkpoint(tmp_path / "junk")
    assert "not a msgpack file" in _one_line(excinfo)


def synthetic_tree(config, order="creation"):
    """A zero-valued Flax tree of ``config`` in creation order or with sorted keys."""
    tree = {}
    for _, _, sources, _ in ncsnpp_layout(config):
        for path, shape in sources:
            module, leaf = path.split("/", 1)
            node = tree.setdefault(module, {})
            *inner, last = leaf.split("/")
            for name in inner:
                node = node.setdefault(name, {})
            node[last] = pack_array(np.zeros(shape, np.float32))
    return {k: tree[k] for k in sorted(tree)} if order == "sorted" else tree


def test_attention_levels_when_widths_are_equal():
    config = dict(FULL, nf=8, num_blocks=1, attn_resolutions=(8,))  # ch_mult 2,2,2: every level 16 wide
    assert infer_config(synthetic_tree(config))["attn_resolutions"] == (8,)  # read from the creation order
    # sorted keys lose the order: the shapes fit any level, the CIFAR-10 choice (16) is taken ...
    assert infer_config(synthetic_tree(config, "sorted"))["attn_resolutions"] == (16,)
    # ... unless the caller says
    assert infer_config(synthetic_tree(config, "sorted"), attn_resolutions=(8,))["attn_resolutions"] == (8,)
    with pytest.raises(FlaxFormatError, match="ambiguous in this tree; pass attn_resolutions"):
        infer_config(synthetic_tree(config, "sorted"), image_size=128)  # no 16x16 level to fall back on


def test_scripts_adopt_the_network_flags_of_a_flax_file():
    from argparse import Namespace

    from cm.cli import UsageError
    from cm.formats.model_files import adopt_network_flags
    from cm.sample_util import sample_flag_defaults

    defaults = sample_flag_defaults()
    args = Namespace(**dict(defaults, model_path=str(CKPT)))
    model, flags = adopt_network_flags(args, "model_path", defaults)
    assert args.arch == "ncsnpp" and args.num_channels == 8 and args.channel_mult == "1,2"
    assert args.image_size == 32 and args.attention_resolutions == "16"  # no --image_size given: CIFAR-10's 32
    args = Namespace(**dict(defaults, model_path=str(CKPT), image_size=16))
    adopt_network_flags(args, "model_path", defaults)
    assert args.image_size == 16 and args.attention_resolutions == "8"
    args = Namespace(**dict(defaults, model_path=str(CKPT), num_channels=64))
    with pytest.raises(UsageError, match="--num_channels 64 contradicts --model_path"):
        adopt_network_flags(args, "model_path", defaults)
