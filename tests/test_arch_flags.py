"""--arch adm|ddpmpp|ncsnpp through the factories and the training script."""

import pytest
import torch

from cm.script_util import create_model, create_model_and_diffusion, model_and_diffusion_defaults
from cm.song_unet import SongUNet
from cm.unet import UNetModel
from song_helpers import image_folder, load_script, one_thread  # noqa: F401  (autouse fixture)

TINY = dict(image_size=8, num_channels=16, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4")


def test_default_arch_is_adm_and_positional_signature_still_works():
    assert model_and_diffusion_defaults()["arch"] == "adm"
    kw = {**model_and_diffusion_defaults(), **TINY, "num_channels": 32}
    model, _ = create_model_and_diffusion(**kw)
    assert isinstance(model, UNetModel)
    assert isinstance(create_model(8, 32, 1, channel_mult="1,2", attention_resolutions="4"), UNetModel)


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp"])
def test_song_archs_build_from_flags(arch):
    kw = {**model_and_diffusion_defaults(), **TINY, "arch": arch, "class_cond": True, "augment_dim": 9}
    model, diffusion = create_model_and_diffusion(**kw)
    assert isinstance(model, SongUNet)
    assert "map_augment.weight" in model.state_dict() and "map_label.weight" in model.state_dict()
    assert ("map_noise.freqs" in model.state_dict()) == (arch == "ncsnpp")
    with torch.no_grad():
        _, out = diffusion.denoise(model.eval(), torch.randn(2, 3, 8, 8), torch.tensor([0.5, 5.0]),
                                   y=torch.tensor([0, 9]))
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


def test_song_only_flags_refused_for_adm():
    kw = {**model_and_diffusion_defaults(), **TINY, "augment_dim": 9}
    with pytest.raises(ValueError, match="--augment_dim"):
        create_model_and_diffusion(**kw)
    kw = {**model_and_diffusion_defaults(), **TINY, "arch": "ddpmpp", "learn_sigma": True}
    with pytest.raises(ValueError, match="--learn_sigma"):
        create_model_and_diffusion(**kw)


def test_edm_train_arch_ddpmpp_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("OPENAI_LOGDIR", raising=False)
    data = image_folder(tmp_path / "data", 8)
    logs = tmp_path / "logs"
    argv = (
        f"--arch ddpmpp --augment_dim 9 --label_dropout 0.1 --class_cond True --dropout 0.13 --image_size 8 "
        f"--num_channels 16 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 4 "
        f"--global_batch_size 2 --total_training_steps 2 --save_interval 2 --ema_rate 0.9 "
        f"--data_dir {data} --logging_dir {logs}"
    ).split()
    loop = load_script("edm_train").main(argv)
    assert loop.step == 2
    ema = torch.load(logs / "ema_0.9_000002.pt", weights_only=True)
    model = SongUNet(8, label_dim=10, augment_dim=9, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                     attn_resolutions=(4,))
    model.load_state_dict(ema, strict=True)
    assert "loss" in (logs / "progress.csv").read_text().splitlines()[0]
