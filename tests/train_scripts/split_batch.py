"""Run cm_train.py / edm_train.py's main() on a FIXED global batch split across the ranks, then dump.

Usage: split_batch.py OUT_DIR GLOBAL_N {edm_train,cm_train} [script flags...]

Every step, rank r of K trains on rows [r·N/K, (r+1)·N/K) of one fixed batch of N
8×8 images, and the consistency loss gets noise that is a function of each
image (instead of the per-(rank, step) random stream; sCT/sCD: σ and z as well). With
``--start_scales 2 --end_scales 2`` the noise levels are fixed too, so the
update of K processes × N/K must equal the one of 1 process × N: what is left
to differ is how gradients are reduced across micro-batches and ranks.
Dumps like run_and_dump.py.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run_and_dump  # noqa: E402
from cm import dist_util, karras_diffusion, step_data  # noqa: E402


def fixed_batches(global_n):
    def load_training_data(*, batch_size, **_):
        images = torch.rand(global_n, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
        rank = dist_util.get_rank()
        mine = images[rank * batch_size : (rank + 1) * batch_size]
        assert mine.shape[0] == batch_size

        def forever():
            while True:
                yield mine.clone(), {}

        return forever()

    return load_training_data


def per_image_noise(losses):
    def consistency_losses(self, model, x_start, num_scales, **kw):
        kw["noise"] = torch.sin(7.0 * x_start + 1.0)
        return losses(self, model, x_start, num_scales, **kw)

    return consistency_losses


def per_image_scm(losses):
    """sCT/sCD: σ and z as functions of each image too (instead of the per-(rank, step) stream)."""

    def scm_training_losses(model, module, x_start, r, settings, **kw):
        kw["sigma"] = torch.exp(torch.sin(3.0 * x_start.flatten(1).sum(dim=1)))
        kw["z"] = 0.5 * torch.sin(7.0 * x_start + 1.0)
        return losses(model, module, x_start, r, settings, **kw)

    return scm_training_losses


if __name__ == "__main__":
    out_dir, global_n = sys.argv[1], int(sys.argv[2])
    step_data.load_training_data = fixed_batches(global_n)  # what the scripts' shared builder calls
    karras_diffusion.KarrasDenoiser.consistency_losses = per_image_noise(
        karras_diffusion.KarrasDenoiser.consistency_losses
    )
    from cm import scm  # noqa: E402

    scm.scm_training_losses = per_image_scm(scm.scm_training_losses)
    sys.argv = [sys.argv[0], out_dir] + sys.argv[3:]
    run_and_dump.main()
