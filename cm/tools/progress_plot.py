"""One PNG of a training run's progress.csv (or several runs overlaid): what a researcher watches.

Panels: the loss (raw, faint, and smoothed), its mean per noise quarter
(``loss_q0``..``loss_q3``, smoothed), the learning rate, the gradient norm,
the steps skipped for non-finite gradients (``bad_steps``) and the FID curves
of the in-training evaluation (every ``fid_*`` column against ``eval_step``;
see `cm.train_eval`). A panel no run has data for is left out. Each run has
one colour, named in the legend by its folder.

matplotlib is an optional dependency (``pip install -e ".[plot]"``); it is
imported only when a plot is drawn, never by the training scripts.
"""

import csv
import math
import os

import numpy as np

from ..cli import UsageError
from ..fileio import write_atomic

LOSS_QUARTERS = ("loss_q0", "loss_q1", "loss_q2", "loss_q3")
QUARTER_STYLES = ("-", "--", "-.", ":")
FID_MARKERS = ("o", "s", "^", "D", "v", "P")


def read_progress(logdir):
    """{column: float array} of ``logdir/progress.csv`` (blank cells NaN); one-line error without one."""
    path = os.path.join(logdir, "progress.csv")
    if not os.path.isfile(path):
        raise UsageError(f"{logdir}: no progress.csv (not the logging dir of a training run)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise UsageError(f"{path}: no logged rows yet")

    def number(text):
        try:
            return float(text)
        except (TypeError, ValueError):
            return math.nan

    return {key: np.array([number(r.get(key)) for r in rows]) for key in rows[0]}


def smooth(values, span=None):
    """Debiased exponential moving average, NaNs skipped; ``span`` (default: 1/20 of the length) sets the decay."""
    values = np.asarray(values, np.float64)
    span = max(1.0, len(values) / 20 if span is None else span)
    alpha = 1.0 - math.exp(-1.0 / span)
    out = np.full_like(values, math.nan)
    mean, weight = 0.0, 0.0
    for i, v in enumerate(values):
        if np.isfinite(v):
            mean = (1 - alpha) * mean + alpha * v
            weight = (1 - alpha) * weight + alpha
        if weight > 0:
            out[i] = mean / weight
    return out


def _series(progress, key, x_key="step"):
    """(x, y) of the rows where both are finite, or None."""
    if key not in progress or x_key not in progress:
        return None
    x, y = progress[x_key], progress[key]
    keep = np.isfinite(x) & np.isfinite(y)
    return (x[keep], y[keep]) if keep.any() else None


def _dots(series):
    """Markers for a series too short to show as a line."""
    return dict(marker="o", ms=4) if len(series[0]) < 3 else {}


def run_names(logdirs):
    """Legend names: each folder's name, with its parent when two runs share a name."""
    names = [os.path.basename(os.path.normpath(d)) or d for d in logdirs]
    if len(set(names)) < len(names):
        names = [os.path.join(*os.path.normpath(d).split(os.sep)[-2:]) for d in logdirs]
    return names


PANELS = ("loss", "quarters", "lr", "grad_norm", "bad_steps", "fid")


def _panels(runs, only=None, fid_title="FID during training", fid_label="FID"):
    """[(title, y label, log scale, draw(ax, progress, colour, name))] of the panels some run has data for.

    ``only``: the `PANELS` keys to draw (default all), in that order.
    """

    def loss(ax, p, c, name):
        s = _series(p, "loss")
        if s is not None:
            ax.plot(*s, color=c, alpha=0.25, lw=0.8)
            ax.plot(s[0], smooth(s[1]), color=c, lw=1.6, label=name, **_dots(s))

    def quarters(ax, p, c, name):
        for key, style in zip(LOSS_QUARTERS, QUARTER_STYLES):
            s = _series(p, key)
            if s is not None:
                ax.plot(s[0], smooth(s[1]), color=c, ls=style, lw=1.3, label=f"{name} {key[-2:]}", **_dots(s))

    def column(key):
        def draw(ax, p, c, name):
            s = _series(p, key)
            if s is not None:
                ax.plot(*s, color=c, lw=1.3, label=name, **_dots(s))

        return draw

    def fid(ax, p, c, name):
        keys = sorted(k for k in p if k.startswith("fid_"))
        for key, marker in zip(keys, FID_MARKERS * len(keys)):
            s = _series(p, key, "eval_step")
            if s is not None:
                ax.plot(*s, color=c, marker=marker, ms=4, lw=1.3, label=f"{name} {key[4:]}")

    def has(keys, x_key="step"):
        return any(_series(p, k, x_key) is not None for p in runs for k in keys)

    fid_keys = sorted({k for p in runs for k in p if k.startswith("fid_")})
    candidates = {
        "loss": ("loss (raw and smoothed)", "loss", True, loss, has(["loss"])),
        "quarters": ("loss per noise quarter (smoothed; q0 lowest σ)", "loss", True, quarters, has(LOSS_QUARTERS)),
        "lr": ("learning rate", "lr", False, column("lr"), has(["lr"])),
        "grad_norm": ("gradient norm", "grad norm", True, column("grad_norm"), has(["grad_norm"])),
        "bad_steps": ("bad steps (skipped, total)", "steps", False, column("bad_steps"), has(["bad_steps"])),
        "fid": (fid_title, fid_label, True, fid, has(fid_keys, "eval_step")),
    }
    keys = PANELS if only is None else only
    unknown = [k for k in keys if k not in candidates]
    if unknown:
        raise ValueError(f"unknown panels {unknown}; choose from {PANELS}")
    return [candidates[k][:4] for k in keys if candidates[k][4]]


def write_progress_plot(
    logdirs, out, names=None, dpi=100, only=None, fid_title="FID during training", fid_label="FID"
):
    """Write the PNG of ``logdirs``' progress.csv to ``out``; returns {panel title: (x0, y0, x1, y1)} pixel boxes.

    Boxes are the panels' plotting areas in the PNG, origin top left.
    ``only``, ``fid_title``, ``fid_label`` (its y axis): see `_panels`.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise UsageError('plotting needs matplotlib: pip install -e ".[plot]"') from None
    logdirs = list(logdirs)
    if not logdirs:
        raise UsageError("give at least one logging dir")
    runs = [read_progress(d) for d in logdirs]
    names = list(names) if names else run_names(logdirs)
    if len(names) != len(runs):
        raise UsageError(f"{len(names)} names for {len(runs)} runs")
    panels = _panels(runs, only, fid_title, fid_label)
    if not panels:
        raise UsageError(f"{', '.join(logdirs)}: no loss, lr, grad_norm, bad_steps or fid_* columns to plot")
    cols = 2 if len(panels) > 1 else 1
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 3.6 * rows), dpi=dpi, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, ylabel, log, draw) in zip(axes.flat, panels):
        for k, (p, name) in enumerate(zip(runs, names)):
            if _series(p, "step") is not None or any(key.startswith("fid_") for key in p):
                draw(ax, p, colours[k % len(colours)], name)
        ys = np.concatenate([line.get_ydata() for line in ax.get_lines()] or [np.ones(1)])
        ys = ys[np.isfinite(ys)]
        if log and ys.size and ys.min() > 0 and ys.max() / ys.min() > 10:  # log only over a decade or more
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", useOffset=False)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.canvas.draw()
    height = fig.canvas.get_width_height()[1]
    boxes = {}
    for ax, (title, *_) in zip(axes.flat, panels):
        b = ax.get_window_extent()
        boxes[title] = (int(b.x0), int(height - b.y1), int(b.x1), int(height - b.y0))
    write_atomic(out, lambda f: fig.savefig(f, format="png", dpi=dpi))
    plt.close(fig)
    return boxes
