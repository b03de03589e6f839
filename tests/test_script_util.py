"""Flag defaults and argparse helpers (SPEC §1)."""

import argparse

import pytest

from cm.script_util import (
    NUM_CLASSES,
    add_dict_to_argparser,
    channel_mult_for,
    cm_train_defaults,
    model_and_diffusion_defaults,
    sample_defaults,
    str2bool,
    train_defaults,
)


def parser_for(*dicts):
    p = argparse.ArgumentParser()
    defaults = {}
    for d in dicts:
        defaults.update(d)
    add_dict_to_argparser(p, defaults)
    return p


def test_spec_defaults():
    md = model_and_diffusion_defaults()
    assert md == dict(
        sigma_min=0.002, sigma_max=80.0, image_size=64, num_channels=128, num_res_blocks=2, num_heads=4,
        num_heads_upsample=-1, num_head_channels=-1, attention_resolutions="32,16,8", channel_mult="",
        dropout=0.0, class_cond=False, use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False,
        use_fp16=False, use_new_attention_order=False, learn_sigma=False, weight_schedule="karras",
        arch="adm", augment_dim=0, label_dropout=0.0,  # issue 9: EDM's SongUNet, off by default
        time_inputs=1,  # issue 24: MeanFlow's second time input r, off by default
    )
    assert cm_train_defaults()["loss_norm"] == "lpips" and cm_train_defaults()["start_scales"] == 40
    assert train_defaults()["global_batch_size"] == 2048 and train_defaults()["batch_size"] == -1
    assert sample_defaults()["generator"] == "determ" and sample_defaults()["steps"] == 40
    assert NUM_CLASSES == 10


@pytest.mark.parametrize("text,value", [("yes", True), ("True", True), ("t", True), ("Y", True), ("1", True),
                                        ("no", False), ("FALSE", False), ("f", False), ("n", False), ("0", False)])
def test_str2bool(text, value):
    assert str2bool(text) is value


def test_every_flag_has_help_and_types_follow_defaults():
    p = parser_for(model_and_diffusion_defaults(), train_defaults(), cm_train_defaults())
    for action in p._actions:
        if action.dest != "help":
            assert action.help and "default" in action.help, action.dest
    args = p.parse_args(["--num_channels", "64", "--class_cond", "yes", "--lr", "2e-5"])
    assert args.num_channels == 64 and args.class_cond is True and args.lr == 2e-5


@pytest.mark.parametrize("argv", [["--class_cond", "maybe"], ["--num_channels", "3.5"],
                                  ["--loss_norm", "l3"], ["--training_mode", "gan"]])
def test_bad_flag_values_are_argparse_errors(argv, capsys):
    p = parser_for(model_and_diffusion_defaults(), cm_train_defaults())
    with pytest.raises(SystemExit) as e:
        p.parse_args(argv)
    assert e.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_sampler_flags():
    p = parser_for(sample_defaults(), model_and_diffusion_defaults())
    args = p.parse_args(["--sampler", "multistep", "--ts", "0,22,39"])
    assert args.sampler == "multistep" and args.s_tmax == float("inf")
    with pytest.raises(SystemExit):
        p.parse_args(["--sampler", "ddim"])


def test_channel_mult():
    assert channel_mult_for(32) == (1, 2, 2, 1)
    assert channel_mult_for(64) == (1, 2, 3, 4)
    assert channel_mult_for(32, "1,2,2,2") == (1, 2, 2, 2)
    with pytest.raises(ValueError, match="image_size 100"):
        channel_mult_for(100)
    with pytest.raises(ValueError, match="--channel_mult"):
        channel_mult_for(32, "1,x")
