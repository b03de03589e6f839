"""Sampling ECT models: image_sample.py on ECT's own training snapshot (its row: boundary
condition at the file's σ_min 0.003, ECT's few-step sampler, rounded uint8), a hostile
snapshot refused in one line with nothing written, σ_min and --quantize resolution."""

import json

import numpy as np
import pytest

from cm.cli import UsageError
from cm.formats.model_files import load_network_file
from cm.sample_util import create_argparser, resolve_sampling, sample_flag_defaults
from song_helpers import ROOT, one_thread  # noqa: F401  (autouse fixture)
from test_edm_pickle import run_script
from test_edm_pickle_ect import with_prefix

ECT = ROOT / "tests" / "data" / "ect"
EDM = ROOT / "tests" / "data" / "edm"
TWO_STEP = "--sampler multistep --sigmas 80,0.821 --num_samples 4 --batch_size 2 --seed 5"


def test_image_sample_samples_an_ect_training_snapshot(tmp_path, capsys):
    pkl = ECT / "snapshot_ddpmpp_cond.pkl"
    rc, err = run_script("image_sample", f"--model_path {pkl} {TWO_STEP} --logging_dir {tmp_path / 'r'}", capsys)
    assert rc == 0, err
    args = json.loads((tmp_path / "r" / "args.json").read_text())
    assert (args["training_mode"], args["sigma_min"], args["quantize"]) == ("ect", 0.003, "round")
    log = (tmp_path / "r" / "log.txt").read_text()
    assert "sigma_min 0.003, ECT few-step, uint8 by round" in log
    rounded = np.load(tmp_path / "r" / "samples_4x16x16x3.npz")
    assert rounded["arr_0"].shape == (4, 16, 16, 3) and rounded["arr_1"].shape == (4,)
    rc, err = run_script("image_sample", f"--model_path {pkl} {TWO_STEP} --batch_size 3 --logging_dir {tmp_path / 'b'}",
                         capsys)
    assert rc == 0, err  # ECT's few-step sampler keeps sample k's noise whatever the batch size
    assert np.array_equal(np.load(tmp_path / "b" / "samples_4x16x16x3.npz")["arr_0"], rounded["arr_0"])
    rc, err = run_script("image_sample", f"--model_path {pkl} {TWO_STEP} --quantize truncate "
                         f"--logging_dir {tmp_path / 't'}", capsys)
    assert rc == 0, err
    cut = np.load(tmp_path / "t" / "samples_4x16x16x3.npz")["arr_0"].astype(int)
    diff = rounded["arr_0"].astype(int) - cut
    assert diff.min() >= 0 and diff.max() <= 1 and 0.3 < diff.mean() < 0.7  # truncation: half a level darker


def test_a_snapshot_with_a_malicious_global_is_refused_in_one_line_nothing_written(tmp_path, capsys):
    path = tmp_path / "snapshot.pkl"
    path.write_bytes(with_prefix((ECT / "snapshot_ddpmpp_cond.pkl").read_bytes(), b"cos\nsystem\n(S'echo pwned'\ntR"))
    out = tmp_path / "out"
    rc, err = run_script("image_sample", f"--model_path {path} {TWO_STEP} --logging_dir {out}", capsys)
    assert rc == 1 and "refusing the global 'os.system'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def resolved(argv, network=None):
    defaults = dict(sample_flag_defaults(), sigmas="", quantize="")
    args = create_argparser(defaults).parse_args(argv)
    fewstep, notes = resolve_sampling(args, network)
    return args, fewstep, notes


def test_sigma_min_comes_from_the_run_then_from_the_row(tmp_path):
    (tmp_path / "meta000007.json").write_text(json.dumps({"flags": {"training_mode": "ect", "sigma_min": 0.004}}))
    ema = str(tmp_path / "ema_0.9999_000007.pt")
    args, fewstep, notes = resolved(["--training_mode", "ect", "--model_path", ema])
    assert (args.sigma_min, fewstep, args.quantize) == (0.004, "ect", "round") and "metadata" in notes[0]
    args, _, _ = resolved(["--training_mode", "ect", "--model_path", ema, "--sigma_min", "0.005"])
    assert args.sigma_min == 0.005  # given: kept
    args, _, _ = resolved(["--training_mode", "ect", "--model_path", str(tmp_path / "x.pt")])
    assert args.sigma_min == 0.003  # no metadata: ECT's networks' σ_min
    args, _, _ = resolved(["--training_mode", "consistency_training", "--model_path", ema])
    assert args.sigma_min == 0.002  # metadata of another mode is not this model's


def test_quantize_defaults_truncate_for_the_original_and_round_for_edm_and_ect():
    for mode in ("edm", "consistency_distillation", "consistency_training", "progdist", "ict"):
        args, fewstep, _ = resolved(["--training_mode", mode, "--model_path", "m.pt"])
        assert (args.quantize, fewstep) == ("truncate", "cm"), mode
    args, _, _ = resolved(["--model_path", "edm.pkl"], network=load_network_file(EDM / "snapshot_ddpmpp_cond_small.pkl"))
    assert args.quantize == "round"
    args, _, _ = resolved(["--training_mode", "ect", "--model_path", "m.pt", "--quantize", "truncate"])
    assert args.quantize == "truncate"
    with pytest.raises(UsageError, match="--quantize"):
        resolved(["--model_path", "m.pt", "--quantize", "floor"])
