"""Throughput of the hot loops, in images per second, with peak memory.

* ``edm_train``: one EDM training step of `cm.train_util.TrainLoop` (log-normal
  σ, forward, backward, RAdam, EMA update);
* ``cd_train``: one consistency-distillation step of `CMTrainLoop` (teacher
  Heun step = 2 teacher evaluations, target evaluation, student forward and
  backward, RAdam, EMA and target-EMA updates);
* ``ect_train``: one ECT step (student forward and backward, the r-call of the
  online network under no_grad, RAdam, EMA);
* ``sct_train`` / ``scd_train``: one sCT / sCD step past the tangent warm-up
  (student forward and backward, the forward-mode JVP of the student in
  float32, for sCD one teacher evaluation, RAdam, EMA);
* ``meanflow_train``: one MeanFlow step of `CMTrainLoop` on the same network
  with a second time input (du/dt by a forward-mode JVP pass without gradient,
  then the forward and backward of u, Adam, EMA update);
* ``onestep``: one-step consistency sampling (`karras_sample`, sampler onestep);
* ``heun_step``: one step of the Heun sampler between two adjacent levels of an
  18-level schedule (2 evaluations; a whole 18-step sample costs 17.5 of them).

Settings: ``--precision`` (fp32, bf16 autocast, fp16), ``--channels_last`` and
``--compile`` (see `cm.precision`). ``--compare A B`` runs two settings, each a
comma list of flag=value overrides (``precision=fp32 precision=bf16``), in one
process per benchmark, timing their iterations alternately (A, B, A, B, ...) so
that a changing machine load hits both alike, and prints B's speed-up over A.

GFLOP/s: the FLOPs of one iteration are counted once per configuration with
`torch.utils.flop_counter.FlopCounterMode` (eager, before any compilation;
convolutions, matrix products and attention, forward and backward), divided
by the median time.

Method: the objects are built first and not timed; ``warmup`` untimed
iterations, then ``repeats`` timed ones, each bracketed by a CUDA synchronise;
the median is reported (images/s = batch / median seconds). Peak memory: on
CUDA the allocator's peak during the timed part; on a CPU the peak resident
set size of the process, which by default runs each benchmark alone in a fresh
child process (``isolate``), so it includes Python and torch themselves.
"""

import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
import traceback

import torch

from .. import precision as prec
from ..script_util import add_dict_to_argparser, model_and_diffusion_defaults, str2bool
from .benchmark_setups import BENCHMARKS, DESCRIPTIONS, EVALUATIONS, SETUPS  # noqa: F401  (the measure table)

# The CIFAR-10 network of the README's distillation command.
SEED_CONFIG = dict(
    image_size=32,
    num_channels=128,
    num_res_blocks=3,
    attention_resolutions="16,8",
    num_head_channels=32,
    class_cond=True,
    use_scale_shift_norm=True,
    resblock_updown=True,
    dropout=0.0,
)

BENCH_HELP = {
    "benchmarks": "comma list of " + ", ".join(BENCHMARKS),
    "device": "auto (cuda when available), cpu or cuda",
    "batch_size": "images per iteration (-1: 8 on a CPU, 128 on CUDA)",
    "repeats": "timed iterations (the median is reported)",
    "warmup": "untimed iterations first",
    "use_fp16": "auto (float16 on CUDA, float32 on a CPU), True or False; True on a CPU runs float32",
    "dropout": "dropout of the student and the samplers' networks",
    "edm_dropout": "dropout of the EDM network (training step and distillation teacher)",
    "lr": "learning rate of the RAdam steps",
    "ema_rate": "EMA rate(s) updated by the training steps",
    "start_scales": "discretisation steps N of the distillation step",
    "start_ema": "target EMA rate μ of the distillation step",
    "loss_norm": "distance of the distillation step (lpips needs its weights)",
    "lpips_path": "LPIPS weights for --loss_norm lpips (empty: $CM_LPIPS_PATH)",
    "threads": "torch CPU threads (0: torch's default)",
    "isolate": "run each benchmark in a fresh process (clean peak memory)",
    "seed": "seed of the weights and inputs",
    "json": "print one JSON object instead of the table",
    "precision": prec.PRECISION_HELP,
    "channels_last": prec.CHANNELS_LAST_HELP,
    "compile": prec.COMPILE_HELP,
    "compare": "two settings A B, each a comma list of flag=value (e.g. precision=fp32 precision=bf16): "
    "timed alternately in one process, B's speed-up over A printed",
}

# flags a --compare setting may override
COMPARE_FLAGS = ("precision", "channels_last", "compile", "use_fp16")


def benchmark_defaults():
    """Every flag: the model flags (seed configuration) and the benchmark's own."""
    defaults = dict(model_and_diffusion_defaults())
    defaults.update(SEED_CONFIG)
    defaults.update(
        use_fp16="auto",
        benchmarks=",".join(BENCHMARKS),
        device="auto",
        batch_size=-1,
        repeats=5,
        warmup=2,
        edm_dropout=0.1,
        lr=1e-4,
        ema_rate="0.9999",
        start_scales=18,
        start_ema=0.95,
        loss_norm="l2",
        lpips_path="",
        threads=0,
        isolate=True,
        seed=0,
        precision="auto",
        channels_last=False,
        compile=False,
    )
    return defaults


def create_argparser():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dict_to_argparser(parser, benchmark_defaults(), help=BENCH_HELP)
    parser.add_argument("--json", nargs="?", const=True, default=False, type=str2bool, help=BENCH_HELP["json"])
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None, help=BENCH_HELP["compare"])
    return parser


def parse_setting(text):
    """``"precision=bf16,channels_last=True"`` -> {"precision": "bf16", "channels_last": True}."""
    setting = {}
    for item in [i.strip() for i in text.split(",") if i.strip()]:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or key not in COMPARE_FLAGS:
            raise ValueError(f"--compare: {item!r} is not flag=value with a flag among {', '.join(COMPARE_FLAGS)}")
        try:
            setting[key] = value.strip() if key in ("precision", "use_fp16") else str2bool(value.strip())
        except Exception as exc:  # argparse.ArgumentTypeError from str2bool
            raise ValueError(f"--compare: {item!r}: {exc}") from None
    return setting


def _resolve_precision(cfg, cuda):
    """Fill cfg's use_fp16, precision and dtype (the compute dtype's name)."""
    use_fp16 = cfg["use_fp16"]
    if cfg["precision"] in ("", "auto"):
        use_fp16 = cuda if use_fp16 == "auto" else str2bool(use_fp16)
        cfg["precision"] = prec.resolve_precision("auto", use_fp16)
    else:
        explicit = use_fp16 != "auto" and str2bool(use_fp16)
        cfg["precision"] = prec.resolve_precision(cfg["precision"], explicit)
    # float16 only runs on CUDA (cm.fp16_util.resolve_use_fp16 says so once per process)
    if cfg["precision"] == "fp16" and not cuda:
        cfg["precision"] = "fp32"
    cfg["use_fp16"] = cfg["precision"] == "fp16"
    cfg["dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[cfg["precision"]]


def resolve(args):
    """Check the flags and fill in the automatic ones; returns a plain dict."""
    cfg = dict(vars(args))
    names = [b.strip() for b in cfg["benchmarks"].split(",") if b.strip()]
    unknown = [b for b in names if b not in BENCHMARKS]
    if unknown or not names:
        raise ValueError(f"--benchmarks: unknown {unknown or 'empty list'}; choose from {', '.join(BENCHMARKS)}")
    cfg["benchmarks"] = names
    if cfg["device"] == "auto":
        cfg["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg["device"] not in ("cpu", "cuda") and not cfg["device"].startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {cfg['device']!r}")
    if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    cuda = cfg["device"].startswith("cuda")
    if cfg["batch_size"] == -1:
        cfg["batch_size"] = 128 if cuda else 8
    for flag in ("batch_size", "repeats"):
        if cfg[flag] < 1:
            raise ValueError(f"--{flag} must be positive, got {cfg[flag]}")
    if cfg["warmup"] < 0:
        raise ValueError(f"--warmup must be non-negative, got {cfg['warmup']}")
    settings = [{}] if not cfg.get("compare") else [parse_setting(t) for t in cfg["compare"]]
    cfg["settings"] = []
    for setting in settings:
        one = dict(cfg, **setting)
        _resolve_precision(one, cuda)
        cfg["settings"].append({k: one[k] for k in ("precision", "channels_last", "compile", "use_fp16", "dtype")})
    cfg.update(cfg["settings"][0])
    if not cfg.get("compare"):
        cfg["settings"] = None
    return cfg




def _peak_rss_mib():
    """Peak resident set size of this process in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 2**10


def _current_rss_mib():
    """Resident set size of this process now, in MiB (None where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    return None


def count_flops(fn):
    """FLOPs of one call of ``fn`` (eager; torch's FlopCounterMode formulas)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _prepare(name, cfg, device):
    """(step, model, FLOPs per iteration) of one setting; the counted iteration runs eagerly, then compile."""
    step, model, networks = SETUPS[name](cfg, device)
    flops = count_flops(step)
    if cfg["compile"]:
        log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
        for net in networks:
            prec.compile_model(net, device.type, log=log)
    return step, model, flops


def _settings(cfg):
    """The per-setting configurations: one, or the two of --compare."""
    return [dict(cfg, **setting) for setting in cfg.get("settings") or [{}]]


def run_one(name, cfg):
    """Set up and time one benchmark (both --compare settings, alternately) in this process."""
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    rss_start = _current_rss_mib()
    device = torch.device(cfg["device"])
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    prepared = []
    for setting in _settings(cfg):
        torch.manual_seed(cfg["seed"])
        prepared.append((setting, *_prepare(name, setting, device)))
    for _ in range(cfg["warmup"]):
        for _, step, _, _ in prepared:
            step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = [[] for _ in prepared]
    for _ in range(cfg["repeats"]):
        for i, (_, step, _, _) in enumerate(prepared):  # alternate: A, B, A, B, ...
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[i].append(time.perf_counter() - start)
    runs = [_timing(cfg, setting, flops, t) for (setting, _, _, flops), t in zip(prepared, times)]
    model = prepared[0][2]
    result = dict(
        name=name,
        description=DESCRIPTIONS[name],
        batch_size=cfg["batch_size"],
        evaluations_per_image=EVALUATIONS[name],
        parameters=sum(p.numel() for p in model.parameters()),
    )
    if cfg.get("settings"):
        result["settings"] = runs
        result["speedup"] = runs[0]["median_s"] / runs[1]["median_s"]
    else:
        result.update(runs[0])
    if cuda:
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["peak_memory_kind"] = "cuda_allocated"
    else:
        result["peak_memory_mib"] = _peak_rss_mib()
        result["peak_memory_kind"] = "process_rss" if cfg["isolate"] else "process_rss_so_far"
        if rss_start is not None:
            result["rss_before_setup_mib"] = rss_start
    return result


def _timing(cfg, setting, flops, times):
    median = statistics.median(times)
    return dict(
        setting={k: setting[k] for k in ("precision", "channels_last", "compile")},
        seconds=times,
        median_s=median,
        images_per_s=cfg["batch_size"] / median,
        flops_per_iteration=flops,
        gflops_per_s=flops / median / 1e9,
    )


def _child(name, cfg, queue):
    try:
        queue.put(("ok", run_one(name, cfg)))
    except BaseException:  # report anything, including KeyboardInterrupt, to the parent
        queue.put(("error", traceback.format_exc()))


def run_isolated(name, cfg):
    """`run_one` in a fresh spawned process (so its peak RSS is this benchmark's alone)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, cfg, queue))
    proc.start()
    try:
        status, payload = queue.get()
    finally:
        proc.join()
    if status != "ok":
        raise RuntimeError(f"benchmark {name} failed:\n{payload}")
    return payload


def environment(cfg):
    """Where the numbers come from."""
    env = dict(
        torch=torch.__version__,
        python=platform.python_version(),
        device=cfg["device"],
        dtype=cfg["dtype"],
        threads=cfg["threads"] or torch.get_num_threads(),
        cpu=_cpu_name(),
        cpu_count=os.cpu_count(),
    )
    if cfg["device"].startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(cfg["device"]))
    return env


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_benchmarks(cfg, progress=None):
    """Every requested benchmark; returns {"config", "environment", "results"}."""
    results = []
    for name in cfg["benchmarks"]:
        if progress:
            progress(name)
        results.append(run_isolated(name, cfg) if cfg["isolate"] else run_one(name, cfg))
    return dict(
        config={k: cfg[k] for k in [*benchmark_defaults(), "dtype", "compare", "settings"]},
        environment=environment(cfg),
        results=results,
    )


def format_table(report):
    """The results as a text table with a one-line header of the environment."""
    env, cfg = report["environment"], report["config"]
    where = env.get("gpu") or f"{env['cpu']}, {env['threads']} threads"
    head = (
        f"device {env['device']} ({where}), {_setting_name(cfg) if not cfg.get('settings') else 'compare'}, "
        f"torch {env['torch']}; "
        f"image_size {cfg['image_size']}, num_channels {cfg['num_channels']}, num_res_blocks {cfg['num_res_blocks']}, "
        f"attention {cfg['attention_resolutions']}; median of {cfg['repeats']} after {cfg['warmup']} warm-up"
    )
    if cfg.get("settings"):
        return "\n".join([head, "", format_compare(report)])
    header = ("benchmark", "batch", "evals/img", "ms/iter", "images/s", "GFLOP/s", "peak MiB", "before MiB")
    rows = [
        (
            r["description"],
            str(r["batch_size"]),
            str(r["evaluations_per_image"]),
            f"{1000 * r['median_s']:.1f}",
            f"{r['images_per_s']:.2f}",
            f"{r['gflops_per_s']:.1f}" if "gflops_per_s" in r else "-",
            f"{r['peak_memory_mib']:.0f}",
            f"{r['rss_before_setup_mib']:.0f}" if "rss_before_setup_mib" in r else "-",
        )
        for r in report["results"]
    ]
    kinds = {r["peak_memory_kind"] for r in report["results"]}
    note = {
        "cuda_allocated": "peak MiB: CUDA allocator peak during the timed iterations",
        "process_rss": "peak MiB: peak RSS of a fresh process that ran only this benchmark, including Python and "
        "torch (before MiB: its RSS before the networks were built)",
        "process_rss_so_far": "peak MiB: peak RSS of this process so far (run with --isolate True for per-benchmark)",
    }
    return "\n".join([head, "", text_table(header, rows), ""] + [note[k] for k in sorted(kinds)])


def _setting_name(setting):
    """"bf16, channels-last, compiled" style name of a setting."""
    parts = [{"fp32": "float32", "bf16": "bfloat16 autocast", "fp16": "float16"}.get(setting.get("precision"), "?")]
    if setting.get("channels_last"):
        parts.append("channels-last")
    if setting.get("compile"):
        parts.append("compiled")
    return " + ".join(parts)


def format_compare(report):
    """The --compare table: per benchmark both settings' ms/iter, GFLOP/s and B's speed-up over A."""
    a, b = (_setting_name(s) for s in report["config"]["settings"])
    header = ("benchmark", "batch", "A ms/iter", "B ms/iter", "A GFLOP/s", "B GFLOP/s", "speed-up B/A")
    rows = []
    for r in report["results"]:
        ra, rb = r["settings"]
        rows.append(
            (
                r["description"],
                str(r["batch_size"]),
                f"{1000 * ra['median_s']:.1f}",
                f"{1000 * rb['median_s']:.1f}",
                f"{ra['gflops_per_s']:.1f}",
                f"{rb['gflops_per_s']:.1f}",
                f"{r['speedup']:.2f}x",
            )
        )
    lines = [f"A: {a}", f"B: {b}", "", text_table(header, rows), ""]
    lines.append("iterations of A and B alternate in one process; speed-up = median A time / median B time")
    return "\n".join(lines)


def text_table(header, rows):
    """A Markdown-style table: first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells):
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])
