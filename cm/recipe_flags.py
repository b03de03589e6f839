"""cm_train.py's flags of the recipe table's rows: defaults, presets, checks, --init_from.

A row's preset (ECT's CIFAR-10 run, iCT's; `cm.recipes`) replaces the
script's defaults only for the flags the user did not give; the other
training modes keep their defaults untouched. Every check reads the row of
--training_mode: the flags only other rows use, the teacher, --init_from.
"""

import argparse

from .cli import UsageError
from .formats.model_files import load_network_weights
from .jvp import JVP_HELP, JVP_METHODS
from .recipes import P_MEAN, P_STD, RECIPES, get_recipe, modes_using_flag


def recipe_flag_defaults():
    """Flags added to cm_train.py for the recipes (and those a row declares in its ``flag_defaults``)."""
    out = dict(
        init_from="", ect_double=25000, ect_q=2.0, huber_c=0.0, p_mean=P_MEAN, p_std=P_STD,
        tangent_warmup_steps=10000, jvp="ad",  # sCM's; MeanFlow's preset has no warm-up
    )
    for row in RECIPES.values():
        for flag, value in row.flag_defaults.items():
            if out.setdefault(flag, value) != value:
                raise ValueError(f"recipe {row.name} declares --{flag} default {value!r}, another {out[flag]!r}")
    return out


RECIPE_FLAG_HELP = {
    "init_from": "initial weights for ect/ict/sct/meanflow: our .pt (a model file of any run whose network flags "
    "you repeat; a one-time network initialises a --time_inputs 2 one, r's weights zero), an EDM/ECT .pkl (sets "
    "the network flags), or 'none' for random weights; ect requires it",
    "ect_double": "ECT: optimiser steps per stage; t − r shrinks q-fold every stage (ECT's --double counts ticks "
    "of 12.8 kimg = 100 steps at batch 128: its 250 is 25000 here; its 1-hour run's 10000 is 1000000)",
    "ect_q": "ECT: the factor q of r(t, stage) = max(0, t·(1 − (1 + 8σ(−t))/q^(stage+1)))",
    "p_mean": "ect/ict/sct/scd: mean of ln t, the log-normal of noise levels the losses draw from "
    "(ECT and iCT: -1.1; sCM: -1.0)",
    "p_std": "ect/ict/sct/scd: standard deviation of ln t (ECT and iCT: 2.0; sCM: 1.4)",
    "tangent_warmup_steps": "sct/scd/meanflow: the tangent term's weight r = min(1, step/this) (0: full weight "
    "from the start; sCM: 10000, meanflow's preset: 0, FastGen's CIFAR-10 setting)",
    "jvp": JVP_HELP + " (sct/scd/meanflow; fd for networks or settings without forward-mode AD)",
    "huber_c": "pseudo-Huber constant c of the ect/ict distance √(‖Δ‖²+c²)−c (ict default: 0.00054·√(3·image_size²))",
}
for _row in RECIPES.values():
    RECIPE_FLAG_HELP.update(_row.flag_help)


def explicit_flags(parser, argv):
    """Names of the flags given on the command line (abbreviations and --k=v included)."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=parser.allow_abbrev)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            probe.add_argument(*action.option_strings, dest=action.dest, default=argparse.SUPPRESS)
    given, _ = probe.parse_known_args(argv)
    return set(vars(given))


def apply_recipe_preset(args, explicit):
    """Set the row's presets on ``args`` for every flag not in ``explicit``; returns the names set."""
    row = RECIPES.get(args.training_mode)
    preset = row.presets(args) if row is not None else {}
    changed = sorted(k for k in preset if k not in explicit)
    for k in changed:
        setattr(args, k, preset[k])
    return changed


# value checks of the rows' own flags: (test, what it must be)
FLAG_CHECKS = {
    "ect_double": (lambda v: v >= 1, "must be a positive number of steps"),
    "ect_q": (lambda v: v > 1, "must be larger than 1"),
    "p_std": (lambda v: v > 0, "must be positive"),
    "huber_c": (lambda v: v >= 0, "must be non-negative"),
    "tangent_warmup_steps": (lambda v: v >= 0, "must be a non-negative number of steps"),
    "jvp": (lambda v: v in JVP_METHODS, "must be " + " or ".join(JVP_METHODS)),
}
for _row in RECIPES.values():
    FLAG_CHECKS.update(_row.flag_checks)


def check_recipe_args(args, explicit):
    """One-line UsageErrors from the row of --training_mode (before anything is built or written).

    ``explicit``: the flags given on the command line (`explicit_flags`).
    """
    mode = args.training_mode
    row = get_recipe(mode)
    for flag in sorted(explicit):
        users = modes_using_flag(flag)
        if users and flag not in row.flags:
            raise UsageError(f"--{flag} is for --training_mode {' or '.join(users)}, not {mode}")
    if row.init_from == "required" and not args.init_from:
        raise UsageError(
            f"--training_mode {mode} tunes a pretrained model: give --init_from (a .pt of an EDM run), "
            "or --init_from none to start from random weights"
        )
    if row.teacher == "unused" and args.teacher_model_path:
        see = " (see --init_from)" if row.init_from != "unused" else ""
        raise UsageError(f"--teacher_model_path is not used by --training_mode {mode}{see}")
    if row.needs_teacher and not args.teacher_model_path:
        raise UsageError(f"--training_mode {mode} needs --teacher_model_path (an EDM checkpoint)")
    if getattr(args, "time_inputs", 1) != row.time_inputs:
        raise UsageError(f"--training_mode {mode} needs --time_inputs {row.time_inputs}, got {args.time_inputs}")
    for flag in row.flags:
        if flag in FLAG_CHECKS and not FLAG_CHECKS[flag][0](getattr(args, flag)):
            raise UsageError(f"--{flag} {FLAG_CHECKS[flag][1]}, got {getattr(args, flag)}")
    if row.check_args is not None:
        try:
            row.check_args(args)
        except ValueError as e:
            raise UsageError(str(e)) from None


AUGMENT_WEIGHT = "map_augment.weight"


def without_augment_map(args):
    """A run that starts from --init_from (ect, ict, dmd2) feeds no augmentation labels, so a ``map_augment``
    layer would get no gradient (and DDP, which runs with find_unused_parameters off, stops at step 1): build
    the network without it, as ECT does when augmentation is off. Sets ``args.augment_dim`` to 0; returns the
    log line, or None when nothing changed."""
    if get_recipe(args.training_mode).init_from == "unused" or not args.augment_dim:
        return None
    note = (f"--init_from {args.init_from or 'none'}: augment_dim {args.augment_dim}, but this run has no "
            f"augmentation; the network is built without map_augment (its {AUGMENT_WEIGHT} is left out)")
    args.augment_dim = 0
    return note


def load_init_weights(model, path, network=None):
    """Load ``--init_from`` into ``model``; '' or 'none' keeps its (random) weights.

    ``.pt``: a state_dict (a model/EMA file of any of our runs); the network
    flags must describe the same network, else a one-line CheckpointError.
    A self-describing file (an EDM/ECT ``.pkl``, a JAX checkpoint; see
    `cm.formats.model_files`) comes as ``network`` = (model, flags) from
    ``adopt_network_flags``, which has already set the network flags from it.
    A one-time network initialises a ``--time_inputs 2`` model with r's new weights zero.
    """
    if path in ("", "none"):
        return
    leave_out = (AUGMENT_WEIGHT,) if getattr(model, "map_augment", None) is None else ()
    load_network_weights(model, path, network, "init_from", leave_out=leave_out, widen_time=True)
