"""image_sample.py --training_mode meanflow --sampler meanflow: one and two steps, sample k the same for
any batch size and process count, bad input one line with nothing written."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cm.cli import UsageError
from cm.meanflow import meanflow_sample
from cm.random_util import get_generator
from cm.sample_util import sample_images
from cm.script_util import create_model
from launchers import MPIEXEC
from song_helpers import ROOT, load_script, one_thread  # noqa: F401  (fixture)

NET = dict(image_size=8, num_channels=16, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
           arch="ddpmpp")  # fmt: skip
FLAGS = [x for k, v in NET.items() for x in (f"--{k}", str(v))]
MF = ["--training_mode", "meanflow", "--sampler", "meanflow", "--time_inputs", "2"]


def random_net(time_inputs):
    torch.manual_seed(0)
    model = create_model(**NET, time_inputs=time_inputs)
    for p in model.parameters():
        p.data.normal_(0, 0.15)
    return model.eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("mf")
    torch.save(random_net(2).state_dict(), d / "mf.pt")
    torch.save(random_net(1).state_dict(), d / "one.pt")
    return d


def run(ckpt, tmp, name, *extra):
    out = tmp / name
    load_script("image_sample").main(
        FLAGS + MF + ["--model_path", str(ckpt), "--num_samples", "5", "--seed", "3", "--logging_dir", str(out), *extra]
    )
    return np.load(out / "samples_5x8x8x3.npz")["arr_0"]


def test_one_and_two_steps_through_the_script_match_the_sampler_and_ignore_batch_size(ckpts, tmp_path):
    one = run(ckpts / "mf.pt", tmp_path, "b2", "--batch_size", "2")
    assert np.array_equal(one, run(ckpts / "mf.pt", tmp_path, "b5", "--batch_size", "5"))
    two = run(ckpts / "mf.pt", tmp_path, "two", "--batch_size", "3", "--flow_times", "0.999,0.5,0")
    assert not np.array_equal(one, two)
    model = random_net(2)
    for times, got in (([0.999, 0.0], one), ([0.999, 0.5, 0.0], two)):
        x = meanflow_sample(model, (5, 3, 8, 8), times, get_generator("determ", 5, 3)).clamp(-1, 1)
        want = ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # float kernels of another batch layout
    # sample_images in process: batch 2 vs 5 (determ and determ-indiv) bit-identical
    for gen in ("determ", "determ-indiv"):
        common = dict(num_samples=5, image_size=8, steps=1, sampler="meanflow", generator=gen, seed=4,
                      flow_times=[0.999, 0.5, 0.0], progress=False)  # fmt: skip
        a, _ = sample_images(model, None, batch_size=2, **common)
        b, _ = sample_images(model, None, batch_size=5, **common)
        assert np.array_equal(a, b), gen


@pytest.mark.skipif(MPIEXEC is None, reason="needs mpiexec (on PATH or next to sys.executable)")
def test_two_processes_give_the_samples_of_one(ckpts, tmp_path):
    one = run(ckpts / "mf.pt", tmp_path, "one", "--batch_size", "2", "--flow_times", "0.999,0.5,0")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "OPENAI_LOGDIR")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    cmd = [MPIEXEC, "-n", "2", sys.executable, str(ROOT / "scripts" / "image_sample.py"), *FLAGS, *MF,
           "--model_path", str(ckpts / "mf.pt"), "--num_samples", "5", "--seed", "3", "--batch_size", "2",
           "--flow_times", "0.999,0.5,0", "--logging_dir", str(tmp_path / "mpi")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(np.load(tmp_path / "mpi" / "samples_5x8x8x3.npz")["arr_0"], one)


@pytest.mark.parametrize(
    "ckpt,extra,msg",
    [
        ("mf.pt", ["--time_inputs", "1", "--training_mode", "edm", "--sampler", "heun"], "give --time_inputs 2"),
        ("one.pt", [], "give --time_inputs 1"),
        ("mf.pt", ["--time_inputs", "1"], "give --time_inputs 2"),
        ("mf.pt", ["--sampler", "heun"], "--training_mode meanflow goes with --sampler meanflow"),
        ("mf.pt", ["--training_mode", "ect"], "--training_mode meanflow goes with --sampler meanflow"),
        ("mf.pt", ["--flow_times", "0.5,0.9"], "--flow_times must be strictly decreasing"),
        ("mf.pt", ["--flow_times", "1.5,0"], "--flow_times must lie in [0, 0.999]"),
        ("mf.pt", ["--flow_times", "0.999"], "--flow_times needs at least two times"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(ckpts, tmp_path, ckpt, extra, msg):
    out = tmp_path / "out"
    with pytest.raises(UsageError) as err:
        load_script("image_sample").main(
            FLAGS + MF + ["--model_path", str(ckpts / ckpt), "--num_samples", "2", "--logging_dir", str(out), *extra]
        )
    assert msg in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()
