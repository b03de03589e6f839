"""EDM-format .pkl snapshots: the safe loader, the scripts that take them, and every refusal."""

import collections
import json
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from cm.cli import UsageError, run_cli
from cm.formats.edm_pickle import load_edm_pickle
from cm.karras_diffusion import KarrasDenoiser
from cm.formats.model_files import is_network_file, load_network_file
from song_helpers import EDM, image_folder, load_script, one_thread  # noqa: F401  (autouse fixture)
SMALL = ["ddpmpp_cond_small", "ncsnpp_uncond_small"]


# --- writing EDM-style pickles of our own (for the cases no golden file covers) ----
class Persistent:
    """Pickles as EDM's persistent objects do: _reconstruct_persistent_obj(meta)."""

    reconstruct = None  # set while a fake torch_utils.persistence is installed

    def __init__(self, class_name, state):
        self.class_name, self.state = class_name, state

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src="raise SystemExit('embedded code ran')",
                    class_name=self.class_name, state=self.state)
        return (Persistent.reconstruct, (meta,))


def record(module):
    state = {
        "training": False,
        "_parameters": collections.OrderedDict(module._parameters),
        "_buffers": collections.OrderedDict(module._buffers),
        "_non_persistent_buffers_set": set(),
        "_modules": collections.OrderedDict((k, record(m)) for k, m in module._modules.items()),
    }
    state.update({k: v for k, v in vars(module).items() if k in ("dropout", "label_dropout")})
    return Persistent(type(module).__name__, state)


def write_edm_pickle(path, obj, monkeypatch):
    """pickle.dump with a stand-in torch_utils.persistence, removed again afterwards."""
    with monkeypatch.context() as m:
        pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

        def _reconstruct_persistent_obj(meta):
            raise AssertionError("never called")

        _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
        _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
        mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
        m.setitem(sys.modules, "torch_utils", pkg)
        m.setitem(sys.modules, "torch_utils.persistence", mod)
        m.setattr(Persistent, "reconstruct", _reconstruct_persistent_obj)
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    return path


def precond(class_name, net, **attrs):
    state = {"training": False, "_parameters": {}, "_buffers": {}, "_modules": {"model": record(net)},
             "img_resolution": 16, "label_dim": 10, "sigma_data": 0.5, **attrs}
    return Persistent(class_name, state)


@pytest.fixture(scope="module")
def ddpmpp():
    return load_edm_pickle(EDM / "snapshot_ddpmpp_cond_small.pkl")


# --- the golden snapshots ---------------------------------------------------------
@pytest.mark.parametrize("name", SMALL)
def test_snapshot_reproduces_edm_without_running_embedded_code(name):
    model, flags = load_network_file(EDM / f"snapshot_{name}.pkl")
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules
    assert not model.training
    inp = torch.load(EDM / "inputs.pt", weights_only=True)[name]
    exp = torch.load(EDM / "expected.pt", weights_only=True)[name]
    kwargs = {} if inp["labels"] is None else {"y": inp["labels"]}
    with torch.no_grad():
        raw, denoised = KarrasDenoiser(sigma_data=flags["sigma_data"]).denoise(model, inp["x"], inp["sigma"], **kwargs)
    assert (raw - exp["raw"]).abs().max().item() < 1e-4
    assert (denoised - exp["denoised"]).abs().max().item() < 1e-4
    cfg = json.loads((EDM / "cases.json").read_text())[name]["edm_config"]
    assert flags["arch"] == ("ddpmpp" if cfg["embedding_type"] == "positional" else "ncsnpp")
    assert flags["class_cond"] == (cfg["label_dim"] > 0) and flags["augment_dim"] == cfg.get("augment_dim", 0)
    assert flags["channel_mult"] == "1,2" and flags["attention_resolutions"] == "8" and flags["num_res_blocks"] == 1
    assert flags["training_mode"] == "edm" and flags["precond"] == "EDMPrecond"


def test_evil_global_is_refused_by_name():
    with pytest.raises(UsageError, match=r"posix\.system") as e:
        load_edm_pickle(EDM / "evil_global.pkl")
    assert "\n" not in str(e.value)


def test_dispatch_knows_pkl_only():
    assert is_network_file("a/b.PKL") and not is_network_file("model.pt") and not is_network_file("")
    with pytest.raises(UsageError, match="self-describing"):
        load_network_file("x.pt")


# --- preconditioners --------------------------------------------------------------
def test_ecm_precond_maps_to_boundary_scalings(ddpmpp, tmp_path, monkeypatch, capsys):
    net, _ = ddpmpp
    path = write_edm_pickle(tmp_path / "ecm.pkl", dict(ema=precond("ECMPrecond", net, sigma_min=0.002)), monkeypatch)
    model, flags = load_edm_pickle(path)
    assert flags["training_mode"] == "consistency_training" and flags["sigma_min"] == 0.002
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _, d = KarrasDenoiser(sigma_min=flags["sigma_min"], distillation=True).denoise(
            model, x, torch.full((2,), 0.002), y=torch.tensor([1, 2]))
    assert torch.allclose(d, x)  # boundary condition f(x, σ_min) = x
    out = tmp_path / "s"
    rc, err = run_script("image_sample", f"--model_path {path} --sampler onestep --num_samples 2 --batch_size 2 "
                         f"--logging_dir {out}", capsys)
    assert rc == 0, err
    assert json.loads((out / "args.json").read_text())["training_mode"] == "ect"
    rc, err = run_script("image_edit", f"--task denoise --model_path {path} --sigmas 0.5,0.002 --num_images 2 "
                         f"--input {out / 'samples_2x16x16x3.npz'} --logging_dir {tmp_path / 'e'}", capsys)
    assert rc == 0, err


def test_bare_network_pickle_loads(ddpmpp, tmp_path, monkeypatch):
    net, flags = ddpmpp
    model, bare_flags = load_edm_pickle(write_edm_pickle(tmp_path / "bare.pkl", record(net), monkeypatch))
    assert bare_flags["precond"] == "none" and bare_flags["arch"] == flags["arch"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), net.state_dict().values()))


@pytest.mark.parametrize("cls", ["VPPrecond", "VEPrecond", "iDDPMPrecond", "DhariwalUNet"])
def test_unsupported_networks_one_line(ddpmpp, tmp_path, monkeypatch, cls):
    net, _ = ddpmpp
    obj = precond(cls, net) if cls.endswith("Precond") else precond("EDMPrecond", torch.nn.Module())
    if cls == "DhariwalUNet":
        obj.state["_modules"]["model"].class_name = cls
    path = write_edm_pickle(tmp_path / "x.pkl", dict(ema=obj), monkeypatch)
    with pytest.raises(UsageError, match="not supported") as e:
        load_edm_pickle(path)
    assert cls in str(e.value) and "\n" not in str(e.value)


# --- bad files ----------------------------------------------------------------------
def bad_files(tmp_path):
    snapshot = (EDM / "snapshot_ddpmpp_cond_small.pkl").read_bytes()
    files = {
        "not_a_pickle": (b"this is not a pickle\n" * 10, "not a readable EDM pickle"),
        "truncated": (snapshot[: len(snapshot) // 2], "not a readable EDM pickle"),
        "no_network": (pickle.dumps({"ema": None, "note": [1, 2, 3]}), "no network inside"),
        "evil": ((EDM / "evil_global.pkl").read_bytes(), "posix.system"),
    }
    out = {}
    for name, (data, message) in files.items():
        (tmp_path / f"{name}.pkl").write_bytes(data)
        out[name] = (tmp_path / f"{name}.pkl", message)
    return out


def test_bad_files_are_one_line_errors(tmp_path):
    for name, (path, message) in bad_files(tmp_path).items():
        with pytest.raises(UsageError) as e:
            load_edm_pickle(path)
        assert message in str(e.value) and "\n" not in str(e.value), name


# --- the scripts ----------------------------------------------------------------------
SAMPLE = "--num_samples 2 --batch_size 2 --steps 3 --sampler heun --seed 3 --generator determ"


def run_script(name, argv, capsys):
    rc = run_cli(load_script(name).main, argv.split() if isinstance(argv, str) else argv)
    return rc, capsys.readouterr().err


def test_sample_pkl_equals_sample_converted_pt(tmp_path, capsys):
    pkl = EDM / "snapshot_ddpmpp_cond_small.pkl"
    rc, err = run_script("image_sample", f"--model_path {pkl} {SAMPLE} --logging_dir {tmp_path / 'a'}", capsys)
    assert rc == 0, err
    rc, err = run_script("convert_edm_pkl", f"--pkl {pkl} --out {tmp_path / 'c.pt'}", capsys)
    assert rc == 0, err
    flags = json.loads((tmp_path / "c.json").read_text())["flags"]
    assert flags["arch"] == "ddpmpp" and flags["class_cond"] is True
    argv = f"--model_path {tmp_path / 'c.pt'} {SAMPLE} --logging_dir {tmp_path / 'b'} "
    argv += " ".join(f"--{k} {v}" for k, v in flags.items())
    rc, err = run_script("image_sample", argv, capsys)
    assert rc == 0, err
    name = "samples_2x16x16x3.npz"
    a, b = np.load(tmp_path / "a" / name), np.load(tmp_path / "b" / name)
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


@pytest.mark.parametrize("flag,message", [("--num_channels 32", "--num_channels 32 contradicts"),
                                          ("--arch ncsnpp", "--arch ncsnpp contradicts"),
                                          ("--training_mode consistency_distillation", "--training_mode")])
def test_sample_contradicting_flag_is_refused_before_writing(tmp_path, capsys, flag, message):
    pkl = EDM / "snapshot_ddpmpp_cond_small.pkl"
    rc, err = run_script("image_sample", f"--model_path {pkl} {SAMPLE} {flag} --logging_dir {tmp_path / 'x'}", capsys)
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "x").exists()


def test_ternary_search_takes_pkl_flags(tmp_path, capsys):
    pkl = EDM / "snapshot_ddpmpp_cond_small.pkl"
    rc, err = run_script("ternary_search", f"--model_path {pkl} --num_channels 32 --logging_dir {tmp_path / 'x'}",
                         capsys)
    assert rc == 1 and "--num_channels 32 contradicts" in err and len(err.strip().splitlines()) == 1, err
    rc, err = run_script("ternary_search", f"--model_path {pkl} --logging_dir {tmp_path / 'x'}", capsys)
    assert rc == 1 and "--ref is required" in err, err  # the file's flags were accepted
    assert not (tmp_path / "x").exists()


def test_bad_inputs_to_scripts_write_nothing(ddpmpp, tmp_path, capsys, monkeypatch):
    files = bad_files(tmp_path)
    vp = dict(ema=precond("VPPrecond", ddpmpp[0]))
    files["unsupported"] = (write_edm_pickle(tmp_path / "unsupported.pkl", vp, monkeypatch), "VPPrecond")
    for name, (path, message) in files.items():
        rc, err = run_script("image_sample", f"--model_path {path} {SAMPLE} --logging_dir {tmp_path / 'x'}", capsys)
        assert rc == 1 and message in err and len(err.strip().splitlines()) == 1, (name, err)
        rc, err = run_script("convert_edm_pkl", f"--pkl {path} --out {tmp_path / 'y.pt'}", capsys)
        assert rc == 1 and message in err and len(err.strip().splitlines()) == 1, (name, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.pkl" for n in files)


def test_cm_train_distils_from_pkl_teacher(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_LOGDIR", raising=False)
    data = image_folder(tmp_path / "data", 16)
    pkl = EDM / "snapshot_ddpmpp_cond_small.pkl"
    argv = (f"--teacher_model_path {pkl} --training_mode consistency_distillation --loss_norm l2 --lr 0 "
            f"--start_scales 4 --global_batch_size 2 --total_training_steps 1 --save_interval 1 --ema_rate 0.9 "
            f"--data_dir {data} --logging_dir {tmp_path / 'cd'}")
    rc, err = run_script("cm_train", argv, capsys)
    assert rc == 0, err
    student = torch.load(tmp_path / "cd" / "model000001.pt", weights_only=True)
    teacher, _ = load_edm_pickle(pkl)
    assert student.keys() == teacher.state_dict().keys()
    assert all(torch.equal(student[k], v) for k, v in teacher.state_dict().items())  # lr 0: still the teacher
    rc, err = run_script("cm_train", argv + " --num_channels 64", capsys)
    assert rc == 1 and "--num_channels 64 contradicts" in err
