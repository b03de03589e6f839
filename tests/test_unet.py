"""The network: checkpoint layout, round trips, attention layout, fp16 casting, checkpointing."""

import io

import pytest
import torch

import golden
from cm.checkpoint import CheckpointError, load_model_state
from cm.nn import timestep_embedding
from cm.script_util import create_model, create_model_and_diffusion, model_and_diffusion_defaults
from cm.unet import QKVAttention

FULL = golden.load_cases()["full_config"]


def build(flags, **over):
    kw = model_and_diffusion_defaults()
    kw.update(flags)
    kw.update(over)
    return create_model_and_diffusion(**kw)[0]


def small_flags(**over):
    flags = dict(golden.load_cases()["configs"]["unet_a"])
    flags.update(over)
    return flags


def test_seed_config_state_dict_matches_manifest_in_order():
    model = build(FULL["flags"])
    manifest = golden.read_manifest()
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert len(got) == 455 == len(manifest)
    for i, (g, m) in enumerate(zip(got, manifest)):
        assert g == m, f"entry {i}: {g} != {m}"
    assert sum(p.numel() for p in model.parameters()) == FULL["params"] == 42737411


def test_small_configs_have_golden_parameter_counts():
    for name in ("unet_a", "unet_b"):
        spec = golden.load_cases()["files"]["weights"][name]
        model = build(spec["flags"])
        assert sum(p.numel() for p in model.parameters()) == spec["params"]
        assert len(model.state_dict()) == spec["tensors"]


def forward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 32, 32, generator=g)
    t = torch.tensor([-1000.0, 500.0])
    y = torch.tensor([3, 7])
    with torch.no_grad():
        return model(x, t, y=y)


def test_fresh_model_round_trips_through_torch_save():
    torch.manual_seed(0)
    model = build(small_flags()).eval()
    # give the zero-initialised output layers weights so the output is not trivially 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(1)
    other = build(small_flags()).eval()
    assert not torch.equal(forward(model), forward(other))
    other.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    assert torch.equal(forward(model), forward(other))


def test_checkpoint_for_other_flags_fails_naming_the_first_bad_key_and_both_shapes():
    sd = build(small_flags()).state_dict()
    other = build(small_flags(num_channels=64))
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(sd, strict=True)
    with pytest.raises(CheckpointError) as e:
        load_model_state(other, sd, "ckpt.pt")
    msg = str(e.value)
    assert "\n" not in msg and "ckpt.pt" in msg
    assert "time_embed.0.weight" in msg and "(128, 32)" in msg and "(256, 64)" in msg
    # a checkpoint of a DDP-wrapped model (module. prefix) loads into the plain model
    load_model_state(build(small_flags()), {f"module.{k}": v for k, v in sd.items()}, "ddp.pt")


def naive_attention(qkv, heads):
    """Attention written out with the (q|k|v, head, channel) layout, in float64."""
    b, width, length = qkv.shape
    d = width // (3 * heads)
    q, k, v = qkv.double().reshape(b, 3, heads, d, length).unbind(1)
    w = torch.einsum("bhdi,bhdj->bhij", q, k) / d**0.5
    return torch.einsum("bhij,bhdj->bhdi", w.softmax(-1), v).reshape(b, heads * d, length)


def test_attention_uses_q_k_v_outermost_layout():
    qkv = torch.randn(2, 3 * 4 * 8, 16)
    got = QKVAttention(4)(qkv)
    torch.testing.assert_close(got.double(), naive_attention(qkv, 4), rtol=1e-5, atol=1e-5)
    # a head-outermost reading of the same tensor is a different function
    swapped = qkv.reshape(2, 4, 3, 8, 16).transpose(1, 2).reshape(2, 96, 16)
    assert not torch.allclose(QKVAttention(4)(swapped), got, atol=1e-3)


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0.0, 2.5])
    emb = timestep_embedding(t, 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(2.5 * freqs), torch.sin(2.5 * freqs)]))


def test_convert_to_fp16_casts_the_torso_convolutions_only():
    model = create_model(32, 32, 1, attention_resolutions="16", class_cond=True, num_head_channels=8)
    model.convert_to_fp16()
    assert model.input_blocks[0][0].weight.dtype == torch.float16
    assert model.middle_block[1].qkv.weight.dtype == torch.float16
    assert model.time_embed[0].weight.dtype == torch.float32
    assert model.label_emb.weight.dtype == torch.float32
    assert model.out[2].weight.dtype == torch.float32
    model.convert_to_fp32()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_use_fp16_without_cuda_warns_and_builds_float32():
    if torch.cuda.is_available():
        model = create_model(32, 32, 1, attention_resolutions="16", use_fp16=True)
        assert model.dtype == torch.float16
        return
    import cm.fp16_util as fp16_util

    fp16_util._warned_cpu_fp16 = False
    with pytest.warns(RuntimeWarning, match="float32"):
        model = create_model(32, 32, 1, attention_resolutions="16", use_fp16=True)
    assert model.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = build(small_flags(), use_checkpoint=flag)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        model(x, torch.tensor([1.0, 2.0]), y=torch.tensor([0, 1])).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    model = build(small_flags(), dropout=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    assert torch.equal(forward(model), forward(model))
    model.train()
    assert not torch.equal(forward(model), forward(model))


def test_unsupported_image_size_is_a_clear_error():
    with pytest.raises(ValueError, match="image_size 48"):
        create_model(48, 32, 1)


def test_labels_required_exactly_when_class_conditional():
    model = build(small_flags())
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, torch.zeros(1))
