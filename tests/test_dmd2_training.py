"""cm_train.py --training_mode dmd2: checkpoints, bit-exact resume, 2 processes × b = 1 × 2b,
bf16 and batch size 1, sampling the generator with image_sample.py, and bad input."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cm.cli import UsageError
from cm.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from launchers import MPIEXEC

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CM_TRAIN = os.path.join(ROOT, "scripts", "cm_train.py")
SPLIT = os.path.join(ROOT, "tests", "train_scripts", "split_batch.py")
NET = dict(image_size=8, channel_mult="1,2", attention_resolutions="4", num_channels=32, num_res_blocks=1)
NET_FLAGS = [x for k, v in NET.items() for x in (f"--{k}", str(v))] + ["--dropout", "0.0", "--log_interval", "1"]
DMD = ["--training_mode", "dmd2", "--dfake_gen_update_ratio", "3", "--lr_warmup_steps", "4", "--lr", "1e-3",
       "--fake_lr", "1e-3", "--ema_rate", "0.9"]  # fmt: skip


def env():
    e = {k: v for k, v in os.environ.items() if k not in ("OPENAI_LOGDIR", "CM_NO_GRAD_SYNC", "RANK", "WORLD_SIZE")}
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def write_images(folder, n, labelled=False):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        name = f"{'cat' if i % 2 else 'dog'}_{i}.png" if labelled else f"{chr(ord('a') + i)}.png"
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / name)
    return folder


def save_net(path, seed, **kw):
    torch.manual_seed(seed)
    net, _ = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **NET, **kw})
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every job at once; {name: (returncode, stdout, stderr)} and the folder."""
    tmp = tmp_path_factory.mktemp("dmd2")
    teacher, gen = save_net(tmp / "teacher.pt", 3), save_net(tmp / "cm.pt", 4)
    teacher_c, gen_c = save_net(tmp / "teacher_c.pt", 5, class_cond=True), save_net(tmp / "cm_c.pt", 6, class_cond=True)
    data, labelled = write_images(tmp / "data", 8), write_images(tmp / "labelled", 8, labelled=True)
    nets = ["--teacher_model_path", str(teacher), "--init_from", str(gen)]
    gan = ["--dmd_gan", "True", "--gan_max_step", "10"]

    def train(name, *extra):
        return [sys.executable, CM_TRAIN, *NET_FLAGS, *DMD, *nets, *gan, "--data_dir", str(data),
                "--logging_dir", str(tmp / name), "--global_batch_size", "4", "--save_interval", "2", *extra]

    def split(name, *extra):
        return [SPLIT, str(tmp / name / "dump"), "4", "cm_train", *NET_FLAGS, *DMD, *nets, *gan,
                "--data_dir", str(data), "--logging_dir", str(tmp / name), "--global_batch_size", "4",
                "--total_training_steps", "2", "--save_interval", "2", *extra]

    jobs = {
        "straight": train("straight", "--total_training_steps", "4"),
        "first_half": train("resumed", "--total_training_steps", "2"),
        "one": [sys.executable, *split("one", "--microbatch", "1")],
        "bf16_b1": [sys.executable, CM_TRAIN, *NET_FLAGS, *DMD, "--teacher_model_path", str(teacher_c),
                    "--init_from", str(gen_c), "--class_cond", "True", "--dmd_variant", "fastgen", "--dmd_gan", "True",
                    "--precision", "bf16", "--global_batch_size", "1", "--total_training_steps", "2",
                    "--save_interval", "2", "--data_dir", str(labelled), "--logging_dir", str(tmp / "bf16_b1")],
    }  # fmt: skip
    if MPIEXEC is not None:
        jobs["mpi"] = [MPIEXEC, "-n", "2", sys.executable, *split("mpi")]
    jobs["torchrun"] = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        *split("torchrun")]  # fmt: skip
    procs = {
        name: subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, cmd in jobs.items()
    }
    results = {name: (p.wait(timeout=500), *p.communicate()) for name, p in procs.items()}
    # the resumed half starts after its first half has written step 2
    code, out, err = results["first_half"]
    assert code == 0, err[-3000:]
    proc = subprocess.run(train("resumed", "--total_training_steps", "4", "--resume_checkpoint", "auto"),
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=500)
    results["resumed"] = (proc.returncode, proc.stdout, proc.stderr)
    return results, tmp


def ok(results, name):
    code, out, err = results[name]
    assert code == 0, f"{name}: exit {code}\n{out[-2000:]}\n{err[-3000:]}"


def flat(state):
    """Every tensor of a checkpoint file (optimiser states and the critic's extra state included)."""
    if torch.is_tensor(state):
        return [state]
    if isinstance(state, dict):
        return [t for k in sorted(state, key=str) for t in flat(state[k])]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in flat(v)]
    return [torch.tensor(float(state))] if isinstance(state, (int, float)) else []


def test_checkpoint_set_and_bit_exact_resume(runs):
    results, tmp = runs
    ok(results, "straight")
    ok(results, "resumed")
    names = sorted(f for f in os.listdir(tmp / "straight") if f.endswith("000004.pt"))
    assert names == ["dmd2_critic000004.pt", "ema_0.9_000004.pt", "model000004.pt", "opt000004.pt"]
    for name in names:
        a = torch.load(tmp / "straight" / name, weights_only=True)
        b = torch.load(tmp / "resumed" / name, weights_only=True)
        ta, tb = flat(a), flat(b)
        assert len(ta) == len(tb) > 0
        assert all(torch.equal(x, y) for x, y in zip(ta, tb)), name
    critic = torch.load(tmp / "straight" / "dmd2_critic000004.pt", weights_only=True)
    assert critic["_extra_state"]["updates"] == 4 * 3  # ratio 3 critic updates per generator update
    assert any(k.startswith("discriminator.") for k in critic) and any(k.startswith("fake.") for k in critic)
    # the generator moved away from the CM it started as, the fake score from the teacher
    model = torch.load(tmp / "straight" / "model000004.pt", weights_only=True)
    start = torch.load(tmp / "cm.pt", weights_only=True)
    assert max((model[k] - start[k]).abs().max().item() for k in start) > 1e-5
    teacher = torch.load(tmp / "teacher.pt", weights_only=True)
    assert max((critic["fake." + k] - teacher[k]).abs().max().item() for k in teacher) > 1e-5
    header = (tmp / "straight" / "progress.csv").read_text().splitlines()[0].split(",")
    logged = {"loss_dm", "loss_fake", "gan_gen", "gan_disc", "d_real", "d_fake", "critic_grad_norm",
              "grad_norm_before_clip", "dm_grad_norm", "lr", "critic_lr"}  # fmt: skip
    assert logged <= set(header), logged - set(header)
    # the generator's warm-up: the lr at step s is lr·min(1, 3s/4)
    lines = (tmp / "straight" / "progress.csv").read_text().splitlines()[1:]
    rows = [dict(zip(header, line.split(","))) for line in lines]
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.0, 7.5e-4, 1e-3, 1e-3])


@pytest.mark.skipif(MPIEXEC is None, reason="needs mpiexec (on PATH or next to sys.executable)")
def test_two_processes_of_b_make_the_update_of_one_process_of_2b(runs):
    results, tmp = runs
    ok(results, "one")
    ok(results, "mpi")
    one = torch.load(tmp / "one" / "dump" / "rank0.pt", weights_only=True)
    mpi = [torch.load(tmp / "mpi" / "dump" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert one["world"] == 1 and mpi[0]["world"] == 2 and one["step"] == mpi[0]["step"] == 2
    assert all(torch.equal(a, b) for a, b in zip(mpi[0]["params"], mpi[1]["params"]))
    for a, b in zip(one["params"], mpi[0]["params"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ca = torch.load(tmp / "one" / "dmd2_critic000002.pt", weights_only=True)
    cb = torch.load(tmp / "mpi" / "dmd2_critic000002.pt", weights_only=True)
    # Adam turns reduction-order noise on near-zero gradients (biases a GroupNorm cancels) into steps
    # of up to lr = 1e-3: a few entries differ; unsynchronised critics would differ in nearly all
    tensors = [k for k in ca if torch.is_tensor(ca[k])]
    total = sum(ca[k].numel() for k in tensors)
    assert sum(int(((ca[k] - cb[k]).abs() > 1e-5).sum()) for k in tensors) < 1e-2 * total
    teacher = torch.load(tmp / "teacher.pt", weights_only=True)
    moved = sum(int(((ca["fake." + k] - v).abs() > 1e-4).sum()) for k, v in teacher.items())
    assert moved > 0.5 * sum(v.numel() for v in teacher.values())


@pytest.mark.skipif(MPIEXEC is None, reason="needs mpiexec (on PATH or next to sys.executable)")
def test_torchrun_makes_the_update_of_mpiexec(runs):
    results, tmp = runs
    ok(results, "torchrun")
    ok(results, "mpi")
    mpi, tr = (torch.load(tmp / name / "dump" / "rank0.pt", weights_only=True) for name in ("mpi", "torchrun"))
    assert tr["world"] == 2 and tr["step"] == 2
    assert all(torch.equal(a, b) for a, b in zip(mpi["params"], tr["params"]))  # the same gloo all-reduce
    ca, cb = (torch.load(tmp / name / "dmd2_critic000002.pt", weights_only=True) for name in ("mpi", "torchrun"))
    assert all(torch.equal(a, b) for a, b in zip(flat(ca), flat(cb)))


def test_bf16_batch_one_fastgen_and_the_sampler(runs):
    results, tmp = runs
    ok(results, "bf16_b1")
    model = tmp / "bf16_b1" / "model000002.pt"
    state = torch.load(model, weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())
    out = tmp / "samples"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "image_sample.py"), *NET_FLAGS[:-2], "--class_cond", "True",
         "--training_mode", "dmd2", "--sampler", "onestep", "--model_path", str(model), "--num_samples", "3",
         "--batch_size", "3", "--logging_dir", str(out)],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    npz = [f for f in os.listdir(out) if f.endswith(".npz")]
    with np.load(out / npz[0]) as f:
        assert f["arr_0"].shape == (3, 8, 8, 3)


def main_of_cm_train():
    sys.path.insert(0, os.path.join(ROOT, "tests", "train_scripts"))
    import run_and_dump

    return run_and_dump.load_script("cm_train").main


@pytest.mark.parametrize(
    "drop, extra, message",
    [
        ("--teacher_model_path", [], "needs --teacher_model_path"),
        ("--init_from", [], "--init_from"),
        (None, ["--dfake_gen_update_ratio", "0"], "--dfake_gen_update_ratio must be at least 1"),
        (None, ["--dmd_min_step", "99", "--dmd_max_step", "1"], "--dmd_min_step"),
        (None, ["--use_fp16", "True"], "bf16"),
        (None, ["--class_cond", "True"], "cm.pt"),  # an unconditional generator for a class-conditional run
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, drop, extra, message):
    teacher, gen = save_net(tmp_path / "teacher.pt", 3), save_net(tmp_path / "cm.pt", 4)
    data = write_images(tmp_path / "data", 2)
    flags = {"--teacher_model_path": str(teacher), "--init_from": str(gen)}
    argv = [*NET_FLAGS, *DMD, "--data_dir", str(data), "--logging_dir", str(tmp_path / "logs"), *extra]
    for k, v in flags.items():
        if k != drop:
            argv += [k, v]
    with pytest.raises(Exception) as info:
        main_of_cm_train()(argv)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "logs").exists()


def test_teacher_and_generator_files_must_agree():
    check = main_of_cm_train().__globals__["check_same_data"]
    check((None, {"image_size": 32, "class_cond": True}), (None, {"image_size": 32, "class_cond": True}))
    with pytest.raises(UsageError, match="image_size=64 but --teacher_model_path holds image_size=32"):
        check((None, {"image_size": 32}), (None, {"image_size": 64}))
    with pytest.raises(UsageError, match="class_cond"):
        check((None, {"class_cond": True}), (None, {"class_cond": False}))
