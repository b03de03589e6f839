"""Optimiser files in the original's float16 layout, and conversion both ways.

With ``--use_fp16 True`` the original keeps its float32 master weights as TWO
flat tensors: every parameter with ndim <= 1 (in ``named_parameters`` order)
concatenated into one vector, then every parameter with ndim > 1 flattened
into one [1, M] row; RAdam's state (exp_avg, exp_avg_sq) has those shapes.
Here every parameter has its own master and its own optimiser state (in float32
and float16 runs alike), which is also the original's float32 layout.

`to_per_parameter` reads the original's flat file for our loop; `to_original`
writes ours for the original's float16 loop:

  python -m cm.opt_layout OPT_IN MODEL_FILE OPT_OUT    (ours -> the original's fp16 layout)
"""

import sys

import torch

from .checkpoint import CheckpointError


def _groups(shapes):
    """[[indices of ndim <= 1 params], [indices of ndim > 1 params]] in model order."""
    small = [i for i, s in enumerate(shapes) if len(s) <= 1]
    large = [i for i, s in enumerate(shapes) if len(s) > 1]
    return [small, large]


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def is_original_fp16_layout(state, shapes):
    """True when ``state`` holds two flat parameters sized like the model's two groups."""
    saved = [i for g in state.get("param_groups", []) for i in g.get("params", [])]
    if len(saved) != 2 or len(shapes) == 2:
        return False
    sizes = [sum(_numel(shapes[i]) for i in group) for group in _groups(shapes)]
    for index, size in zip(saved, sizes):
        for value in state.get("state", {}).get(index, {}).values():
            if torch.is_tensor(value) and value.ndim > 0 and value.numel() != size:
                return False
    return True


def to_per_parameter(state, shapes):
    """The original's flat float16-layout optimiser state, split into one entry per parameter."""
    saved = [i for g in state["param_groups"] for i in g["params"]]
    per_param = {}
    for flat_index, group in zip(saved, _groups(shapes)):
        flat_state = state["state"].get(flat_index, {})
        offset = 0
        for i in group:
            n = _numel(shapes[i])
            entry = {}
            for key, value in flat_state.items():
                if torch.is_tensor(value) and value.ndim > 0:
                    entry[key] = value.reshape(-1)[offset : offset + n].reshape(shapes[i]).clone()
                elif key == "step":  # older torch kept a Python number
                    entry[key] = torch.as_tensor(value, dtype=torch.float32).clone()
                else:
                    entry[key] = value
            if entry:
                per_param[i] = entry
            offset += n
    groups = [dict(state["param_groups"][0], params=list(range(len(shapes))))]
    return {"state": per_param, "param_groups": groups}


def to_original(state, shapes):
    """Our per-parameter optimiser state in the original's two-flat-tensor float16 layout."""
    flat = {}
    for flat_index, group in enumerate(_groups(shapes)):
        entries = [state["state"].get(i, {}) for i in group]
        if not entries or not all(entries):
            continue
        merged = {}
        for key, value in entries[0].items():
            if torch.is_tensor(value) and value.ndim > 0:
                merged[key] = torch.cat([e[key].reshape(-1) for e in entries])
                if flat_index == 1:
                    merged[key] = merged[key].view(1, -1)
            else:
                merged[key] = value
        flat[flat_index] = merged
    group = {k: v for k, v in state["param_groups"][0].items()}
    group["params"] = [0, 1]
    return {"state": flat, "param_groups": [group]}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        raise ValueError("usage: python -m cm.opt_layout OPT_IN MODEL_FILE OPT_OUT (three paths)")
    opt_in, model_file, opt_out = argv
    state = torch.load(opt_in, map_location="cpu", weights_only=True)
    model = torch.load(model_file, map_location="cpu", weights_only=True)
    shapes = [tuple(v.shape) for v in model.values() if torch.is_floating_point(v)]
    if len([i for g in state["param_groups"] for i in g["params"]]) != len(shapes):
        raise CheckpointError(f"{opt_in} does not have one optimiser entry per parameter of {model_file}")
    state = {k: v for k, v in state.items() if k != "lg_loss_scale"}
    torch.save(to_original(state, shapes), opt_out)


if __name__ == "__main__":
    from .cli import run_cli

    sys.exit(run_cli(main))
