"""Training data whose batch k is a function of (seed, rank, k): `StepBatches`.

What the training scripts train on (`load_training_data`): the folder checks,
files, classes and shards of `cm.image_datasets`, visited in an order and with
flips drawn from seeds derived from (seed, rank, epoch or step), so a resumed
run continues on exactly the batches it would have seen.
"""

import warnings

import torch
from torch.utils.data import DataLoader

from . import dist_util, image_datasets
from .random_util import SEED_DATA_ORDER, SEED_FLIPS, derived_seed


class _StepBatchSampler:
    """Index lists of batches start, start+1, ... of a `StepBatches` (endless)."""

    def __init__(self, batches, start):
        self.batches = batches
        self.start = start

    def __iter__(self):
        step = self.start
        while True:
            yield self.batches.indices(step)
            step += 1


class StepBatches:
    """Endless (images, cond) batches where batch k is a function of (seed, rank, k).

    Epoch e = k // (len(dataset) // batch_size) visits this rank's shard in a
    permutation seeded by (seed, rank, e) (the last partial batch is dropped,
    as with ``drop_last``); each batch's left-right flips are drawn from a
    generator seeded by (seed, rank, k). ``seek(k)`` makes the next batch batch
    k, which is how a resumed run continues exactly where it stopped.
    ``dataset`` is an `image_datasets.ImageDataset` built without random flips.
    Images are decoded when their batch is due: an unreadable one is a one-line
    DataError naming it, or with ``skip_bad_images`` a warning, and the batch
    goes on without it.
    """

    def __init__(self, dataset, batch_size, seed=0, rank=None, random_flip=True, num_workers=1,
                 skip_bad_images=False):
        if len(dataset) < batch_size:
            raise ValueError(f"{len(dataset)} images in this shard, fewer than the batch size {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = dist_util.get_rank() if rank is None else rank
        self.random_flip = random_flip
        self.num_workers = num_workers
        self.skip_bad_images = skip_bad_images
        self.steps_per_epoch = len(dataset) // batch_size
        self._step = 0
        self._iter = None
        self._perm = (None, None)

    def indices(self, step):
        """Dataset indices of batch ``step``."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(derived_seed(self.seed, self.rank, epoch, SEED_DATA_ORDER))
            self._perm = (epoch, torch.randperm(len(self.dataset), generator=g))
        return self._perm[1][pos * self.batch_size : (pos + 1) * self.batch_size].tolist()

    def seek(self, step):
        """Make the next batch batch ``step``."""
        if step != self._step or self._iter is None:
            self._iter = None
            self._step = step

    def __iter__(self):
        return self

    def _without_bad_images(self, batch):
        """The readable part of a batch, or a DataError naming the first unreadable file."""
        first = batch.bad[0]
        if not self.skip_bad_images:
            raise image_datasets.DataError(f"cannot read image {first.path}: {first.reason}")
        for item in batch.bad:
            warnings.warn(f"--skip_bad_images: leaving out unreadable image {item.path} ({item.reason})", stacklevel=3)
        if batch.good is None:
            raise image_datasets.DataError(f"every image of batch {self._step} is unreadable, e.g. {first.path}")
        return batch.good

    def __next__(self):
        if self._iter is None:
            loader = DataLoader(
                self.dataset,
                batch_sampler=_StepBatchSampler(self, self._step),
                num_workers=self.num_workers,
                collate_fn=image_datasets.collate,
            )
            self._iter = iter(loader)
        batch = next(self._iter)
        if isinstance(batch, image_datasets.PartlyBad):
            batch = self._without_bad_images(batch)
        images, cond = batch
        if self.random_flip:
            g = torch.Generator().manual_seed(derived_seed(self.seed, self.rank, self._step, SEED_FLIPS))
            flip = torch.rand(images.shape[0], generator=g) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        self._step += 1
        return images, cond


def load_training_data(
    *, data_dir, batch_size, image_size, class_cond=False, seed=0, random_flip=True, num_workers=1,
    skip_bad_images=False,
):
    """This rank's training batches as `StepBatches`, after `image_datasets.load_data`'s checks.

    The folder is validated by ``load_data`` itself (same one-line DataErrors);
    its files, classes, sharding and preprocessing are reused as they are.
    Images are not opened up front (50k files): each is decoded when first due.
    """
    image_datasets.load_data(
        data_dir=data_dir,
        batch_size=batch_size,
        image_size=image_size,
        class_cond=class_cond,
        num_workers=0,
        check_images=False,
    )
    files = image_datasets.list_image_files(data_dir)
    classes = image_datasets.class_ids(files) if class_cond else None
    dataset = image_datasets.ImageDataset(
        image_size,
        files,
        classes=classes,
        shard=dist_util.get_rank(),
        num_shards=dist_util.get_world_size(),
        random_flip=False,
    )
    return StepBatches(
        dataset, batch_size, seed=seed, random_flip=random_flip, num_workers=num_workers,
        skip_bad_images=skip_bad_images,
    )
