"""Sample-quality metrics on FID Inception features: FID, Inception Score, precision/recall.

Images are uint8 NHWC RGB (the sampling script's ``arr_0``). Features are computed
batch by batch (``compute_activations``), so only the uint8 images of one batch and
the float32 features of all images are ever in memory. Statistics are float64.

References: FID, Heusel et al. 2017; IS, Salimans et al. 2016; precision/recall with
k-NN manifolds, Kynkäänniemi et al. 2019 (k = 3).
"""

import contextlib
import os
import zipfile

import numpy as np
import torch
from tqdm import tqdm

from ..fileio import write_atomic

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif")


class EvaluationError(ValueError):
    """A user-facing input problem (missing/malformed file); the message is one line."""


def _one_line(e):
    return " ".join(str(e).split()) or type(e).__name__


# ----------------------------------------------------------------------------------
# Reading images batch by batch


def _npy_header(fp, where):
    """Read a .npy header from an open binary stream: (shape, fortran_order, dtype)."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            return fmt.read_array_header_1_0(fp)
        if version == (2, 0):
            return fmt.read_array_header_2_0(fp)
    except ValueError as e:
        raise EvaluationError(f"{where}: not a valid .npy array ({_one_line(e)})") from None
    raise EvaluationError(f"{where}: unsupported .npy format version {version}")


def _check_image_array(shape, dtype, where):
    if dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3) or shape[0] == 0:
        raise EvaluationError(
            f"{where} must hold uint8 images [N, H, W, 3] with N > 0, got {np.dtype(dtype).name} {list(shape)}"
        )


def _as_rgb(batch):
    return np.repeat(batch, 3, axis=3) if batch.shape[3] == 1 else batch


def npz_keys(path):
    """The array names in an .npz file (one-line EvaluationError if unreadable)."""
    if not os.path.isfile(path):
        raise EvaluationError(f"file not found: {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as e:
        raise EvaluationError(f"{path}: not a readable .npz file ({_one_line(e)})") from None


def npz_images_shape(path, key="arr_0"):
    """Shape [N, H, W, C] of the uint8 images stored under ``key`` in an .npz."""
    if key not in npz_keys(path):
        raise EvaluationError(f"{path}: no array {key!r} (has {npz_keys(path)})")
    with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as fp:
        shape, _, dtype = _npy_header(fp, f"{path}[{key}]")
    _check_image_array(shape, dtype, f"{path}[{key}]")
    return tuple(shape)


def iter_npz_images(path, batch_size, key="arr_0"):
    """Yield uint8 NHWC RGB batches of ``key`` in an .npz, reading the zip member in chunks."""
    where = f"{path}[{key}]"
    n, h, w, c = npz_images_shape(path, key)
    with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as fp:
        _, fortran, _ = _npy_header(fp, where)
        if fortran:
            raise EvaluationError(f"{where}: Fortran-ordered arrays are not supported")
        per_image = h * w * c
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            try:
                buf = fp.read(count * per_image)
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise EvaluationError(f"{where}: corrupt data ({_one_line(e)})") from None
            if len(buf) != count * per_image:
                raise EvaluationError(f"{where}: truncated, expected {n} images")
            yield _as_rgb(np.frombuffer(buf, np.uint8).reshape(count, h, w, c))


def list_image_files(folder):
    """Every png/jpg/jpeg/gif under ``folder``, recursively, sorted."""
    files = []
    for root, _, names in os.walk(folder):
        files += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise EvaluationError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    return sorted(files)


def iter_folder_images(folder, batch_size):
    """Yield uint8 NHWC RGB batches of the images in a folder (all the same size)."""
    from PIL import Image

    files = list_image_files(folder)
    size = None
    for start in range(0, len(files), batch_size):
        batch = []
        for f in files[start : start + batch_size]:
            try:
                with Image.open(f) as im:
                    arr = np.asarray(im.convert("RGB"))
            except OSError as e:
                raise EvaluationError(f"cannot read image {f}: {_one_line(e)}") from None
            size = size or arr.shape
            if arr.shape != size:
                raise EvaluationError(f"{f}: size {arr.shape[:2]} differs from the first image's {size[:2]}")
            batch.append(arr)
        yield np.stack(batch)


def image_batches(source, batch_size):
    """(number of images or None, iterator of uint8 NHWC batches) for any image source.

    ``source``: a path to an .npz (``arr_0``) or .npy, a folder of images, a uint8 NHWC
    array, or an iterable of uint8 NHWC batches.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            return len(list_image_files(path)), iter_folder_images(path, batch_size)
        if not os.path.isfile(path):
            raise EvaluationError(f"file not found: {path}")
        if path.endswith(".npy"):
            try:
                arr = np.load(path, mmap_mode="r")
            except ValueError as e:
                raise EvaluationError(f"{path}: not a valid .npy array ({_one_line(e)})") from None
            return image_batches(arr, batch_size)
        return npz_images_shape(path)[0], iter_npz_images(path, batch_size)
    if isinstance(source, np.ndarray):
        _check_image_array(source.shape, source.dtype, "image array")
        batches = (_as_rgb(np.asarray(source[i : i + batch_size])) for i in range(0, len(source), batch_size))
        return len(source), batches
    return None, iter(source)


# ----------------------------------------------------------------------------------
# Features


@contextlib.contextmanager
def _no_tf32():
    """Features in true float32 on GPUs (cuDNN convolutions default to TF32)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def compute_activations(images, model, batch_size=100, device="cpu", progress=True, desc="features"):
    """Pool3 features [N, 2048] and logits [N, 1008] (float32 numpy) of uint8 NHWC images.

    ``images``: see ``image_batches``; read ``batch_size`` images at a time.
    """
    total, batches = image_batches(images, batch_size)
    pool3, logits, done = [], [], 0
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress)
    with torch.inference_mode(), _no_tf32():
        for batch in batches:
            batch = np.asarray(batch)
            _check_image_array(batch.shape, batch.dtype, "image batch")
            x = torch.from_numpy(np.array(_as_rgb(batch))).to(device).permute(0, 3, 1, 2)  # copy: writable
            p, l = (t.float().cpu().numpy() for t in model(x))
            if total is None:
                pool3.append(p)
                logits.append(l)
            else:  # preallocated: no second copy of 50k features when done
                if not done:
                    pool3 = np.empty((total, p.shape[1]), np.float32)
                    logits = np.empty((total, l.shape[1]), np.float32)
                pool3[done : done + len(p)], logits[done : done + len(l)] = p, l
            done += len(batch)
            bar.update(len(batch))
    bar.close()
    if done == 0:
        raise EvaluationError("no images to evaluate")
    if total is None:
        return np.concatenate(pool3), np.concatenate(logits)
    if done != total:
        raise EvaluationError(f"expected {total} images, read {done}")
    return pool3, logits


def feature_stats(feats, chunk=4096):
    """Mean and (N-1)-normalised covariance in float64, accumulated chunk by chunk."""
    feats = np.asarray(feats)
    n = len(feats)
    if n < 2:
        raise EvaluationError(f"need at least 2 images for a covariance, got {n}")
    mu = np.zeros(feats.shape[1])
    for i in range(0, n, chunk):
        mu += feats[i : i + chunk].astype(np.float64).sum(0)
    mu /= n
    sigma = np.zeros((feats.shape[1], feats.shape[1]))
    for i in range(0, n, chunk):
        d = feats[i : i + chunk].astype(np.float64) - mu
        sigma += d.T @ d
    return mu, sigma / (n - 1)


# ----------------------------------------------------------------------------------
# Metrics


def _psd_eigvals_clean(w):
    """Eigenvalues of a PSD matrix with rounding noise (below the rank tolerance) set to 0."""
    tol = float(np.abs(w).max()) * len(w) * np.finfo(np.float64).eps
    return np.where(w > tol, w, 0.0)


def _sqrt_psd(a):
    """Symmetric square root of a (numerically) positive semi-definite matrix."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(_psd_eigvals_clean(w))) @ v.T


def trace_sqrt_product(sigma1, sigma2):
    """Tr((Σ1 Σ2)^½) = Tr((Σ1^½ Σ2 Σ1^½)^½): the product is similar to a symmetric PSD matrix.

    Eigenvalues below the rank tolerance (max·dim·ε), including those that rounding
    pushes below zero, count as 0: rank-deficient covariances (fewer samples than
    dimensions) stay exact, where the standard scipy ``sqrtm`` route returns small
    imaginary parts and discards them.
    """
    r = _sqrt_psd(sigma1)
    m = r @ sigma2 @ r
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(_psd_eigvals_clean(ev)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """FID = ‖μ1−μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½), in float64.

    If the eigen-decomposition fails or gives a non-finite trace, ``eps`` is added to
    both diagonals and it is recomputed (as the standard implementations do when the
    matrix square root of a near-singular product fails).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise EvaluationError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise EvaluationError("statistics contain NaN or inf")
    try:
        tr_covmean = trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:
        tr_covmean = float("nan")
    if not np.isfinite(tr_covmean):
        offset = np.eye(d) * eps
        tr_covmean = trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def inception_score(logits, splits=10):
    """IS = exp(E_x KL(p(y|x) ‖ p(y))) per split; returns (mean, std) over the splits."""
    logits = np.asarray(logits, np.float64)
    n = len(logits)
    if n < splits:
        raise EvaluationError(f"Inception Score with {splits} splits needs at least {splits} images, got {n}")
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))  # log softmax
    p = np.exp(logp)
    scores = []
    for k in range(splits):
        part_p, part_logp = p[k * n // splits : (k + 1) * n // splits], logp[k * n // splits : (k + 1) * n // splits]
        log_py = np.log(np.maximum(part_p.mean(0), np.finfo(np.float64).tiny))
        kl = (part_p * (part_logp - log_py)).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _pairwise_sq_dists(a, b):
    """Squared Euclidean distances [len(a), len(b)], clamped at 0."""
    d = a.pow(2).sum(1, keepdim=True) - 2.0 * (a @ b.T) + b.pow(2).sum(1)[None, :]
    return d.clamp_min_(0)


def _row_batches(n_rows, n_cols, max_elems):
    step = max(1, min(n_rows, max_elems // max(n_cols, 1)))
    return range(0, n_rows, step), step


def kth_nn_sq_radii(feats, k=3, max_elems=2**25):
    """Squared distance of each row to its k-th nearest other row (k-NN manifold radii)."""
    n = feats.shape[0]
    if n <= k:
        raise EvaluationError(f"k-NN manifold with k={k} needs more than {k} samples, got {n}")
    out = torch.empty(n, dtype=feats.dtype, device=feats.device)
    starts, step = _row_batches(n, n, max_elems)
    for i in starts:
        d = _pairwise_sq_dists(feats[i : i + step], feats)
        # k + 1 smallest: the point itself (distance ~0) is one of them.
        out[i : i + step] = d.topk(k + 1, dim=1, largest=False).values[:, -1]
    return out


def _fraction_in_manifold(queries, manifold, sq_radii, max_elems):
    """Fraction of query rows within the radius of at least one manifold point."""
    inside = 0
    starts, step = _row_batches(len(queries), len(manifold), max_elems)
    for i in starts:
        d = _pairwise_sq_dists(queries[i : i + step], manifold)
        inside += int((d <= sq_radii[None, :]).any(1).sum())
    return inside / len(queries)


def precision_recall(real_feats, fake_feats, k=3, device="cpu", max_elems=2**25):
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    precision = share of fake samples inside the real manifold, recall = share of real
    samples inside the fake manifold. Distances are computed in row blocks of at most
    ``max_elems`` entries, so 50k x 50k needs no N x N matrix.
    """
    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float32, device=device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise EvaluationError(f"feature shapes do not match: {tuple(real.shape)} vs {tuple(fake.shape)}")
    center = real.mean(0)  # smaller norms -> less cancellation in |a|²+|b|²−2ab
    real, fake = real - center, fake - center
    with _no_tf32():
        real_r = kth_nn_sq_radii(real, k, max_elems)
        fake_r = kth_nn_sq_radii(fake, k, max_elems)
        precision = _fraction_in_manifold(fake, real, real_r, max_elems)
        recall = _fraction_in_manifold(real, fake, fake_r, max_elems)
    return precision, recall


# ----------------------------------------------------------------------------------
# Reference statistics


def save_stats(path, mu, sigma, feats=None):
    """Write ``mu``, ``sigma`` (and ``feats`` for precision/recall) to an .npz, atomically."""
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    if feats is not None:
        arrays["feats"] = np.asarray(feats, np.float32)
    write_atomic(path, lambda f: np.savez(f, **arrays))


def load_stats(path):
    """{"mu", "sigma"[, "feats"]} from a stats .npz written by ``save_stats``."""
    keys = npz_keys(path)
    if "mu" not in keys or "sigma" not in keys:
        raise EvaluationError(f"{path}: no 'mu'/'sigma' statistics (has {keys})")
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in ("mu", "sigma", "feats") if k in keys}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise EvaluationError(f"{path}: cannot read statistics ({_one_line(e)})") from None
    d = out["mu"].shape[0] if out["mu"].ndim == 1 else -1
    if d < 1 or out["sigma"].shape != (d, d) or ("feats" in out and out["feats"].shape[1:] != (d,)):
        shapes = {k: list(v.shape) for k, v in out.items()}
        raise EvaluationError(f"{path}: malformed statistics {shapes}")
    return out


def is_stats_file(path):
    """True for an .npz holding ``mu`` and ``sigma``."""
    return os.path.isfile(path) and zipfile.is_zipfile(path) and {"mu", "sigma"} <= set(npz_keys(path))


def reference_stats(source, model=None, batch_size=100, device="cpu", need_feats=False, progress=True):
    """Reference {"mu", "sigma"[, "feats"]} from a stats .npz, an image .npz or an image folder.

    A stats file is used as is; if ``need_feats`` and it holds no ``feats``, they are
    computed from its ``arr_0`` images when present.
    """
    path = os.fspath(source)
    if not os.path.exists(path):
        raise EvaluationError(f"reference not found: {path}")
    stats = load_stats(path) if is_stats_file(path) else None
    if stats is not None and (not need_feats or "feats" in stats):
        return stats
    if stats is not None and "arr_0" not in npz_keys(path):
        raise EvaluationError(
            f"{path}: precision/recall needs reference features ('feats' or 'arr_0' images), it has only mu/sigma"
        )
    if model is None:
        raise EvaluationError(f"{path}: computing reference statistics needs the Inception model")
    feats, _ = compute_activations(path, model, batch_size, device, progress, desc="reference")
    if stats is not None:  # keep the file's mu/sigma, add features for precision/recall
        return dict(stats, feats=feats)
    mu, sigma = feature_stats(feats)
    return {"mu": mu, "sigma": sigma, "feats": feats}


def evaluate(samples, ref, model, batch_size=100, device="cpu", with_precision_recall=False, splits=10, progress=True):
    """FID, IS (and precision/recall) of ``samples`` against the reference ``ref``.

    ``ref`` is a dict from ``reference_stats``. Returns a dict of floats.
    """
    feats, logits = compute_activations(samples, model, batch_size, device, progress, desc="samples")
    mu, sigma = feature_stats(feats)
    is_mean, is_std = inception_score(logits, splits)
    out = {
        "fid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"]),
        "is_mean": is_mean,
        "is_std": is_std,
        "num_samples": int(len(feats)),
    }
    if with_precision_recall:
        if "feats" not in ref:
            raise EvaluationError("precision/recall needs reference features")
        out["precision"], out["recall"] = precision_recall(ref["feats"], feats, device=device)
    return out
