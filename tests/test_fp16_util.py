"""MixedPrecisionTrainer: loss-scale arithmetic and master/model parameter bookkeeping.

On a CPU float16 is not usable, so the fp16 logic (separate float32 masters,
loss scaling, overflow skips) runs with ``loss_scaling=True`` on float32
models; one test with a real float16 UNet needs CUDA.
"""

import pytest
import torch
import torch.nn as nn

from cm import fp16_util
from cm.fp16_util import (
    INITIAL_LOG_LOSS_SCALE,
    MixedPrecisionTrainer,
    master_params_to_state_dict,
    resolve_use_fp16,
    state_dict_to_master_params,
)


class Tiny(nn.Module):
    """Linear + conv, with a no-op `convert_to_fp16` like the UNet's API."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2)
        self.conv = nn.Conv2d(2, 2, 1)
        self.register_buffer("counter", torch.tensor(7.0))

    def forward(self, x):
        return self.conv(self.lin(x).t()[None, :, :, None]).sum()

    def convert_to_fp16(self):
        raise AssertionError("a float32 run must not convert the model")


def scaled_trainer(**kw):
    model = Tiny()
    trainer = MixedPrecisionTrainer(model=model, use_fp16=False, loss_scaling=True, **kw)
    opt = torch.optim.SGD(trainer.master_params, lr=0.1)
    return model, trainer, opt


def test_plain_fp32_masters_are_the_model_params():
    model = Tiny()
    trainer = MixedPrecisionTrainer(model=model)
    assert not trainer.loss_scaling and not trainer.use_fp16
    assert all(a is b for a, b in zip(trainer.master_params, model.parameters()))


def test_good_steps_grow_the_scale_and_match_unscaled_sgd():
    model, trainer, opt = scaled_trainer(fp16_scale_growth=0.25)
    assert trainer.lg_loss_scale == INITIAL_LOG_LOSS_SCALE == 20.0
    ref = Tiny()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x = torch.randn(4, 3)
    for k in range(3):
        trainer.zero_grad()
        trainer.backward(model(x))
        assert trainer.optimize(opt)
        ref_opt.zero_grad()
        ref(x).backward()
        ref_opt.step()
        assert trainer.lg_loss_scale == pytest.approx(20.0 + 0.25 * (k + 1))
    # unscaling is exact up to rounding: same trajectory as plain SGD
    for p, q in zip(trainer.master_params, ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # the model holds the masters' values, but in separate tensors
    for p, master in zip(model.parameters(), trainer.master_params):
        assert p is not master and torch.equal(p, master)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_overflow_skips_the_step_and_halves_the_scale(bad):
    model, trainer, opt = scaled_trainer()
    before = [p.detach().clone() for p in trainer.master_params]
    trainer.zero_grad()
    trainer.backward(model(torch.randn(4, 3)))
    model.lin.weight.grad[0, 0] = bad
    assert trainer.optimize(opt) is False
    assert trainer.lg_loss_scale == 19.0
    for p, b in zip(trainer.master_params, before):
        assert torch.equal(p, b)
    assert all(p.grad is None for p in trainer.master_params)
    assert all(p.grad is None for p in model.parameters())
    # the next good step goes through at the lower scale
    trainer.zero_grad()
    trainer.backward(model(torch.randn(4, 3)))
    assert trainer.optimize(opt) is True
    assert trainer.lg_loss_scale == pytest.approx(19.0 + 1e-3)


def test_a_loss_too_large_for_the_scale_overflows_then_recovers():
    # 2^20 · 1e34 overflows float32: inf gradients, then the scale comes down
    model, trainer, opt = scaled_trainer()
    taken = []
    for _ in range(3):
        trainer.zero_grad()
        trainer.backward(model(torch.randn(4, 3)) * 1e34)
        taken.append(trainer.optimize(opt))
    assert taken[0] is False and trainer.lg_loss_scale < 20


def test_grad_norm_is_unscaled():
    model, trainer, _ = scaled_trainer()
    ref = Tiny()
    x = torch.randn(4, 3)
    trainer.zero_grad()
    trainer.backward(model(x))
    fp16_util.model_grads_to_master_grads(trainer.model_params, trainer.master_params)
    grad_norm, param_norm = trainer.norms(grad_scale=2**trainer.lg_loss_scale)
    ref(x).backward()
    expect = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm().item()
    assert grad_norm == pytest.approx(expect, rel=1e-5)
    assert param_norm == pytest.approx(torch.cat([p.flatten() for p in ref.parameters()]).norm().item(), rel=1e-6)


def test_master_params_state_dict_round_trip():
    model, trainer, _ = scaled_trainer()
    masters = [torch.randn_like(p) for p in trainer.master_params]
    state = master_params_to_state_dict(model, masters)
    # a plain model state_dict: same keys in the same order, buffers included
    assert list(state) == list(model.state_dict())
    assert torch.equal(state["counter"], torch.tensor(7.0))
    back = state_dict_to_master_params(model, state)
    assert all(b.dtype == torch.float32 and torch.equal(b, m) for b, m in zip(back, masters))
    # and it loads into a fresh model with strict=True
    fresh = Tiny()
    fresh.load_state_dict(state, strict=True)
    assert all(torch.equal(p, m) for p, m in zip(fresh.parameters(), masters))
    # load_master_params writes masters and the model
    trainer.load_master_params(back)
    assert all(torch.equal(p, m) for p, m in zip(model.parameters(), masters))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback only applies without CUDA")
def test_use_fp16_on_cpu_means_float32(recwarn):
    model = Tiny()
    trainer = MixedPrecisionTrainer(model=model, use_fp16=True)  # Tiny.convert_to_fp16 would raise
    assert trainer.use_fp16 is False and trainer.loss_scaling is False
    assert resolve_use_fp16(True) is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 training needs a CUDA device")
def test_fp16_unet_on_cuda():
    from cm.script_util import create_model_and_diffusion, model_and_diffusion_defaults

    kw = model_and_diffusion_defaults()
    kw.update(
        image_size=16, channel_mult="1,2", num_channels=32, num_res_blocks=1, attention_resolutions="8", use_fp16=True
    )
    model, diffusion = create_model_and_diffusion(**kw)
    model.cuda()
    trainer = MixedPrecisionTrainer(model=model, use_fp16=True)
    assert trainer.use_fp16 and trainer.loss_scaling
    assert model.input_blocks[0][0].weight.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in trainer.master_params)
    opt = torch.optim.RAdam(trainer.master_params, lr=1e-4)
    x = torch.randn(4, 3, 16, 16, device="cuda")
    for _ in range(3):
        trainer.zero_grad()
        loss = diffusion.training_losses(model, x, torch.full((4,), 0.5, device="cuda"))["loss"].mean()
        trainer.backward(loss)
        trainer.optimize(opt)
    for p, master in zip(model.parameters(), trainer.master_params):
        assert torch.equal(p.float(), master.to(p.dtype).float())
    state = trainer.master_params_to_state_dict()
    assert all(v.dtype == torch.float32 for v in state.values())
