"""cm_train.py --training_mode meanflow (a row of the recipe table): presets and the Adam optimiser,
logging, checkpoints, bit-exact resume, bf16, 2 processes × b = 1 process × 2b (mpiexec and torchrun), bad input."""

import os
import subprocess
import sys

import pytest
import torch

from cm.cli import UsageError
from launchers import MPIEXEC
from song_helpers import ROOT, image_folder, load_script, one_thread  # noqa: F401  (fixture)

NET = ["--image_size", "8", "--channel_mult", "1,2", "--num_channels", "16", "--num_res_blocks", "1",
       "--attention_resolutions", "4", "--arch", "ddpmpp"]  # fmt: skip
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
RUN = NET + ["--training_mode", "meanflow", "--global_batch_size", "4", "--ema_rate", "0.9", "--log_interval", "1",
             "--dropout", "0.2", "--lr", "1e-3"]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("mf") / "data", 8, n=8)


def train(data_dir, log_dir, *extra):
    return load_script("cm_train").main(RUN + ["--data_dir", str(data_dir), "--logging_dir", str(log_dir), *extra])


def checkpoint_files(folder, step):
    return sorted(f for f in os.listdir(folder) if f.endswith(f"{step:06d}.pt"))


def test_presets_optimiser_logging_and_bit_exact_resume(data_dir, tmp_path):
    straight = train(data_dir, tmp_path / "a", "--total_training_steps", "4", "--save_interval", "4")
    # the row's presets fill the flags not given; the row names its optimiser
    assert type(straight.opt).__name__ == "Adam"  # the row names its optimiser (the loop default: RAdam)
    assert straight.opt.defaults["betas"] == (0.9, 0.999) and straight.opt.defaults["lr"] == 1e-3
    assert straight.model.time_inputs == 2
    log = (tmp_path / "a" / "log.txt").read_text()
    assert "meanflow preset:" in log and "time_inputs=2" in log and "dropout" not in log.split("preset:")[1].split("\n")[0]
    header = (tmp_path / "a" / "progress.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "v_loss", "adaptive_weight", "du_dt_norm", "t_mean", "r_over_t", "tangent_warmup"} <= set(header)
    train(data_dir, tmp_path / "b", "--total_training_steps", "2", "--save_interval", "2")
    resumed = train(data_dir, tmp_path / "b", "--total_training_steps", "4", "--save_interval", "4",
                    "--resume_checkpoint", "auto")  # fmt: skip
    assert resumed.step == 4
    names = checkpoint_files(tmp_path / "a", 4)
    assert names == ["ema_0.9_000004.pt", "model000004.pt", "opt000004.pt"] == checkpoint_files(tmp_path / "b", 4)
    for name in names:
        a = torch.load(tmp_path / "a" / name, weights_only=True)
        b = torch.load(tmp_path / "b" / name, weights_only=True)
        if name.startswith("opt"):
            a = {f"{i}.{k}": v for i, s in a["state"].items() for k, v in s.items()}
            b = {f"{i}.{k}": v for i, s in b["state"].items() for k, v in s.items()}
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), (name, k)
    first = torch.load(tmp_path / "b" / "model000002.pt", weights_only=True)
    last = torch.load(tmp_path / "b" / "model000004.pt", weights_only=True)
    assert any(not torch.equal(first[k], v) for k, v in last.items())  # it trained


def test_bf16_trains_with_a_float32_jvp_pass(data_dir, tmp_path):
    loop = train(data_dir, tmp_path / "bf16", "--total_training_steps", "2", "--save_interval", "2",
                 "--precision", "bf16", "--jvp", "ad")  # fmt: skip
    rows = (tmp_path / "bf16" / "progress.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    loss = float(last[header.index("loss")])
    assert loss == loss and loss > 0 and loop.bad_steps.total == 0


def test_fd_tangent_and_warmup_run(data_dir, tmp_path):
    train(data_dir, tmp_path / "fd", "--total_training_steps", "2", "--save_interval", "2", "--jvp", "fd",
          "--tangent_warmup_steps", "4", "--mf_times", "paper")  # fmt: skip
    rows = (tmp_path / "fd" / "progress.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert [float(r.split(",")[header.index("tangent_warmup")]) for r in rows[1:]] == [0.0, 0.25]


def test_a_one_time_checkpoint_initialises_the_two_time_network(data_dir, tmp_path):
    from cm.script_util import create_model

    torch.manual_seed(5)
    one = create_model(image_size=8, num_channels=16, num_res_blocks=1, channel_mult="1,2",
                       attention_resolutions="4", arch="ddpmpp")  # fmt: skip
    torch.save(one.state_dict(), tmp_path / "one.pt")
    loop = train(data_dir, tmp_path / "init", "--total_training_steps", "1", "--save_interval", "1",
                 "--init_from", str(tmp_path / "one.pt"))  # fmt: skip
    assert loop.step == 1 and loop.model.map_layer0.weight.shape[1] == 2 * one.map_layer0.weight.shape[1]


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--time_inputs", "1"], "--training_mode meanflow needs --time_inputs 2"),
        (["--jvp", "xx"], "--jvp must be ad or fd"),
        (["--training_mode", "ect", "--init_from", "none", "--mf_times", "paper"], "--mf_times is for --training_mode"),
        (["--training_mode", "ict", "--time_inputs", "2"], "--training_mode ict needs --time_inputs 1"),
        (["--tangent_warmup_steps", "-1"], "--tangent_warmup_steps must be"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(data_dir, tmp_path, extra, msg, capsys):
    out = tmp_path / "out"
    try:
        train(data_dir, out, "--total_training_steps", "1", *extra)
    except UsageError as e:
        text = str(e)
    except SystemExit:
        text = capsys.readouterr().err
    else:
        pytest.fail("no error")
    assert msg in text and len(text.strip().splitlines()) == 1, text
    assert not out.exists()


@pytest.mark.skipif(MPIEXEC is None, reason="needs mpiexec (on PATH or next to sys.executable)")
def test_two_processes_of_b_make_the_update_of_one_process_of_2b_under_mpiexec_and_torchrun(data_dir, tmp_path):
    harness = os.path.join(ROOT, "tests", "train_scripts", "meanflow_split.py")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_LOGDIR", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))

    def job(name, launcher, extra=()):
        cmd = [*launcher, harness, str(tmp_path / name), "4", "cm_train", *RUN, "--data_dir",
               str(data_dir), "--logging_dir", str(tmp_path / name / "logs"), "--total_training_steps", "2",
               "--save_interval", "2", *extra]  # fmt: skip
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # no dropout: each rank draws its own masks
    procs = {"one": job("one", [sys.executable], extra=("--microbatch", "1", "--dropout", "0")),
             "mpi": job("mpi", [MPIEXEC, "-n", "2", sys.executable], extra=("--dropout", "0")),
             "torchrun": job("torchrun", TORCHRUN, extra=("--dropout", "0"))}  # fmt: skip
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, f"{name}\n{out[-2000:]}\n{err[-3000:]}"
    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    r0, r1 = (torch.load(tmp_path / "mpi" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert one["world"] == 1 and r0["world"] == 2 and r0["ddp"] == "DistributedDataParallel"
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    # torchrun's processes make mpiexec's update exactly (the same gloo all-reduce)
    t0 = torch.load(tmp_path / "torchrun" / "rank0.pt", weights_only=True)
    assert t0["world"] == 2 and t0["ddp"] == "DistributedDataParallel"
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], t0["params"]))
    # Adam divides by √v: a gradient entry near 0 turns its summation-order rounding into up to ~1e-3·lr;
    # unsynchronised ranks (each its half of the batch) would differ by O(lr) = 1e-3 almost everywhere
    for a, b in zip(one["params"], r0["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_edm_train_refuses_a_two_time_network(data_dir, tmp_path):
    with pytest.raises(UsageError, match="--time_inputs 2 is for two-time networks"):
        load_script("edm_train").main(NET + ["--time_inputs", "2", "--data_dir", str(data_dir),
                                             "--logging_dir", str(tmp_path / "edm")])  # fmt: skip
    assert not (tmp_path / "edm").exists()
