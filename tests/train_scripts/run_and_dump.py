"""Run scripts/{edm,cm}_train.py's main() in this process, then dump what this rank holds.

Usage: run_and_dump.py OUT_DIR {edm_train,cm_train} [script flags...]

Works plainly, under mpiexec and under torchrun. Writes OUT_DIR/rank{r}.pt with
this rank's master parameters, its step, the world size, and every path this
process passed to torch.save (to check that only rank 0 writes checkpoints).
"""

import importlib.util
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    out_dir, script, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    saved = []
    real_save = torch.save

    def recording_save(obj, f, *args, **kwargs):
        # observe, do not alter: note where this process writes, then save as usual
        saved.append(getattr(f, "name", f))
        return real_save(obj, f, *args, **kwargs)

    torch.save = recording_save
    loop = load_script(script).main(argv)
    torch.save = real_save

    from cm import dist_util

    rank = dist_util.get_rank()
    os.makedirs(out_dir, exist_ok=True)
    torch.save(
        {
            "rank": rank,
            "world": dist_util.get_world_size(),
            "step": loop.step,
            "params": [p.detach().cpu().clone() for p in loop.mp_trainer.master_params],
            "saved": [str(s) for s in saved],
            "ddp": type(loop.ddp_model).__name__,
            "sampler_weights": torch.as_tensor(getattr(loop.schedule_sampler, "weights", lambda: [])()),
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main()
