"""cm_train.py's flags of the iCT and ECT recipes: defaults, per-recipe presets, --init_from.

A recipe's preset (ECT's CIFAR-10 run, iCT's) replaces the script's defaults
only for the flags the user did not give; the other training modes keep
their defaults untouched.
"""

import argparse

from .cli import UsageError
from .formats.model_files import load_network_weights
from .recipes import P_MEAN, P_STD, RECIPE_MODES, pseudo_huber_c


def recipe_flag_defaults():
    """Flags added to cm_train.py for the recipes."""
    return dict(init_from="", ect_double=25000, ect_q=2.0, huber_c=0.0, p_mean=P_MEAN, p_std=P_STD)


RECIPE_FLAG_HELP = {
    "init_from": "initial weights for ect/ict: our .pt (a model file of any run whose network flags you repeat), "
    "an EDM/ECT .pkl (sets the network flags), or 'none' for random weights; ect requires it",
    "ect_double": "ECT: steps per stage; t − r halves every stage (ECT's 250 ticks at batch 128)",
    "ect_q": "ECT: the factor q of r(t, stage) = max(0, t·(1 − (1 + 8σ(−t))/q^(stage+1)))",
    "p_mean": "ect/ict: mean of ln t, the log-normal of noise levels the losses draw from (ECT and iCT: -1.1)",
    "p_std": "ect/ict: standard deviation of ln t (ECT and iCT: 2.0)",
    "huber_c": "pseudo-Huber constant c of the ect/ict distance √(‖Δ‖²+c²)−c (ict default: 0.00054·√(3·image_size²))",
}

# ECT's CIFAR-10 run (Geng et al. 2024): 12.8 Mimg at batch 128, RAdam 1e-4, dropout 0.2, no augmentation.
# iCT's CIFAR-10 run (Song & Dhariwal 2023): 400k steps at batch 1024, dropout 0.3, EMA 0.99993, s0 10, s1 1280.
RECIPE_PRESETS = {
    "ect": dict(
        lr=1e-4, global_batch_size=128, dropout=0.2, ema_rate="0.9999", total_training_steps=100000, random_flip=False
    ),
    "ict": dict(
        lr=1e-4,
        global_batch_size=1024,
        dropout=0.3,
        ema_rate="0.99993",
        total_training_steps=400000,
        start_scales=10,
        end_scales=1280,
        random_flip=False,
    ),
}


def explicit_flags(parser, argv):
    """Names of the flags given on the command line (abbreviations and --k=v included)."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=parser.allow_abbrev)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            probe.add_argument(*action.option_strings, dest=action.dest, default=argparse.SUPPRESS)
    given, _ = probe.parse_known_args(argv)
    return set(vars(given))


def apply_recipe_preset(args, explicit):
    """Set the recipe's preset on ``args`` for every flag not in ``explicit``; returns the names set."""
    preset = dict(RECIPE_PRESETS.get(args.training_mode, {}))
    if args.training_mode == "ict":
        preset["huber_c"] = pseudo_huber_c(3 * args.image_size**2)
    changed = sorted(k for k in preset if k not in explicit)
    for k in changed:
        setattr(args, k, preset[k])
    return changed


def check_recipe_args(args):
    """One-line UsageErrors for the recipe flags (before anything is built or written)."""
    if args.training_mode not in RECIPE_MODES:
        if args.init_from:
            raise UsageError(f"--init_from is for --training_mode ect or ict, not {args.training_mode}")
        return
    if args.training_mode == "ect" and not args.init_from:
        raise UsageError(
            "--training_mode ect tunes a pretrained model: give --init_from (a .pt of an EDM run), "
            "or --init_from none to start from random weights"
        )
    if args.teacher_model_path:
        raise UsageError(f"--teacher_model_path is not used by --training_mode {args.training_mode} (see --init_from)")
    if args.ect_double < 1:
        raise UsageError(f"--ect_double must be a positive number of steps, got {args.ect_double}")
    if args.ect_q <= 1:
        raise UsageError(f"--ect_q must be larger than 1, got {args.ect_q}")
    if not args.p_std > 0:
        raise UsageError(f"--p_std must be positive, got {args.p_std}")
    if args.huber_c < 0:
        raise UsageError(f"--huber_c must be non-negative, got {args.huber_c}")


def load_init_weights(model, path, network=None):
    """Load ``--init_from`` into ``model``; '' or 'none' keeps its (random) weights.

    ``.pt``: a state_dict (a model/EMA file of any of our runs); the network
    flags must describe the same network, else a one-line CheckpointError.
    A self-describing file (an EDM/ECT ``.pkl``, a JAX checkpoint; see
    `cm.formats.model_files`) comes as ``network`` = (model, flags) from
    ``adopt_network_flags``, which has already set the network flags from it.
    """
    if path in ("", "none"):
        return
    load_network_weights(model, path, network, "init_from")
