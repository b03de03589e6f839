"""scripts/benchmark.py on a tiny network: JSON keys, positive numbers, the table, flag errors.

Times are never asserted on.
"""

import json
import os
import subprocess
import sys

import pytest

from cm.tools import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--image_size=8",
    "--num_channels=32",
    "--num_res_blocks=1",
    "--channel_mult=1,2",
    "--attention_resolutions=4",
    "--batch_size=2",
    "--repeats=2",
    "--warmup=1",
    "--threads=1",
]


def run_script(*args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def check_result(r, name, batch_size=2):
    assert r["name"] == name
    assert r["description"] == benchmark.DESCRIPTIONS[name]
    assert r["batch_size"] == batch_size
    assert r["evaluations_per_image"] == benchmark.EVALUATIONS[name]
    assert len(r["seconds"]) == 2 and all(t > 0 for t in r["seconds"])
    assert r["median_s"] > 0 and r["images_per_s"] == pytest.approx(batch_size / r["median_s"])
    assert r["peak_memory_mib"] > 0 and r["parameters"] > 0


def test_json_in_process_every_benchmark():
    proc = run_script(*TINY, "--isolate=False", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert [r["name"] for r in report["results"]] == list(benchmark.BENCHMARKS)
    for r in report["results"]:
        check_result(r, r["name"])
        assert r["peak_memory_kind"] == "process_rss_so_far"
    env, cfg = report["environment"], report["config"]
    assert env["device"] == "cpu" and env["dtype"] == "float32" and env["threads"] == 1
    assert all(r["gflops_per_s"] > 0 and r["flops_per_iteration"] > 0 for r in report["results"])
    assert cfg["image_size"] == 8 and cfg["attention_resolutions"] == "4" and cfg["class_cond"] is True
    assert cfg["benchmarks"] == list(benchmark.BENCHMARKS)


def test_isolated_table():
    proc = run_script(*TINY, "--benchmarks=onestep,heun_step")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("device cpu")
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| benchmark")]
    expected = [benchmark.DESCRIPTIONS["onestep"], benchmark.DESCRIPTIONS["heun_step"]]
    assert [r.split("|")[1].strip() for r in rows] == expected
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert int(cells[1]) == 2 and float(cells[3]) > 0 and float(cells[4]) > 0 and float(cells[5]) > 0
    assert "peak RSS of a fresh process" in proc.stdout


def test_run_one_in_process_matches_flags():
    args = benchmark.create_argparser().parse_args([*TINY, "--benchmarks=edm_train", "--repeats=2"])
    cfg = benchmark.resolve(args)
    r = benchmark.run_one("edm_train", cfg)
    check_result(r, "edm_train")


def test_seed_configuration_is_the_default():
    cfg = benchmark.resolve(benchmark.create_argparser().parse_args(["--device=cpu"]))
    assert (cfg["image_size"], cfg["num_channels"], cfg["num_res_blocks"]) == (32, 128, 3)
    assert cfg["attention_resolutions"] == "16,8" and cfg["num_head_channels"] == 32
    assert cfg["class_cond"] and cfg["use_scale_shift_norm"] and cfg["resblock_updown"]
    assert cfg["batch_size"] == 8 and cfg["dtype"] == "float32" and cfg["edm_dropout"] == 0.1


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--benchmarks=nope", "unknown"),
        ("--repeats=0", "--repeats must be positive"),
        ("--device=tpu", "--device must be"),
    ],
)
def test_bad_flags_are_one_line_errors(flag, message):
    proc = run_script(flag)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_format_table_layout():
    report = dict(
        environment=dict(device="cpu", cpu="x", threads=2, dtype="float32", torch="2"),
        config=dict(
            image_size=32, num_channels=128, num_res_blocks=3, attention_resolutions="16,8", repeats=5, warmup=2
        ),
        results=[
            dict(description="one-step CM sampling", batch_size=8, evaluations_per_image=1, median_s=0.5,
                 images_per_s=16.0, peak_memory_mib=900.0, rss_before_setup_mib=300.0, peak_memory_kind="process_rss"),
        ],
    )
    text = benchmark.format_table(report)
    row = [line for line in text.splitlines() if line.startswith("| one-step")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["one-step CM sampling", "8", "1", "500.0", "16.00", "-", "900", "300"]


def test_compare_alternates_two_settings_and_counts_flops():
    args = [*TINY, "--isolate=False", "--benchmarks=onestep", "--compare", "precision=fp32", "precision=bf16"]
    cfg = benchmark.resolve(benchmark.create_argparser().parse_args(args))
    assert [s["precision"] for s in cfg["settings"]] == ["fp32", "bf16"]
    report = benchmark.run_benchmarks(cfg)
    (r,) = report["results"]
    a, b = r["settings"]
    assert (a["setting"]["precision"], b["setting"]["precision"]) == ("fp32", "bf16")
    for s in (a, b):
        assert len(s["seconds"]) == 2 and s["flops_per_iteration"] > 0 and s["gflops_per_s"] > 0
    assert a["flops_per_iteration"] == b["flops_per_iteration"]  # same network, same count
    assert r["speedup"] == pytest.approx(a["median_s"] / b["median_s"])
    text = benchmark.format_table(report)
    assert "A: float32" in text and "B: bfloat16 autocast" in text
    row = [line for line in text.splitlines() if line.startswith("| one-step")][0]
    assert row.rstrip(" |").endswith("x")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--compare", "precision=fp32", "bogus=1"], "--compare"),
        (["--precision=bf16", "--use_fp16=True"], "contradicts --use_fp16 True"),
        (["--precision=int8"], "--precision must be"),
    ],
)
def test_bad_speed_flags(flags, message):
    with pytest.raises(ValueError, match=message):
        benchmark.resolve(benchmark.create_argparser().parse_args(["--device=cpu", *flags]))
