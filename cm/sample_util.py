"""Sampling from a checkpoint: flags, checkpoint loading, the reproducible loop, output files.

`scripts/image_sample.py` and `scripts/ternary_search.py` are thin wrappers
over this module.

Reproducibility (SPEC §6, §10.2). Sample k of a run gets the same x_T noise,
the same later sampler noise and the same class label whatever the batch size
and the number of processes:

* noise: the ``--generator`` seeded with ``--seed``, its window moved with
  ``set_done_samples(done)`` before every batch, exactly the stream the
  library call ``karras_sample(generator=get_generator(name, N, seed))`` uses
  for the first batch (so the golden noise is reproduced exactly);
* labels: a second generator of the same kind, seeded with
  ``label_seed(seed)``, with its own window moved the same way. Labels must
  exist before ``karras_sample`` draws x_T, so drawing them from the noise
  generator would shift the noise stream; a separate stream keeps the noise
  untouched. ``--class_labels`` fixes them instead (sample k gets entry
  k mod length);
* order: each process samples indices done + rank + world·j; the gathered
  batches are interleaved back into index order and the padding of the last
  batch is dropped.

The ``dummy`` generator is the unseeded global torch RNG: not reproducible.

The inputs above are exact; byte-identical files also need the network's float
kernels to give each sample the same result in any batch. On CPU at a fixed
thread count they do in our tests (batch 3, 4, 8; 1 or 2 processes); a
different thread count or GPU kernel choice can move a pixel by one level.
"""

import os
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from . import checkpoint, dist_util, run_metadata
from .checkpoint import CheckpointError
from .cli import OneLineArgumentParser, UsageError
from .fileio import write_atomic
from .fp16_util import resolve_use_fp16
from .precision import add_speed_flags, prepare_from_args
from .karras_diffusion import karras_sample
from .meanflow import meanflow_sample, parse_flow_times
from .random_util import get_generator
from .samplers import CHURN_DEFAULTS, FLOW_SAMPLERS
from .recipes import CONSISTENCY_MODES, FLOW_MODES, RECIPES, precond_row, samples_with_boundary_scalings  # noqa: F401
from .script_util import (
    NUM_CLASSES,
    add_dict_to_argparser,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    model_and_diffusion_kwargs,
    sample_defaults,
)

# Golden-ratio offset that separates the label stream from the noise stream.
# torch keeps only the low 32 bits of a CPU seed, so the offset works mod 2**32.
LABEL_SEED_OFFSET = 0x9E3779B9


SAMPLE_HELP = {
    "batch_size": "samples per process per batch (noise and labels of sample k do not depend on it)",
    "num_samples": "number of samples to draw, over all processes",
    "class_labels": "comma list of class ids given to the samples in turn (sample k gets entry k mod length); "
    "empty: labels drawn from a seeded label generator (class_cond only)",
    "generator": "noise generator: determ (one seeded stream, reproducible for any batch/world size), "
    "determ-indiv (one seeded stream per sample), dummy (unseeded global RNG)",
    "sigmas": "comma list of descending noise levels for --sampler multistep instead of --ts, e.g. 80,0.821 "
    "(ECT/iCT two-step); each in [sigma_min, sigma_max], one network call each",
    "training_mode": "how the checkpoint was trained; " + "/".join(CONSISTENCY_MODES) + " use "
    "the consistency-model scalings, edm/progdist the EDM ones, meanflow none (the network's output is u); ect "
    "also ECT's few-step sampler for --sigmas (no clamp in between, x + σ·z)",
    "flow_times": "--sampler meanflow: comma list of decreasing times in [0, 0.999]; one step per pair "
    "x <- x - (t - s)·u(x, t, s) from x = t_0·e (0.999,0: one step; 0.999,0.5,0: two)",
    "sigma_min": "smallest noise level σ_min, where the consistency models' boundary condition sits (default: the "
    "run's own, from the metaNNNNNN.json beside --model_path; else 0.003 for ect, 0.002 otherwise)",
    "quantize": "uint8 conversion of the samples: truncate ((x+1)·127.5 cut down, the original's) or round "
    "(x·127.5+128 cut down, EDM's and ECT's FID pipelines); empty: round for --training_mode ect and EDM/ECT .pkl "
    "files, truncate otherwise",
}


class CheckpointMismatch(UsageError):
    """The checkpoint's keys or shapes do not match the model built from the flags."""


# ----------------------------------------------------------------------------
# Flags


def sample_flag_defaults():
    """Every flag of image_sample.py: sampling + model/diffusion + --class_labels."""
    return dict(**sample_defaults(), **model_and_diffusion_defaults(), class_labels="")


def create_argparser(defaults=None, description=None, help=None):
    """A one-line-error parser with a ``--key`` for every default, typed, with help and choices."""
    parser = OneLineArgumentParser(description=description)
    defaults = sample_flag_defaults() if defaults is None else defaults
    add_dict_to_argparser(parser, defaults, help={**SAMPLE_HELP, **(help or {})})
    add_speed_flags(parser)
    return parser


def _int_list(text, flag):
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} must be a comma list of integers, got {text!r}") from None


def parse_ts(ts, steps, sampler="multistep"):
    """Parse ``--ts`` into a list of ints; None when unused. One-line UsageError when invalid.

    The indices must be strictly ascending and inside the ``steps``-point
    schedule [0, steps-1]; the multistep sampler needs at least two.
    """
    if sampler != "multistep":
        if ts:
            raise UsageError(f"--ts is only used by --sampler multistep (got --sampler {sampler})")
        return None
    if not ts:
        raise UsageError("--sampler multistep needs --ts, a comma list of schedule indices such as 0,22,39")
    values = _int_list(ts, "--ts")
    if len(values) < 2:
        raise UsageError(f"--ts needs at least two indices (the multistep sampler denoises at all but the last), got {ts!r}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise UsageError(f"--ts must be strictly ascending, got {ts!r}")
    if values[0] < 0 or values[-1] > steps - 1:
        raise UsageError(f"--ts indices must lie in [0, {steps - 1}] for --steps {steps}, got {ts!r}")
    return values


def parse_sigmas(text, sampler, sigma_min, sigma_max):
    """Parse ``--sigmas`` into a list of floats; None when empty. One-line UsageError when invalid."""
    if not text:
        return None
    if sampler != "multistep":
        raise UsageError(f"--sigmas is only used by --sampler multistep (got --sampler {sampler})")
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--sigmas must be a comma list of numbers, got {text!r}") from None
    if any(b >= a for a, b in zip(values, values[1:])):
        raise UsageError(f"--sigmas must be strictly decreasing, got {text!r}")
    if not all(sigma_min <= v <= sigma_max for v in values):
        raise UsageError(f"--sigmas must lie in [sigma_min, sigma_max] = [{sigma_min}, {sigma_max}], got {text!r}")
    return values


def parse_class_labels(text, class_cond):
    """Parse ``--class_labels`` into a list of ints in [0, NUM_CLASSES); None when empty."""
    if not text:
        return None
    if not class_cond:
        raise UsageError("--class_labels needs --class_cond True")
    values = _int_list(text, "--class_labels")
    bad = [v for v in values if not 0 <= v < NUM_CLASSES]
    if bad:
        raise UsageError(f"--class_labels must lie in [0, {NUM_CLASSES - 1}], got {bad[0]}")
    return values


def check_common_args(args):
    """Validate the flags every sampling script shares; returns the class label list or None."""
    for flag in ("num_samples", "batch_size", "steps"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be positive, got {getattr(args, flag)}")
    if not args.model_path:
        raise UsageError("--model_path is required: the checkpoint to sample from")
    return parse_class_labels(args.class_labels, args.class_cond)


def check_flow_args(args):
    """--sampler meanflow ⇔ --training_mode meanflow, which needs --time_inputs 2; returns the flow times or None."""
    flow = args.sampler in FLOW_SAMPLERS
    if flow != (args.training_mode in FLOW_MODES):
        raise UsageError(
            f"--sampler {args.sampler} does not sample --training_mode {args.training_mode} models: "
            "--training_mode meanflow goes with --sampler meanflow (and only it)"
        )
    if not flow:
        return None
    if args.time_inputs != RECIPES[args.training_mode].time_inputs:
        raise UsageError(
            f"--training_mode {args.training_mode} networks have two time inputs (t, r): give --time_inputs 2"
        )
    try:
        return parse_flow_times(getattr(args, "flow_times", "0.999,0"))
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_sample_args(args):
    """Validate image_sample.py's flags; returns (ts list or None, class label list or None)."""
    class_labels = check_common_args(args)
    check_flow_args(args)
    if parse_sigmas(getattr(args, "sigmas", ""), args.sampler, args.sigma_min, args.sigma_max):
        if args.ts:
            raise UsageError("--ts and --sigmas both given; the multistep sampler takes one of them")
        return None, class_labels
    return parse_ts(args.ts, args.steps, args.sampler), class_labels


# the original's name of "samples with the boundary-condition scalings" (a row of the recipe table)
uses_distillation = samples_with_boundary_scalings


def resolve_sampling(args, network=None):
    """Settle σ_min and ``--quantize`` from the model's row; returns (fewstep, [log lines]).

    σ_min, when not given: the run's own (the ``metaNNNNNN.json`` of an
    ``ema_*``/``model*`` file of the same training mode), else the row's (0.003
    for ECT, whose networks have it; 0.002 otherwise). A self-describing file
    has set it already. ``--quantize`` empty: the row's (round for ECT), round
    for any EDM/ECT ``.pkl`` (as their FID pipelines), else truncate (the original).
    """
    row = precond_row(args.training_mode)
    notes = []
    default_min = model_and_diffusion_defaults()["sigma_min"]
    if network is None and args.sigma_min == default_min:
        meta = run_metadata.read_metadata(args.model_path) or {}
        flags = meta.get("flags") or {}
        if flags.get("training_mode") == args.training_mode and "sigma_min" in flags:
            args.sigma_min = float(flags["sigma_min"])
            notes.append(f"sigma_min {args.sigma_min} from the run's metadata beside {args.model_path}")
        elif row["sigma_min"] != default_min:
            args.sigma_min = row["sigma_min"]
            notes.append(f"sigma_min {args.sigma_min}: the {args.training_mode} default")
    if not hasattr(args, "quantize"):  # a script without uint8 files of its own (image_edit.py rounds)
        return row["fewstep"], notes
    if not args.quantize:
        from_pkl = network is not None and network[1].get("precond") is not None
        args.quantize = "round" if from_pkl or row["quantize"] == "round" else "truncate"
    if args.quantize not in QUANTIZE:
        raise UsageError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {args.quantize!r}")
    return row["fewstep"], notes


# ----------------------------------------------------------------------------
# Checkpoints


def load_model_state(model, state_dict, path):
    """`cm.checkpoint.load_model_state`, its error as a CheckpointMismatch with a hint about the flags."""
    try:
        return checkpoint.load_model_state(model, state_dict, path)
    except CheckpointError as e:
        raise CheckpointMismatch(f"{e}; check the model flags (--image_size, --num_channels, --class_cond, ...)") from None


def read_checkpoint(path):
    """`cm.checkpoint.read_checkpoint` with errors attributed to --model_path."""
    try:
        return checkpoint.read_checkpoint(path)
    except (OSError, CheckpointError) as e:
        raise UsageError(f"--model_path: {e}") from None


def load_model_and_diffusion(args, device=None, state_dict=None):
    """Build the model/denoiser from the flags and load ``args.model_path``.

    Returns (model in eval mode on ``device``, diffusion, removed key prefix).
    ``--use_fp16 True`` converts the model only when CUDA is present (else warns once).
    ``state_dict``: weights already read (a self-describing file), instead of reading the path.
    """
    model, diffusion = create_model_and_diffusion(
        **model_and_diffusion_kwargs(args, distillation=uses_distillation(args.training_mode))
    )
    if state_dict is None:
        state_dict = read_checkpoint(args.model_path)
    prefix = load_model_state(model, state_dict, args.model_path)
    model.to(device if device is not None else dist_util.dev())
    if resolve_use_fp16(args.use_fp16):
        model.convert_to_fp16()
    prepare_from_args(model, args, next(model.parameters()).device.type)
    model.eval()
    return model, diffusion, prefix


# ----------------------------------------------------------------------------
# The sampling loop


def label_seed(seed):
    """Seed of the label stream: ``seed`` shifted by a fixed odd constant, mod 2**32."""
    return (int(seed) + LABEL_SEED_OFFSET) % 2**32


def batch_indices(done, batch_size, rank, world_size, num_samples):
    """Sample indices done + rank + world·j (j < batch_size) of this rank, clamped to num_samples−1."""
    idx = done + rank + world_size * torch.arange(batch_size)
    return idx.clamp(max=num_samples - 1)


QUANTIZE = ("truncate", "round")


def to_uint8(x, quantize="truncate"):
    """NCHW float in [−1, 1] → NHWC uint8.

    "truncate": ⌊(x + 1)·127.5⌋, the original script's conversion (about half a
    level darker on average); "round": ⌊x·127.5 + 128⌋ clipped to [0, 255], what
    EDM's and ECT's FID pipelines write, = (x + 1)·127.5 rounded half up.
    """
    if quantize == "truncate":
        v = (x + 1) * 127.5
    elif quantize == "round":
        v = x * 127.5 + 128
    else:
        raise ValueError(f"unknown quantize {quantize!r}; choose one of {', '.join(QUANTIZE)}")
    return v.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def gather_in_index_order(t):
    """All ranks' equal-sized batches, interleaved into sample-index order (rank r holds done+r+world·j)."""
    world = dist_util.get_world_size()
    if world == 1:
        return t.cpu()
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    # stacked [world, batch, ...] → [batch, world, ...] puts index done + j·world + r at row j·world + r
    return torch.stack(parts).transpose(0, 1).reshape(-1, *t.shape[1:]).cpu()


def sample_images(
    model,
    diffusion,
    *,
    num_samples,
    batch_size,
    image_size,
    steps,
    sampler="heun",
    ts=None,
    sigmas=None,
    generator="determ",
    seed=42,
    class_cond=False,
    class_labels=None,
    clip_denoised=True,
    sigma_min=0.002,
    sigma_max=80.0,
    device=None,
    progress=True,
    flow_times=None,
    fewstep="cm",
    quantize="truncate",
    **churn,
):
    """Draw ``num_samples`` samples on all ranks; returns (uint8 NHWC array, int64 labels or None).

    Every rank gets the full result, in sample-index order. ``batch_size`` is
    per process. See the module docstring for what makes it reproducible.
    ``fewstep``: what ``sigmas`` run ("cm" or "ect", see `karras_sample`);
    ``quantize``: the uint8 conversion (`to_uint8`).
    ``churn``: heun/dpm's s_churn, s_tmin, s_tmax, s_noise (`cm.samplers.CHURN_DEFAULTS`).
    ``sampler="meanflow"``: a two-time network stepped over ``flow_times``.
    """
    unknown = sorted(set(churn) - set(CHURN_DEFAULTS))
    if unknown:
        raise TypeError(f"unexpected keyword {unknown[0]!r} (churn keywords: {', '.join(CHURN_DEFAULTS)})")
    device = device if device is not None else dist_util.dev()
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    noise = get_generator(generator, num_samples, seed, rank=rank, world_size=world)
    labels_gen = None
    if class_cond and class_labels is None:
        labels_gen = get_generator(generator, num_samples, label_seed(seed), rank=rank, world_size=world)
    fixed = torch.tensor(class_labels, dtype=torch.long) if class_labels else None

    images, labels = [], []
    bar = tqdm(total=num_samples, desc="sampling", unit="img", disable=not progress or rank != 0)
    for done in range(0, num_samples, world * batch_size):
        noise.set_done_samples(done)
        model_kwargs = {}
        if class_cond:
            if fixed is not None:
                idx = batch_indices(done, batch_size, rank, world, num_samples)
                y = fixed[idx % len(fixed)].to(device)
            else:
                labels_gen.set_done_samples(done)
                y = labels_gen.randint(0, NUM_CLASSES, (batch_size,), device=device)
            model_kwargs["y"] = y
        shape = (batch_size, 3, image_size, image_size)
        if sampler in FLOW_SAMPLERS:
            x = meanflow_sample(model, shape, flow_times, noise, model_kwargs, device).clamp(-1, 1)
        else:
            x = karras_sample(
                diffusion,
                model,
                shape,
                steps=steps,
                clip_denoised=clip_denoised,
                model_kwargs=model_kwargs,
                device=device,
                sigma_min=sigma_min,
                sigma_max=sigma_max,
                sampler=sampler,
                generator=noise,
                ts=ts,
                sigmas=sigmas,
                fewstep=fewstep,
                **churn,
            )
        keep = min(world * batch_size, num_samples - done)  # drop the clamped padding
        images.append(gather_in_index_order(to_uint8(x, quantize))[:keep])
        if class_cond:
            labels.append(gather_in_index_order(model_kwargs["y"].long())[:keep])
        bar.update(keep)
    bar.close()
    arr = torch.cat(images).numpy()
    return arr, (torch.cat(labels).numpy() if class_cond else None)


# ----------------------------------------------------------------------------
# Output files


def samples_filename(images, ext="npz"):
    """``samples_{N}x{H}x{W}x{C}.{ext}`` for a uint8 NHWC array."""
    return "samples_" + "x".join(str(d) for d in images.shape) + "." + ext


def save_npz(path, arrays):
    """``np.savez`` equivalent (``arr_0``, ``arr_1``, … readable by np.load), atomic and byte-reproducible.

    np.savez stamps the current time into the zip entries; a fixed stamp makes the
    same arrays give the same bytes.
    """

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
            for name, value in arrays.items():
                info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                with z.open(info, "w", force_zip64=True) as entry:
                    np.lib.format.write_array(entry, np.asanyarray(value), allow_pickle=False)

    write_atomic(path, write)


def image_grid(images, columns=8):
    """Tile uint8 NHWC images into one HWC image, ``columns`` wide (empty cells black)."""
    n, h, w, c = images.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    grid = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, columns)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = img
    return grid


def save_grid_png(path, images, count=64, columns=8):
    """PNG of the first ``count`` images in a grid, written atomically."""
    from PIL import Image

    grid = image_grid(images[:count], columns)
    write_atomic(path, lambda f: Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(f, format="PNG"))


def save_samples(folder, images, labels=None):
    """Write ``samples_{N}x{H}x{W}x3.npz`` (arr_0 images[, arr_1 labels]) and a PNG grid; returns both paths."""
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = labels
    npz_path = os.path.join(folder, samples_filename(images, "npz"))
    png_path = os.path.join(folder, samples_filename(images, "png"))
    save_npz(npz_path, arrays)
    save_grid_png(png_path, images)
    return npz_path, png_path
