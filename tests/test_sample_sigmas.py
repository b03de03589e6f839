"""image_sample.py --sampler multistep --sigmas: parsing, one-line errors, the sampler,
and samples that do not depend on the batch size."""

import math

import numpy as np
import pytest
import torch

from cm.cli import UsageError, run_cli
from cm.karras_diffusion import KarrasDenoiser, karras_sample
from cm.random_util import get_generator
from cm.sample_util import parse_sigmas, sample_images
from cm.samplers import sample_multistep_sigmas
from cm.script_util import create_model_and_diffusion, model_and_diffusion_defaults


def test_parse_sigmas():
    assert parse_sigmas("80,0.821", "multistep", 0.002, 80.0) == [80.0, 0.821]
    assert parse_sigmas("", "multistep", 0.002, 80.0) is None
    for bad, message in [
        ("80,0.821,0.821", "strictly decreasing"),
        ("0.8,80", "strictly decreasing"),
        ("81,0.8", r"\[sigma_min, sigma_max\]"),
        ("80,0.001", r"\[sigma_min, sigma_max\]"),
        ("80,x", "comma list of numbers"),
    ]:
        with pytest.raises(UsageError, match=message):
            parse_sigmas(bad, "multistep", 0.002, 80.0)
    with pytest.raises(UsageError, match="only used by --sampler multistep"):
        parse_sigmas("80", "onestep", 0.002, 80.0)


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--sigmas 0.8,80", "--sigmas must be strictly decreasing"),
        ("--sigmas 80,0", "--sigmas must lie in [sigma_min, sigma_max]"),
        ("--sigmas 80,0.8 --ts 0,3", "--ts and --sigmas both given"),
    ],
)
def test_image_sample_rejects_bad_sigmas_in_one_line_before_writing(flags, message, tmp_path, capsys):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "image_sample.py")
    spec = importlib.util.spec_from_file_location("image_sample_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    log_dir = tmp_path / "logs"
    argv = f"--sampler multistep {flags} --model_path {tmp_path}/m.pt --logging_dir {log_dir}".split()
    assert run_cli(module.main, argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not log_dir.exists()


S, SIGMA_MIN = 0.5, 0.002


def exact_consistency(x, sigma):
    """Data ~ N(0, S²): f(x, σ) = x·√(S²+σ_min²)/√(S²+σ²)."""
    return x * (math.sqrt(S**2 + SIGMA_MIN**2) / torch.sqrt(S**2 + sigma**2)).view(-1, 1, 1, 1)


def test_multistep_sigmas_with_the_exact_consistency_function_keeps_the_data_std():
    gen = get_generator("determ", 4096, 0)
    x = gen.randn(4096, 1, 2, 2) * 80.0
    out = sample_multistep_sigmas(exact_consistency, x, [80.0, 0.821], gen)
    # f(x_T) ~ N(0, S²+σ_min²); re-noised to 0.821 and mapped back: N(0, S²+σ_min²) again
    assert out.std().item() == pytest.approx(math.sqrt(S**2 + SIGMA_MIN**2), rel=0.03)
    one = sample_multistep_sigmas(exact_consistency, x, [80.0], gen)
    torch.testing.assert_close(one, exact_consistency(x, torch.full((4096,), 80.0)))


def test_sigmas_samples_do_not_depend_on_the_batch_size():
    kw = dict(model_and_diffusion_defaults(), image_size=8, channel_mult="1,2", num_channels=32, num_res_blocks=1)
    kw.update(attention_resolutions="4", distillation=True)
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**kw)
    model.eval()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = [
            sample_images(
                model, diffusion, num_samples=3, batch_size=b, image_size=8, steps=40, sampler="multistep",
                sigmas=[80.0, 0.821], progress=False, device="cpu",
            )[0]
            for b in (1, 3)
        ]  # fmt: skip
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(runs[0], runs[1])
    # the levels reach the network: a different second level gives different images
    other = sample_images(
        model, diffusion, num_samples=3, batch_size=3, image_size=8, steps=40, sampler="multistep",
        sigmas=[80.0, 2.0], progress=False, device="cpu",
    )[0]  # fmt: skip
    assert not np.array_equal(runs[0], other)


def test_karras_sample_refuses_sigmas_for_other_samplers():
    with pytest.raises(ValueError, match="only used by the multistep sampler"):
        karras_sample(KarrasDenoiser(), None, (1, 3, 8, 8), steps=2, sampler="onestep", sigmas=[80.0])
