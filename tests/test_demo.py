"""The digits demo: its pure helpers, and `scripts/demo.py --quick` end to end (files, table, results).

No assertion is made on sample quality or time; the quick preset trains for a
handful of steps.
"""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("sklearn")

from cm.tools import demo  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLERS = ("heun", "onestep", "twostep", "ect_onestep", "ect_twostep", "ict_onestep", "ict_twostep",
            "dmd2_onestep", "dmd2_twostep", "dmd2_gan_onestep", "dmd2_gan_twostep",
            "sct_onestep", "sct_twostep", "scd_onestep", "scd_twostep", "mf_onestep", "mf_twostep")


# ----------------------------------------------------------------------------
# helpers


def test_digits_split_is_stratified_and_complete():
    x_train, y_train, x_held, y_held = demo.load_digits_split(0.2, seed=0)
    assert len(x_train) + len(x_held) == 1797
    assert x_train.shape[1:] == (8, 8) and 0.0 <= x_train.min() and x_train.max() <= 1.0
    held_counts = np.bincount(y_held, minlength=10)
    assert held_counts.min() >= 34 and held_counts.max() <= 37  # 20% of 174..183 per class
    again = demo.load_digits_split(0.2, seed=0)
    np.testing.assert_array_equal(again[3], y_held)


def test_upscale_and_cifar_style_names(tmp_path):
    x_train, y_train, _, _ = demo.load_digits_split()
    images = demo.upscale_digits(x_train[:12], 16)
    assert images.shape == (12, 16, 16, 3) and images.dtype == np.uint8
    assert (images[..., 0] == images[..., 2]).all()  # grey digits as RGB
    (tmp_path / "3_99999.png").write_bytes(b"left by an earlier run")
    (tmp_path / "notes.txt").write_text("kept")
    demo.write_image_folder(images, y_train[:12], str(tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "kept"
    names = sorted(n for n in os.listdir(tmp_path) if n.endswith(".png"))
    assert len(names) == 12
    for name in names:
        label, index = re.fullmatch(r"(\d)_(\d{5})\.png", name).groups()
        assert int(label) == y_train[int(index)]
        with Image.open(tmp_path / name) as im:
            assert im.mode == "RGB" and im.size == (16, 16)
            np.testing.assert_array_equal(np.asarray(im), images[int(index)])


def test_judge_on_identical_sets_gives_zero_distance():
    x_train, y_train, _, _ = demo.load_digits_split()
    images = demo.upscale_digits(x_train[:200], 16)
    clf = demo.train_classifier(images, y_train[:200], epochs=1, progress=False)
    feats, preds = demo.classify(clf, images)
    assert feats.shape == (200, 64) and preds.shape == (200,)
    acc, fd = demo.judge(clf, images, y_train[:200], demo.feature_stats(feats))
    assert 0.0 <= acc <= 100.0
    assert abs(fd) < 1e-6


def test_table_and_comparison_grid():
    rows = [
        dict(label="EDM teacher, Heun 18 steps", nfe=35, seconds=10.0, images=500, accuracy=97.25, frechet=1.234),
        dict(label="real", nfe=None, seconds=None, images=500, accuracy=98.0, frechet=0.5),
    ]
    lines = demo.format_table(rows).splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert re.match(r"\| EDM teacher, Heun 18 steps \|\s+35 \|\s+10\.0 \|\s+50\.0 \|\s+97\.2 \|\s+1\.23 \|", lines[2])
    images = np.full((20, 16, 16, 3), 200, dtype=np.uint8)
    labels = np.arange(20) % 10
    # one row per sampler: per_class cells high, one column per class, rows 4 px apart
    grid = demo.comparison_grid([(images, labels), (images, labels)], per_class=2, scale=1, gap=4, line=1)
    assert grid.shape == (2 * (2 * 17 + 1) + 4, 10 * 17 + 1, 3)
    assert (grid[1:17, 1:17] == 200).all() and (grid[0, : 10 * 17 + 1] == 96).all()
    assert (grid[2 * 17 + 1 : 2 * 17 + 5] == 255).all()  # the white gap between the rows
    assert (grid[2 * 17 + 5 + 1 : 2 * 17 + 5 + 17, 1:17] == 200).all()
    # titles: a label column at the left and a header of class ids; the rows keep their pixels
    titled = demo.comparison_grid([(images, labels), (images, labels)], per_class=2, scale=1, gap=4, line=1,
                                  titles=["EDM teacher, Heun 18 steps: 35 NFE", "CD, one step: 1 NFE"])
    top, left = titled.shape[0] - grid.shape[0], titled.shape[1] - grid.shape[1]
    assert top > 0 and left > 100 and (titled[top:, left:] == grid).all()
    assert (titled[top:, : left - 4] < 128).any()  # the titles are drawn


def test_sampler_evaluation_counts():
    cfg = demo.DemoConfig(heun_steps=18, two_step_ts="0,22,39")
    assert [(name, nfe) for name, _, nfe, _, _ in demo.samplers(cfg)] == [("heun", 35), ("onestep", 1), ("twostep", 2)]
    recipes = [(name, nfe, mode) for name, _, nfe, mode, _ in demo.recipe_samplers(cfg)]
    assert recipes == [("ect_onestep", 1, "ect"), ("ect_twostep", 2, "ect"), ("ict_onestep", 1, "ict"),
                       ("ict_twostep", 2, "ict"), ("dmd2_onestep", 1, "dmd2"), ("dmd2_twostep", 2, "dmd2"),
                       ("dmd2_gan_onestep", 1, "dmd2"), ("dmd2_gan_twostep", 2, "dmd2"),
                       ("sct_onestep", 1, "sct"), ("sct_twostep", 2, "sct"),
                       ("scd_onestep", 1, "scd"), ("scd_twostep", 2, "scd"),
                       ("mf_onestep", 1, "meanflow"), ("mf_twostep", 2, "meanflow")]


def test_recipe_stages_get_cd_training_compute_in_counted_passes():
    from cm.tools import demo_recipes as dr

    cfg = demo.DemoConfig()
    assert dr.CD_PASSES_PER_IMAGE == 6 and dr.cd_budget(cfg) == 6 * 32 * 800
    for stage in (dr.ECT, dr.ICT):
        steps = dr.budget_steps(stage, cfg)
        assert stage.passes_per_image == 4 and steps == 1200  # 2 forwards + 1 backward (= 2 forwards) per image
        argv = dr.stage_train_argv(stage, cfg, "d", "l", "t.pt")
        assert f"--total_training_steps={steps}" in argv and f"--save_interval={steps}" in argv
    twice = dataclasses.replace(cfg, cd_steps=1600, recipe_batch_size=64)  # the rule scales, it is not a table
    assert [dr.budget_steps(stage, twice) for stage in (dr.ECT, dr.ICT)] == [1200, 1200]
    # DMD2 at R = 5: generator turn 5 (+3 with the GAN), 5 critic updates of 3 (+6), 4 fresh G forwards
    assert (dr.dmd2_passes(5, gan=False), dr.dmd2_passes(5, gan=True)) == (24, 57)
    assert (dr.budget_steps(dr.DMD2, cfg), dr.budget_steps(dr.DMD2_GAN, cfg)) == (200, 84)
    # sCT and MeanFlow: the training pass (forward + backward) and the JVP (two forwards); sCD also its teacher
    assert [dr.budget_steps(s, cfg) for s in (dr.SCT, dr.SCD, dr.MEANFLOW)] == [960, 800, 960]
    assert dr.budget_steps(dr.ECT, dataclasses.replace(cfg, recipe_steps=7)) == 7


# ----------------------------------------------------------------------------
# the quick run, end to end


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = subprocess.run(
        # in bf16 (issue 11): the quick run covers the demo's --precision path; fp32 is every other script test's
        [sys.executable, os.path.join(ROOT, "scripts", "demo.py"), "--quick", "--out", str(out), "--precision", "bf16"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=str(out.parent),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, dataclasses.replace(demo.quick_config(), precision="bf16")


def test_quick_run_writes_the_digits_folder(quick_run):
    out, _, cfg = quick_run
    train = os.listdir(out / "data" / "train")
    held = os.listdir(out / "data" / "heldout")
    assert len(train) + len(held) == 1797
    assert all(re.fullmatch(r"\d_\d{5}\.png", n) for n in train + held)
    assert {n.split("_")[0] for n in train} == {str(c) for c in range(10)}
    with Image.open(out / "data" / "train" / sorted(train)[0]) as im:
        assert im.mode == "RGB" and im.size == (cfg.image_size, cfg.image_size)


def test_quick_run_samples_and_grids(quick_run):
    out, _, cfg = quick_run
    n, s = cfg.num_samples, cfg.image_size
    for name in SAMPLERS:
        folder = out / "samples" / name
        npz = folder / f"samples_{n}x{s}x{s}x3.npz"
        with np.load(npz) as f:
            images, labels = f["arr_0"], f["arr_1"]
        assert images.shape == (n, s, s, 3) and images.dtype == np.uint8
        assert labels.shape == (n,) and np.issubdtype(labels.dtype, np.integer)
        np.testing.assert_array_equal(labels, np.arange(n) % 10)  # --class_labels 0..9 in turn
        with Image.open(folder / f"samples_{n}x{s}x{s}x3.png") as im:
            assert im.size[0] > 0 and im.size[1] > 0
    with Image.open(out / "comparison.png") as im:  # one row per sampler: reads at README width
        assert im.mode == "RGB" and im.size[0] < 1000 and im.size[1] > len(SAMPLERS) * 2 * cfg.image_size
    assert (out / "edm" / f"ema_{cfg.edm_ema_rate}_{cfg.edm_steps:06d}.pt").is_file()
    assert (out / "cd" / f"ema_{cfg.cd_ema_rate}_{cfg.cd_steps:06d}.pt").is_file()
    assert (out / "classifier.pt").is_file()
    quick_steps = {"ect": 6, "ict": 6, "dmd2": 2, "dmd2_gan": 1, "sct": 5, "scd": 4, "mf": 5}  # CD's 4 × 8 × 6, see below
    for mode in ("ect", "ict", "sct", "scd", "mf"):
        assert (out / mode / f"ema_{cfg.recipe_ema_rate}_{quick_steps[mode]:06d}.pt").is_file()
    for mode in ("dmd2", "dmd2_gan"):
        assert (out / mode / f"ema_{cfg.recipe_ema_rate}_{quick_steps[mode]:06d}.pt").is_file()
        assert (out / mode / f"dmd2_critic{quick_steps[mode]:06d}.pt").is_file()
    for log in ("edm_train", "cm_train", "ect_train", "ict_train", "dmd2_train", "dmd2_gan_train",
                "sct_train", "scd_train", "mf_train",
                *(f"sample_{n}" for n in SAMPLERS)):
        assert (out / "logs" / f"{log}.log").stat().st_size > 0


def test_quick_run_prints_the_table(quick_run):
    out, stdout, cfg = quick_run
    nfe = {"EDM teacher, Heun": 2 * cfg.heun_steps - 1, "CD, one step": 1, "CD, two steps": 2}
    nfe.update({"ECT, one step": 1, "ECT, two steps": 2, "iCT, one step": 1, "iCT, two steps": 2})
    nfe.update({"CD + DMD2, one step": 1, "CD + DMD2, two steps": 2, "CD + DMD2 + GAN, one step": 1,
                "CD + DMD2 + GAN, two steps": 2})
    nfe.update({"sCT, one step": 1, "sCT, two steps": 2, "sCD, one step": 1, "sCD, two steps": 2})
    nfe.update({"MeanFlow, one step": 1, "MeanFlow, two steps": 2})
    for label, evaluations in nfe.items():
        row = [line for line in stdout.splitlines() if line.startswith(f"| {label}")]
        assert len(row) == 1, stdout
        cells = [c.strip() for c in row[0].strip("|").split("|")]
        assert int(cells[1]) == evaluations
        assert float(cells[2]) > 0 and float(cells[3]) > 0
        assert 0 <= float(cells[4]) <= 100 and math.isfinite(float(cells[5]))
    assert any(line.startswith("| real digits") for line in stdout.splitlines())
    assert (out / "table.txt").read_text().strip() in stdout


def test_quick_run_results_json(quick_run):
    out, _, cfg = quick_run
    results = json.loads((out / "results.json").read_text())
    assert results["config"] == cfg.as_dict()
    rows = {r["name"]: r for r in results["rows"]}
    assert set(rows) == set(SAMPLERS) | {"real"}
    assert [rows[n]["nfe"] for n in SAMPLERS] == [2 * cfg.heun_steps - 1] + [1, 2] * ((len(SAMPLERS) - 1) // 2)
    # CD's 4 × 8 × 6 = 192 passes: ECT/iCT 4 per image (6 steps of 8), DMD2 at R = 2: 12 (2 steps), 27 with GAN (1),
    # sCT and MeanFlow 5 (5 steps), sCD 6 (4 steps)
    assert results["recipe_steps"] == {"ect": 6, "ict": 6, "dmd2": 2, "dmd2_gan": 1, "sct": 5, "scd": 4, "mf": 5}
    for r in rows.values():
        assert 0 <= r["accuracy"] <= 100 and math.isfinite(r["frechet"])
    for name in SAMPLERS:
        assert rows[name]["seconds"] > 0 and rows[name]["images"] == cfg.num_samples
        assert (out / results["files"]["samples"][name]["npz"]).is_file()
    assert set(results["commands"]) == {"edm_train", "cm_train", "ect_train", "ict_train", "dmd2_train",
                                        "dmd2_gan_train", "sct_train", "scd_train", "mf_train",
                                        "edit_inpaint",
                                        "edit_superres"} | {f"sample_{n}" for n in SAMPLERS}  # fmt: skip
    assert any(a.startswith("--teacher_model_path=") and "/edm/" in a for a in results["commands"]["scd_train"])
    for key in ("dmd2_train", "dmd2_gan_train"):  # the CD model tuned, the teacher as the real score
        cmd = results["commands"][key]
        assert any(a.startswith("--init_from=") and "/cd/" in a for a in cmd)
        assert any(a.startswith("--teacher_model_path=") and "/edm/" in a for a in cmd)
    assert "--dmd_gan=True" in results["commands"]["dmd2_gan_train"]
    assert "--dmd_gan=True" not in results["commands"]["dmd2_train"]
    assert "--time_inputs=2" in results["commands"]["mf_train"] and "--init_from=none" in results["commands"]["mf_train"]
    assert "--sampler=meanflow" in results["commands"]["sample_mf_onestep"]
    assert "--init_from=none" in results["commands"]["ict_train"]
    assert any(a.startswith("--init_from=") and a.endswith(".pt") for a in results["commands"]["ect_train"])
    assert results["commands"]["cm_train"][1] == "scripts/cm_train.py"
    for name in ("edm_train", "cm_train", "sample_onestep"):
        assert "--precision=bf16" in results["commands"][name]
    assert results["timings_s"]["total"] > 0


def test_quick_run_editing_panel(quick_run):
    """Inpainting (right half) and super-resolution (x2) of held-out digits: files, rows, the kept parts."""
    out, stdout, cfg = quick_run
    n, s = cfg.edit_images, cfg.image_size
    results = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in results["editing"]}
    assert set(rows) == {"edit_inpaint_input", "edit_inpaint_result", "edit_superres_input", "edit_superres_result"}
    for name, r in rows.items():
        assert 0 <= r["accuracy"] <= 100 and math.isfinite(r["frechet"]) and r["images"] == n
        assert (r["nfe"] == len(cfg.edit_ts.split(",")) - 1) == name.endswith("result")
        assert any(line.startswith(f"| {r['label']}") for line in stdout.splitlines()), r["label"]
    with np.load(out / results["files"]["editing"]["inputs"]) as z:
        inputs, truth = z["arr_0"], z["arr_1"]
    assert inputs.shape == (n, s, s, 3) and truth.shape == (n,)
    with np.load(out / results["files"]["editing"]["inpaint"]) as z:
        np.testing.assert_array_equal(z["arr_1"], truth)
        np.testing.assert_array_equal(z["arr_0"][:, :, : s // 2], inputs[:, :, : s // 2])  # the kept left half
        assert (z["degraded"][:, :, s // 2 :] == 0).all()
    with np.load(out / results["files"]["editing"]["superres"]) as z:
        pool = lambda a: a.astype(float).reshape(n, s // 2, 2, s // 2, 2, 3).mean((2, 4))  # noqa: E731
        res = z["arr_0"]
        unclipped = pool((res > 0) & (res < 255)) == 1  # a block with a clipped pixel can move its mean
        assert unclipped.mean() > 0.2
        assert np.abs(pool(res) - pool(inputs))[unclipped].max() <= 1.0  # the 2x2 block means kept
    with Image.open(out / "editing.png") as im:
        assert im.mode == "RGB" and im.size[0] > im.size[1]
    assert (out / "logs" / "edit_inpaint.log").stat().st_size > 0
