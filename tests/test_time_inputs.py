"""--time_inputs 2: a second time input r for every --arch; one-time files initialise two-time networks
exactly; a file of the other kind is a one-line error naming --time_inputs."""

import pytest
import torch

from cm.checkpoint import CheckpointError, load_model_state
from cm.formats.model_files import load_network_weights
from cm.nn import time_inputs_in, widen_time_inputs
from cm.script_util import create_model, create_model_and_diffusion, model_and_diffusion_defaults
from song_helpers import one_thread  # noqa: F401  (autouse fixture: one thread)

NET = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4")


def build(arch, time_inputs, class_cond=False, augment_dim=0, seed=0):
    torch.manual_seed(seed)
    extra = dict(augment_dim=augment_dim) if arch != "adm" else {}
    model = create_model(**NET, arch=arch, class_cond=class_cond, time_inputs=time_inputs, **extra)
    for p in model.parameters():  # zero-initialised output layers would hide every difference
        p.data.normal_(0, 0.1)
    return model.eval()


ARCHS = [("adm", {}), ("ddpmpp", {}), ("ncsnpp", {}), ("ddpmpp", dict(class_cond=True, augment_dim=6))]


@pytest.mark.parametrize("arch,extra", ARCHS)
def test_one_time_weights_initialise_a_two_time_network_that_computes_the_same(arch, extra):
    one, two = build(arch, 1, **extra), build(arch, 2, seed=1, **extra)
    state = one.state_dict()
    assert time_inputs_in(two, state) == 1 and time_inputs_in(two, two.state_dict()) == 2
    load_model_state(two, widen_time_inputs(two, state), "one.pt")
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([10.0, -300.0, 500.0])
    kw = dict(y=torch.tensor([1, 4, 9])) if extra.get("class_cond") else {}
    if extra.get("augment_dim"):
        kw["augment_labels"] = torch.randn(3, 6)
    want = one(x, t, **kw)
    for r in (torch.zeros(3), torch.tensor([-50.0, 20.0, 999.0])):
        assert torch.allclose(two(x, t, r_timesteps=r, **kw), want, atol=1e-6)
    # the fresh two-time network does read r
    fresh = build(arch, 2, seed=2, **extra)
    assert not torch.allclose(fresh(x, t, r_timesteps=torch.zeros(3), **kw), fresh(x, t, r_timesteps=t, **kw))


@pytest.mark.parametrize("arch", ["adm", "ddpmpp"])
def test_other_time_inputs_file_is_one_line_naming_the_flag(arch, tmp_path):
    one, two = build(arch, 1), build(arch, 2)
    for model, state, found in ((one, two.state_dict(), 2), (two, one.state_dict(), 1)):
        with pytest.raises(CheckpointError) as err:
            load_model_state(model, {f"module.{k}": v for k, v in state.items()}, "m.pt")
        msg = str(err.value)
        assert f"--time_inputs {found}" in msg and "\n" not in msg
    # --init_from widens a one-time file (plain .pt) ...
    torch.save(one.state_dict(), tmp_path / "one.pt")
    load_network_weights(two, str(tmp_path / "one.pt"), None, "init_from", widen_time=True)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 40.0])
    assert torch.allclose(two(x, t, r_timesteps=torch.tensor([1.0, 2.0])), one(x, t), atol=1e-6)
    # ... a teacher or a sampled model does not
    with pytest.raises(CheckpointError, match="--time_inputs 1"):
        load_network_weights(build(arch, 2), str(tmp_path / "one.pt"), None, "teacher_model_path")


def test_r_required_exactly_by_two_time_networks_and_defaults_unchanged():
    for arch in ("adm", "ddpmpp"):
        one, two = build(arch, 1), build(arch, 2)
        x, t = torch.randn(1, 3, 8, 8), torch.zeros(1)
        with pytest.raises(ValueError, match="pass r_timesteps"):
            two(x, t)
        with pytest.raises(ValueError, match="one time input"):
            one(x, t, r_timesteps=t)
    assert model_and_diffusion_defaults()["time_inputs"] == 1
    kw = {**model_and_diffusion_defaults(), **NET, "arch": "ddpmpp"}
    base, _ = create_model_and_diffusion(**{k: v for k, v in kw.items() if k != "time_inputs"})
    same, _ = create_model_and_diffusion(**kw)
    assert {k: v.shape for k, v in base.state_dict().items()} == {k: v.shape for k, v in same.state_dict().items()}
    with pytest.raises(ValueError, match="time_inputs must be 1 or 2"):
        create_model(**NET, arch="ddpmpp", time_inputs=3)
