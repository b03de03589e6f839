"""The whole method on scikit-learn's 8x8 digits, on a CPU: EDM teacher, CD, ECT, iCT, samples, table.

  python scripts/demo.py --out demo_out          # the full run (under fifteen minutes on 2 cores)
  python scripts/demo.py --out /tmp/q --quick    # a one-minute smoke run (CI)

Every flag below overrides the preset; see cm/demo.py for what each stage does.
"""

import argparse
import dataclasses
import os
import sys

try:
    import cm  # noqa: F401
except ImportError:  # a checkout that is not pip-installed: use the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cm.cli import OneLineArgumentParser
from cm.tools.demo import DemoConfig, DemoError, default_config, quick_config, run_demo
from cm.precision import PRECISIONS

HELP = {
    "image_size": "side of the digits in pixels (8: native; larger: bicubic upscaling, with a matching "
    "--channel_mult)",
    "num_channels": "UNet base channels",
    "num_res_blocks": "UNet residual blocks per level",
    "channel_mult": "UNet channel multipliers per level",
    "attention_resolutions": "resolutions (pixels) with attention",
    "num_head_channels": "channels per attention head",
    "edm_steps": "EDM teacher training steps",
    "edm_batch_size": "EDM batch size",
    "edm_lr": "EDM learning rate",
    "edm_ema_rate": "EMA rate of the teacher weights used for sampling and distillation",
    "cd_steps": "consistency distillation steps",
    "cd_batch_size": "consistency distillation batch size",
    "cd_lr": "consistency distillation learning rate",
    "cd_ema_rate": "EMA rate of the student weights used for sampling",
    "start_scales": "discretisation steps N of consistency distillation",
    "start_ema": "target network EMA rate μ",
    "loss_norm": "consistency distance (l1, l2, l2-32; lpips needs weights)",
    "recipe_steps": "steps of every recipe stage (0: the CD stage's training compute in counted network passes, "
    "see cm/tools/demo_recipes.py)",
    "ect_lr": "ECT learning rate",
    "ect_double": "ECT steps per stage (t - r halves every stage)",
    "ect_dropout": "ECT dropout (both calls of a step share the mask)",
    "ect_huber_c": "ECT pseudo-Huber constant c",
    "ect_p_mean": "ECT: mean of ln t, the log-normal its noise levels t are drawn from",
    "ict_lr": "iCT learning rate",
    "mf_lr": "MeanFlow learning rate (Adam, the row's optimiser)",
    "sct_steps": "sCT steps (an upper bound: the time budget stops it first)",
    "scd_steps": "sCD steps (an upper bound: the time budget stops it first)",
    "scm_lr": "sCT and sCD learning rate",
    "scm_warmup_steps": "sCT and sCD --tangent_warmup_steps",
    "sct_dropout": "sCT dropout (sCM's CIFAR-10 value 0.2; sCD: 0)",
    "scm_two_step_sigmas": "σ levels of the sCT/sCD two-step rows (the paper's t_mid 1.1: σ 0.982)",
    "recipe_batch_size": "ECT and iCT batch size",
    "recipe_ema_rate": "EMA rate of the ECT and iCT weights used for sampling",
    "two_step_sigmas": "noise levels of the ECT/iCT two-step sampler",
    "num_samples": "samples per sampler (labels cycle through the 10 classes)",
    "edm_eval_interval": "the EDM teacher's Fréchet distance during training every this many steps (0: off)",
    "cm_eval_interval": "CD's, ECT's and iCT's Fréchet distance during training every this many steps (0: off)",
    "eval_num_samples": "fixed-noise samples per Fréchet distance during training",
    "sample_batch_size": "sampling batch size",
    "heun_steps": "noise levels of the teacher's Heun sampler (2n-1 evaluations)",
    "cm_steps": "length of the ρ-schedule that --two_step_ts indexes",
    "two_step_ts": "schedule indices of the two-step consistency sampler",
    "edit_images": "held-out digits inpainted (right half) and super-resolved (x2) by the distilled model",
    "edit_ts": "schedule indices (of --cm_steps) of the editing sampler",
    "classifier_epochs": "epochs of the judging classifier",
    "heldout_fraction": "fraction of the digits held out for evaluation",
    "log_interval": "steps between logged training rows",
    "dmd2_lr": "lr of the DMD2 generator and fake score",
    "dmd2_ratio": "DMD2 fake-score updates per generator update",
    "dmd2_warmup": "DMD2 lr warm-up iterations",
    "dmd2_gan_max_step": "DMD2 + GAN: the head's inputs are noised at a grid level below this",
    "seed": "seed of the split, classifier, training and sampling",
    "precision": "network arithmetic of training and sampling: fp32 or bf16 (autocast, float32 weights)",
}


def main(argv=None):
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--out", default="demo_out", help="output folder (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="tiny preset for CI: runs every stage in about a minute")
    for field in dataclasses.fields(DemoConfig):
        parser.add_argument(f"--{field.name}", type=field.type,
                            default=None, help=f"{HELP[field.name]} (default: {field.default}; --quick may differ)")
    args = parser.parse_args(argv)
    cfg = quick_config() if args.quick else default_config()
    fields = [f.name for f in dataclasses.fields(DemoConfig)]
    overrides = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    if cfg.precision not in PRECISIONS:
        parser.error(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    try:
        run_demo(args.out, cfg)
    except DemoError as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
