"""Zero-shot editing from the command line: flags, inputs, degradations, the reproducible loop, files.

`scripts/image_edit.py` is a thin wrapper over this module; the editing math
(observations, replacement, the multistep loop) lives in `cm/editing.py`.

Every task builds, for each of its N items, a start point and the σ list to
walk, then runs `edit_with_sigmas` in batches exactly like `image_sample.py`
(cm/sample_util.py): item k gets row k of every draw of the ``--generator``
seeded with ``--seed`` (first draw: its x_T / start noise, then one per step),
and the batches are interleaved back into index order, so result k is the same
for any ``--batch_size`` and number of processes.

* inpaint / colorize / superres: start at σ_max·z; after every denoise the
  coordinates the observation fixes are put back (CM paper, Alg. 4);
* stroke (SDEdit): start at ``input + strength·z`` and denoise from σ = strength;
* denoise: the inputs plus ``noise_sigma``·n (n from its own seeded stream, drawn
  for all items at once) are themselves the start point at σ = noise_sigma;
* interpolate: pair r's end noises are the x_T of samples 2r and 2r+1 of
  ``image_sample.py --seed S --num_samples 2P``; item r·num_points + j starts at
  σ_max·slerp(z_2r, z_2r+1, j/(num_points−1)).

Stroke and denoise keep the levels of ``--ts``/``--sigmas`` below their start σ
(σ_min if none is).
"""

import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import dist_util
from .cli import UsageError
from .editing import colorize_observation, edit_with_sigmas, inpaint_observation, schedule_sigmas, slerp
from .editing import superres_observation
from .fileio import write_atomic
from .formats.untrusted import UntrustedFileError, check_npz_file
from .image_datasets import DataError, class_ids, list_image_files
from .random_util import get_generator
from .recipes import CONSISTENCY_FUNCTION_MODES
from .samplers import CHURN_DEFAULTS
from .sample_util import (
    parse_sigmas,
    batch_indices,
    check_common_args,
    create_argparser,
    gather_in_index_order,
    image_grid,
    label_seed,
    parse_ts,
    sample_flag_defaults,
    save_npz,
)
from .script_util import NUM_CLASSES, add_dict_to_argparser

TASKS = ("inpaint", "colorize", "superres", "stroke", "interpolate", "denoise")
MASK_PRESETS = ("left", "right", "top", "bottom", "center")
FACTORS = (2, 4)
# the denoise task's noise stream, apart from the x_T stream (seed) and the label stream
DEGRADE_SEED_OFFSET = 0x7F4A7C15

EDIT_HELP = {
    "task": "the edit: " + ", ".join(TASKS),
    "input": "a folder of images (load_data layout, <class>_<name>.png) or an .npz written by image_sample.py "
    "(arr_0 images, arr_1 labels); not used by interpolate",
    "num_images": "edit the first N inputs (0: all); for interpolate the number of seed pairs",
    "mask": "inpaint: a PNG of the image size (white = keep) or the region to fill: "
    + ", ".join(MASK_PRESETS) + " (halves / central square) or box:x0,y0,x1,y1 (pixels, x1 y1 exclusive)",
    "factor": "superres: side of the averaged blocks, 2 or 4",
    "strength": "stroke: the noise level σ at which to start from the input (SDEdit)",
    "noise_sigma": "denoise: std of the Gaussian noise added to the inputs (in [-1, 1] units); also the start σ",
    "num_points": "interpolate: images per pair, both ends included",
    "class_labels": "interpolate on a class-conditional model: comma list of class ids, pair r gets entry r mod "
    "length (empty: drawn like image_sample.py); other tasks take the labels of their inputs",
    "sigmas": "comma list of strictly decreasing noise levels in [sigma_min, sigma_max], one denoising at each, "
    "as image_sample.py (instead of --ts/--steps)",
}


# ----------------------------------------------------------------------------
# Flags


def edit_flag_defaults():
    """image_sample.py's flags less those of other samplers (editing is multistep), plus the edit flags."""
    unused = ("sampler", "num_samples", "clip_denoised", *CHURN_DEFAULTS)  # Heun's / always on
    flags = {k: v for k, v in sample_flag_defaults().items() if k not in unused}
    flags.update(training_mode="consistency_distillation", batch_size=16, ts="", sigmas="")
    flags.update(input="", num_images=0, mask="center", strength=20.0, noise_sigma=0.2, num_points=8)
    return flags


def create_edit_argparser(description=None):
    """One-line-error parser: --task and --factor (with choices), then every flag of `edit_flag_defaults`."""
    parser = create_argparser(defaults={}, description=description)
    parser.add_argument("--task", required=True, choices=TASKS, help=EDIT_HELP["task"])
    parser.add_argument("--factor", type=int, default=2, choices=FACTORS, help=EDIT_HELP["factor"] + " (default: 2)")
    add_dict_to_argparser(parser, edit_flag_defaults(), help=EDIT_HELP)
    return parser


def edit_schedule(args):
    """The σ list from ``--sigmas`` or ``--ts``/``--steps`` (Karras grid between --sigma_min and --sigma_max)."""
    if args.sigmas and args.ts:
        raise UsageError("give either --ts or --sigmas, not both")
    if args.sigmas:
        # As in image_sample.py: one denoising per listed level, then the run ends at σ_min.
        return parse_sigmas(args.sigmas, "multistep", args.sigma_min, args.sigma_max) + [float(args.sigma_min)]
    if not args.ts:
        raise UsageError("editing needs --ts (schedule indices such as 0,22,39) or --sigmas")
    return schedule_sigmas(parse_ts(args.ts, args.steps), args.steps, args.sigma_min, args.sigma_max)


def start_schedule(start, sigmas, sigma_min):
    """[start] + the levels of ``sigmas`` below it (σ_min when none is): stroke and denoise."""
    tail = [s for s in sigmas if s < start]
    return [float(start)] + (tail or [float(sigma_min)])


def check_edit_args(args):
    """Validate the flags; returns (σ list, class label list or None)."""
    if args.training_mode not in CONSISTENCY_FUNCTION_MODES:
        raise UsageError(
            f"--training_mode must be one of {', '.join(CONSISTENCY_FUNCTION_MODES)} for editing, got {args.training_mode}"
        )
    args.num_samples = 1  # no such flag here (the inputs set the count); check_common_args reads it
    class_labels = check_common_args(args)
    if args.num_images < 0:
        raise UsageError(f"--num_images must be >= 0, got {args.num_images}")
    sigmas = edit_schedule(args)
    if args.task == "stroke" and not args.sigma_min < args.strength <= args.sigma_max:
        raise UsageError(f"--strength must lie in ({args.sigma_min:g}, {args.sigma_max:g}], got {args.strength:g}")
    if args.task == "denoise" and not args.sigma_min < args.noise_sigma <= args.sigma_max:
        raise UsageError(f"--noise_sigma must lie in ({args.sigma_min:g}, {args.sigma_max:g}], got {args.noise_sigma:g}")
    if args.task == "interpolate":
        if args.num_points < 2:
            raise UsageError(f"--num_points must be at least 2, got {args.num_points}")
        if args.num_images < 1:
            raise UsageError("--task interpolate needs --num_images, the number of seed pairs")
    elif not args.input:
        raise UsageError(f"--task {args.task} needs --input, a folder of images or an .npz")
    if args.task == "superres" and args.image_size % args.factor:
        raise UsageError(f"--factor {args.factor} does not divide --image_size {args.image_size}")
    return sigmas, class_labels


# ----------------------------------------------------------------------------
# Inputs


def _read_rgb(path):
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as exc:  # any decode failure means the same thing here
        raise UsageError(f"--input: cannot read image {path}: {type(exc).__name__}: {exc}") from None


def _check_size(images, image_size, where):
    if images.shape[1:] != (image_size, image_size, 3):
        h, w = images.shape[1:3]
        raise UsageError(f"--input: {where} is {h}x{w}, the model takes {image_size}x{image_size} RGB (--image_size)")


def load_inputs(path, image_size, class_cond, num_images=0):
    """(uint8 NHWC images, int64 labels or None) from a folder or an image_sample .npz, the first ``num_images``."""
    if not os.path.exists(path):
        raise UsageError(f"--input: not found: {path}")
    labels = None
    if os.path.isdir(path):
        files = list_image_files(path)
        if not files:
            raise UsageError(f"--input: no jpg/jpeg/png/gif images in {path}")
        files = files[:num_images] if num_images else files
        arrays = []
        for f in files:
            img = _read_rgb(f)
            _check_size(img[None], image_size, f"image {f}")
            arrays.append(img)
        images = np.stack(arrays)
        if class_cond:
            try:
                labels = np.asarray(class_ids(files), dtype=np.int64)
            except DataError as e:
                raise UsageError(f"--input: {e}") from None
    else:
        try:
            check_npz_file(path, "--input")  # a regular file whose arrays hold what they declare
        except UntrustedFileError as exc:
            raise UsageError(f"--input: {exc}") from None
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except Exception as exc:
            raise UsageError(f"--input: {path} is neither an image folder nor a readable .npz ({type(exc).__name__})") from None
        if "arr_0" not in data or data["arr_0"].dtype != np.uint8 or data["arr_0"].ndim != 4:
            raise UsageError(f"--input: {path} has no arr_0 of uint8 NHWC images")
        images = data["arr_0"]
        _check_size(images, image_size, f"{path}: arr_0")
        if len(images) == 0:
            raise UsageError(f"--input: {path} holds no images")
        if class_cond:
            if "arr_1" not in data:
                raise UsageError(f"--input: {path} has no arr_1 labels and the model is class-conditional")
            labels = data["arr_1"].astype(np.int64)
        if num_images:
            images, labels = images[:num_images], (labels[:num_images] if labels is not None else None)
    if labels is not None and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise UsageError(f"--input: labels must lie in [0, {NUM_CLASSES - 1}]")
    return images, labels


def _parse_box(spec, size):
    try:
        x0, y0, x1, y1 = (int(v) for v in spec[len("box:"):].split(","))
    except ValueError:
        raise UsageError(f"--mask box must be box:x0,y0,x1,y1 with integers, got {spec!r}") from None
    if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
        raise UsageError(f"--mask {spec}: need 0 <= x0 < x1 <= {size} and 0 <= y0 < y1 <= {size}")
    return x0, y0, x1, y1


def preset_mask(spec, size):
    """[size, size] float keep-mask (1 = keep) with the named region to fill set to 0."""
    half, quarter = size // 2, size // 4
    boxes = {
        "left": (0, 0, half, size), "right": (half, 0, size, size), "top": (0, 0, size, half),
        "bottom": (0, half, size, size), "center": (quarter, quarter, size - quarter, size - quarter),
    }  # fmt: skip
    x0, y0, x1, y1 = _parse_box(spec, size) if spec.startswith("box:") else boxes[spec]
    mask = torch.ones(size, size)
    mask[y0:y1, x0:x1] = 0
    return mask


def load_mask(spec, size):
    """``--mask``: a preset or a PNG of size×size whose white (≥ 128) pixels are kept."""
    if spec in MASK_PRESETS or spec.startswith("box:"):
        return preset_mask(spec, size)
    if not os.path.isfile(spec):
        raise UsageError(
            f"--mask {spec!r} is neither a preset ({', '.join(MASK_PRESETS)}, box:x0,y0,x1,y1) nor a PNG file"
        )
    try:
        with Image.open(spec) as img:
            grey = np.asarray(img.convert("L"))
    except Exception as exc:
        raise UsageError(f"--mask: cannot read {spec}: {type(exc).__name__}") from None
    if grey.shape != (size, size):
        raise UsageError(f"--mask: {spec} is {grey.shape[0]}x{grey.shape[1]}, the images are {size}x{size}")
    return torch.from_numpy((grey >= 128).astype(np.float32))


def to_float(images):
    """uint8 NHWC → NCHW float in [−1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8_rounded(x):
    """NCHW float in [−1, 1] → NHWC uint8, rounded so that kept input pixels come back unchanged.

    (image_sample.py truncates like the original; a truncated round trip of an
    input pixel can lose one level to float rounding.)
    """
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# ----------------------------------------------------------------------------
# Tasks: what each item starts from and what is kept


class EditPlan:
    """Per-item data of a task: reference, replacement, start rule, σ list, labels, extra arrays."""

    def __init__(self, n, sigmas, labels=None, reference=None, replacement=None, start=None, extra=None):
        self.n, self.sigmas, self.labels = n, sigmas, labels
        self.reference, self.replacement = reference, replacement
        self.start = start  # start(idx, z) -> x at sigmas[0]
        self.extra = extra or {}


def interpolation_endpoints(generator, pairs, image_size, seed, class_cond, class_labels):
    """(z of shape [2P,3,H,W], labels of the 2P end samples or None), as image_sample.py draws them."""
    z = get_generator(generator, 2 * pairs, seed, rank=0, world_size=1).randn(2 * pairs, 3, image_size, image_size)
    labels = None
    if class_cond:
        if class_labels:
            labels = torch.tensor(class_labels)[torch.arange(2 * pairs) // 2 % len(class_labels)]  # pair r: entry r
        else:
            labels = get_generator(generator, 2 * pairs, label_seed(seed), rank=0, world_size=1).randint(
                0, NUM_CLASSES, (2 * pairs,)
            )
    return z, labels


def build_plan(args, sigmas, class_labels, images=None, labels=None):
    """The EditPlan of ``args.task`` for float NCHW ``images`` (None for interpolate)."""
    s_max, task = args.sigma_max, args.task
    lab = torch.from_numpy(labels) if labels is not None else None
    if task == "interpolate":
        pairs, m = args.num_images, args.num_points
        z, end_labels = interpolation_endpoints(args.generator, pairs, args.image_size, args.seed, args.class_cond, class_labels)
        pair = torch.arange(pairs * m) // m
        alpha = (torch.arange(pairs * m) % m).double() / (m - 1)
        x_start = slerp(z[2 * pair].double(), z[2 * pair + 1].double(), alpha).float() * s_max
        return EditPlan(
            pairs * m, sigmas, end_labels[2 * pair] if end_labels is not None else None,
            start=lambda idx, _z: x_start[idx], extra={"alphas": alpha.numpy(), "pairs": pair.numpy()},
        )  # fmt: skip
    n = len(images)
    if task == "inpaint":
        mask = load_mask(args.mask, args.image_size)
        reference, replacement = inpaint_observation(images, mask[None])
        masks = np.broadcast_to(mask.numpy().astype(np.uint8)[None], (n, *mask.shape)).copy()
        return EditPlan(n, sigmas, lab, reference, replacement, lambda idx, z: z * s_max, {"masks": masks})
    if task == "colorize":
        reference, replacement = colorize_observation(images)
        return EditPlan(n, sigmas, lab, reference, replacement, lambda idx, z: z * s_max)
    if task == "superres":
        reference, replacement = superres_observation(images, args.factor)
        return EditPlan(n, sigmas, lab, reference, replacement, lambda idx, z: z * s_max)
    if task == "stroke":
        plan_sigmas = start_schedule(args.strength, sigmas, args.sigma_min)
        return EditPlan(n, plan_sigmas, lab, images, None, lambda idx, z: images[idx] + args.strength * z)
    # denoise: the degraded inputs are the start point at σ = noise_sigma
    g = torch.Generator().manual_seed((args.seed + DEGRADE_SEED_OFFSET) % 2**32)
    noisy = images + args.noise_sigma * torch.randn(images.shape, generator=g)
    plan_sigmas = start_schedule(args.noise_sigma, sigmas, args.sigma_min)
    return EditPlan(n, plan_sigmas, lab, noisy, None, lambda idx, z: noisy[idx])


# ----------------------------------------------------------------------------
# The loop


def run_plan(distiller, plan, *, batch_size, shape, generator="determ", seed=42, device=None, sigma_min=0.002, progress=True):
    """Edit all ``plan.n`` items on all ranks; returns the uint8 NHWC results in item order.

    ``distiller(x, sigma, y)`` is the consistency function (y: labels or None).
    """
    device = device if device is not None else dist_util.dev()
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    gen = get_generator(generator, plan.n, seed, rank=rank, world_size=world)
    out = []
    bar = tqdm(total=plan.n, desc="editing", unit="img", disable=not progress or rank != 0)
    for done in range(0, plan.n, world * batch_size):
        gen.set_done_samples(done)
        idx = batch_indices(done, batch_size, rank, world, plan.n)
        z = gen.randn(batch_size, *shape, device=device)
        x = plan.start(idx, z.cpu()).to(device)
        y = plan.labels[idx].to(device) if plan.labels is not None else None
        replace = None
        if plan.replacement is not None:
            known = plan.reference[idx].to(device)
            replace = lambda x0, known=known: plan.replacement(known, x0)  # noqa: E731
        x = edit_with_sigmas(lambda x_t, s: distiller(x_t, s, y), x, plan.sigmas, replace, gen, sigma_min)
        keep = min(world * batch_size, plan.n - done)
        out.append(gather_in_index_order(to_uint8_rounded(x.clamp(-1, 1)))[:keep])
        bar.update(keep)
    bar.close()
    return torch.cat(out).numpy()


# ----------------------------------------------------------------------------
# Output files


def edit_filename(task, images, ext):
    """``{task}_{N}x{H}x{W}x{C}.{ext}``, like image_sample.py's ``samples_…`` names."""
    return f"{task}_" + "x".join(str(d) for d in images.shape) + "." + ext


def edit_grid(results, inputs=None, degraded=None, columns=8, max_items=64, row_length=None):
    """uint8 grid: blocks of ``columns`` items as rows input / degraded / result; or rows of ``row_length`` results."""
    if row_length is not None:  # interpolate: one row per pair
        return image_grid(results[: max(row_length, (max_items // row_length) * row_length)], row_length)
    n = min(len(results), max_items)
    rows = []
    for start in range(0, n, columns):
        for part in (inputs, degraded, results):
            if part is not None:
                block = np.zeros((columns, *results.shape[1:]), dtype=np.uint8)
                chunk = part[start : min(start + columns, n)]
                block[: len(chunk)] = chunk
                rows.append(image_grid(block, columns))
    return np.concatenate(rows, axis=0)


def save_edits(folder, task, results, labels=None, inputs=None, degraded=None, extra=None, row_length=None):
    """Write ``{task}_N…npz`` (arr_0 results, arr_1 labels, inputs, degraded, extra keys) and its PNG grid."""
    arrays = {"arr_0": results}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels, dtype=np.int64)
    for key, value in (("inputs", inputs), ("degraded", degraded), *(extra or {}).items()):
        if value is not None:
            arrays[key] = value
    npz_path = os.path.join(folder, edit_filename(task, results, "npz"))
    png_path = os.path.join(folder, edit_filename(task, results, "png"))
    save_npz(npz_path, arrays)
    grid = edit_grid(results, inputs, degraded, row_length=row_length)
    write_atomic(png_path, lambda f: Image.fromarray(grid).save(f, format="PNG"))
    return npz_path, png_path


def degraded_uint8(plan):
    """The observation each item was edited from, as uint8 NHWC (None for interpolate)."""
    return None if plan.reference is None else to_uint8_rounded(plan.reference.clamp(-1, 1)).numpy()
