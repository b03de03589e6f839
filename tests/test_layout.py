"""The package layout: no import cycles, the core never imports the tools, the original's public names."""

import ast
import importlib
import inspect
import pathlib
import pkgutil

import pytest
import torch

import cm

PACKAGE_DIR = pathlib.Path(cm.__file__).parent


def all_modules():
    """Dotted names of every module of the cm package (subpackages included)."""
    return sorted(m.name for m in pkgutil.walk_packages(cm.__path__, prefix="cm."))


def _module_file(name):
    rel = pathlib.Path(*name.split(".")[1:])
    path = PACKAGE_DIR / rel
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported_cm_modules(name):
    """The cm modules ``name`` imports anywhere in its file (top level or inside functions)."""
    modules = set(all_modules()) | {"cm"}
    path = _module_file(name)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cm."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("cm"):
                continue
            for alias in node.names:  # `from . import x` imports the module cm.x
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return {m for m in found if m in modules and m != name and m != "cm"}


def find_cycle(graph):
    """One import cycle of ``graph`` ({module: imported modules}) as a list, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_every_module_imports():
    for name in all_modules():
        importlib.import_module(name)


def test_no_import_cycles():
    graph = {name: imported_cm_modules(name) for name in all_modules()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_core_never_imports_the_tools():
    for name in all_modules():
        if name.startswith("cm.tools"):
            continue
        tools = sorted(m for m in imported_cm_modules(name) if m.startswith("cm.tools"))
        assert not tools, f"{name} imports {tools}"


def test_subpackages_hold_the_formats_metrics_and_tools():
    names = set(all_modules())
    for sub, members in {
        "formats": ("edm_pickle", "jax_checkpoint", "jax_ncsnpp", "flax_msgpack", "model_files", "cifar10"),
        "metrics": ("evaluation", "inception", "lpips"),
        "tools": ("demo", "demo_editing", "benchmark"),
    }.items():
        for member in members:
            assert f"cm.{sub}.{member}" in names
            assert f"cm.{member}" not in names


def test_the_originals_public_names_import_and_construct():
    from cm import dist_util, fp16_util, logger, losses, nn, resample  # noqa: F401
    from cm.image_datasets import load_data
    from cm.karras_diffusion import KarrasDenoiser, karras_sample
    from cm.random_util import get_generator
    from cm.script_util import (
        add_dict_to_argparser,
        args_to_dict,
        create_ema_and_scales_fn,
        create_model_and_diffusion,
        model_and_diffusion_defaults,
        str2bool,
    )
    from cm.train_util import CMTrainLoop, TrainLoop
    from cm.unet import UNetModel

    defaults = model_and_diffusion_defaults()
    small = dict(defaults, image_size=8, num_channels=32, num_res_blocks=1, attention_resolutions="4",
                 channel_mult="1,2", num_head_channels=8)
    model, diffusion = create_model_and_diffusion(**small)
    assert isinstance(model, UNetModel) and isinstance(diffusion, KarrasDenoiser)
    for method in ("training_losses", "consistency_losses", "progdist_losses"):
        assert callable(getattr(diffusion, method))
    ema_fn = create_ema_and_scales_fn("fixed", 0.95, "fixed", 18, 18, 100, 1)
    assert ema_fn(0) == (0.95, 18)
    assert str2bool("True") is True and str2bool("no") is False
    import argparse

    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, {"lr": 1e-4, "class_cond": False})
    args = parser.parse_args(["--lr", "0.5"])
    assert args_to_dict(args, ["lr", "class_cond"]) == {"lr": 0.5, "class_cond": False}
    gen = get_generator("determ", 4, 0)
    x = gen.randn(4, 3, 8, 8)
    assert x.shape == (4, 3, 8, 8)
    with torch.no_grad():
        out = karras_sample(diffusion, model, (2, 3, 8, 8), steps=2, sampler="euler", generator=get_generator("dummy"))
    assert out.shape == (2, 3, 8, 8)
    for loop in (TrainLoop, CMTrainLoop):
        assert "model" in inspect.signature(TrainLoop.__init__).parameters and callable(loop.run_loop)
    assert callable(load_data) and callable(dist_util.setup_dist) and callable(logger.configure)
    assert callable(fp16_util.MixedPrecisionTrainer) and callable(resample.create_named_schedule_sampler)


@pytest.mark.parametrize("name", ["cm.formats.edm_pickle", "cm.metrics.lpips", "cm.tools.demo"])
def test_moved_modules_keep_their_public_functions(name):
    module = importlib.import_module(name)
    expected = {"cm.formats.edm_pickle": "load_edm_pickle", "cm.metrics.lpips": "load_lpips",
                "cm.tools.demo": "run_demo"}[name]
    assert callable(getattr(module, expected))
