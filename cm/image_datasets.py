"""Image folders as an endless stream of (images, {"y": labels}) batches.

A data folder holds jpg/jpeg/png/gif files at any depth; a file's class is the
part of its name before the first "_" (CIFAR-10: ``<class>_<index>.png``).
Each rank reads ``files[rank::world]``. Images are resized like ADM/guided
diffusion (``center_crop_arr`` / ``random_crop_arr``) and scaled to [-1, 1].

Problems surface as ``DataError``, a ValueError whose message is one line
naming the offending path, raised by ``load_data`` itself, before any batch:
a missing or image-less folder, a file without a class prefix when classes are
asked for, a shard smaller than the batch, and a file that does not open as
an image. The up-front image check is Pillow's cheap ``open`` + ``verify``
(header and, for PNG, chunk checksums: about 0.1 ms per CIFAR image, done by
each rank on its own shard only). A file that passes it but still fails to
decode later is reported the same way, as a one-line DataError raised in the
main process when its batch is due.
"""

import math
import random

import blobfile as bf
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cm import dist_util

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")


class DataError(ValueError):
    """A data problem, reported as a single line that names the path at fault."""

    def __init__(self, message):
        super().__init__(" ".join(str(message).split()))


# ----------------------------------------------------------------------------
# Files and classes


def list_image_files(data_dir):
    """Every image under ``data_dir``: names sorted per folder, subfolders expanded in place."""
    found = []
    for entry in sorted(bf.listdir(data_dir)):
        path = bf.join(data_dir, entry)
        ext = entry.rsplit(".", 1)[-1].lower() if "." in entry else ""
        if ext in IMAGE_EXTENSIONS:
            found.append(path)
        elif bf.isdir(path):
            found.extend(list_image_files(path))
    return found


def class_name(path):
    """The class of an image file: its base name up to the first '_'."""
    return bf.basename(path).split("_")[0]


def class_ids(paths):
    """Integer label of each path; class names sorted, then numbered 0..K-1."""
    for path in paths:
        if "_" not in bf.basename(path):
            raise DataError(f"class_cond is on but the file name has no '<class>_' prefix: {path}")
    names = [class_name(p) for p in paths]
    index = {name: i for i, name in enumerate(sorted(set(names)))}
    return [index[n] for n in names]


def check_image(path):
    """Raise DataError naming ``path`` unless Pillow can open and verify it."""
    try:
        with bf.BlobFile(path, "rb") as f, Image.open(f) as img:
            img.verify()
    except Exception as exc:  # any decode failure means the same thing here
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from None


# ----------------------------------------------------------------------------
# Preprocessing (ADM / guided-diffusion)


def _halve_while_large(pil_image, target):
    """Box-downsample by 2 while the short side is at least twice ``target``."""
    while min(*pil_image.size) >= 2 * target:
        half = tuple(side // 2 for side in pil_image.size)
        pil_image = pil_image.resize(half, resample=Image.BOX)
    return pil_image


def _short_side_to(pil_image, target):
    """Bicubic resize so the short side is ``target`` (sides rounded)."""
    scale = target / min(*pil_image.size)
    size = tuple(round(side * scale) for side in pil_image.size)
    return pil_image.resize(size, resample=Image.BICUBIC)


def center_crop_arr(pil_image, image_size):
    """Resize the short side to ``image_size`` and cut the central square (HWC uint8)."""
    pil_image = _short_side_to(_halve_while_large(pil_image, image_size), image_size)
    arr = np.array(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def random_crop_arr(pil_image, image_size, min_crop_frac=0.8, max_crop_frac=1.0):
    """Resize the short side to a random size in [size/max_frac, size/min_frac], crop at random."""
    smallest = math.ceil(image_size / max_crop_frac)
    largest = math.ceil(image_size / min_crop_frac)
    short = random.randrange(smallest, largest + 1)
    pil_image = _short_side_to(_halve_while_large(pil_image, short), short)
    arr = np.array(pil_image)
    top = random.randrange(arr.shape[0] - image_size + 1)
    left = random.randrange(arr.shape[1] - image_size + 1)
    return arr[top : top + image_size, left : left + image_size]


# ----------------------------------------------------------------------------
# Dataset and loader


class _BadImage:
    """Stands in for a sample whose file failed to decode (kept picklable for workers)."""

    def __init__(self, path, reason):
        self.path = path
        self.reason = reason


class ImageDataset(Dataset):
    """This shard's images as (CHW float32 in [-1, 1], {"y": int64 label} or {})."""

    def __init__(
        self,
        resolution,
        image_paths,
        classes=None,
        shard=0,
        num_shards=1,
        random_crop=False,
        random_flip=True,
    ):
        super().__init__()
        self.resolution = resolution
        self.local_images = image_paths[shard::num_shards]
        self.local_classes = None if classes is None else classes[shard::num_shards]
        self.random_crop = random_crop
        self.random_flip = random_flip

    def __len__(self):
        return len(self.local_images)

    def _load_rgb(self, path):
        """Decode ``path`` fully and convert it to RGB."""
        with bf.BlobFile(path, "rb") as f:
            pil_image = Image.open(f)
            pil_image.load()
        return pil_image.convert("RGB")

    def __getitem__(self, idx):
        path = self.local_images[idx]
        try:
            pil_image = self._load_rgb(path)
        except Exception as exc:  # reported cleanly by the main process
            return _BadImage(path, f"{type(exc).__name__}: {exc}")
        if self.random_crop:
            arr = random_crop_arr(pil_image, self.resolution)
        else:
            arr = center_crop_arr(pil_image, self.resolution)
        if self.random_flip and random.random() < 0.5:
            arr = arr[:, ::-1]
        arr = arr.astype(np.float32) / 127.5 - 1
        out = {}
        if self.local_classes is not None:
            out["y"] = np.array(self.local_classes[idx], dtype=np.int64)
        return np.ascontiguousarray(arr.transpose(2, 0, 1)), out


class PartlyBad:
    """A batch some of whose files failed to decode: the collated rest (or None) and the failures."""

    def __init__(self, good, bad):
        self.good = good
        self.bad = bad


def collate(items):
    """Default collation; samples that failed to decode are set aside in a `PartlyBad`."""
    bad = [item for item in items if isinstance(item, _BadImage)]
    if not bad:
        return torch.utils.data.default_collate(items)
    good = [item for item in items if not isinstance(item, _BadImage)]
    return PartlyBad(torch.utils.data.default_collate(good) if good else None, bad)


def _forever(loader):
    """Yield the loader's batches epoch after epoch, turning decode failures into DataError."""
    while True:
        for batch in loader:
            if isinstance(batch, PartlyBad):
                # Drop the loader first: the traceback keeps this frame alive, and
                # with it the worker processes, for as long as the error is held.
                del loader
                first = batch.bad[0]
                raise DataError(f"cannot read image {first.path}: {first.reason}")
            yield batch


def load_data(
    *,
    data_dir,
    batch_size,
    image_size,
    class_cond=False,
    deterministic=False,
    random_crop=False,
    random_flip=True,
    shard=None,
    num_shards=None,
    num_workers=1,
    check_images=True,
):
    """Check the folder now, then return an endless generator of (images, kwargs).

    images: float32 NCHW in [-1, 1]; kwargs: {"y": int64 labels} when
    ``class_cond``, else {}. ``shard``/``num_shards`` default to this process's
    rank and the world size. ``deterministic`` turns shuffling off.
    ``check_images`` verifies every file of this shard up front.
    """
    if not data_dir:
        raise DataError("unspecified data directory (data_dir is empty)")
    if batch_size < 1 or image_size < 1:
        raise DataError(f"batch_size and image_size must be positive, got {batch_size} and {image_size}")
    if not bf.isdir(data_dir):
        raise DataError(f"data directory not found: {data_dir}")
    all_files = list_image_files(data_dir)
    if not all_files:
        raise DataError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {data_dir}")
    classes = class_ids(all_files) if class_cond else None
    shard = dist_util.get_rank() if shard is None else shard
    num_shards = dist_util.get_world_size() if num_shards is None else num_shards
    if not 0 <= shard < num_shards:
        raise DataError(f"shard {shard} out of range for {num_shards} shards of {data_dir}")
    dataset = ImageDataset(
        image_size,
        all_files,
        classes=classes,
        shard=shard,
        num_shards=num_shards,
        random_crop=random_crop,
        random_flip=random_flip,
    )
    if len(dataset) < batch_size:
        raise DataError(
            f"{data_dir}: shard {shard} of {num_shards} has {len(dataset)} images, "
            f"fewer than batch_size {batch_size}"
        )
    if check_images:
        for path in dataset.local_images:
            check_image(path)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=not deterministic,
        num_workers=num_workers,
        drop_last=True,
        collate_fn=collate,
        persistent_workers=num_workers > 0,
    )
    return _forever(loader)
