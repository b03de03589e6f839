"""--precision bf16 reaches every network call of every consistency-loop mode.

Each network of a real (tiny) loop gets a forward pre-hook that records whether
bf16 autocast is on when it runs: the student's call, the EMA target's, the
teacher's (two per Heun step, two Euler steps for progdist) and the r-call of
iCT/ECT (the online network under no_grad). One step of each mode must show
every one of them inside autocast, and each expected network called. The
deliberate exceptions: sCT/sCD's tangent (the JVP on the unwrapped student)
runs in float32 — bf16 forward-mode AD is not accurate enough (README, sCM) —
and so does MeanFlow's JVP pass for du/dt; their gradient passes are inside.
"""

import pytest
import torch

from cm import logger
from cm.meanflow import meanflow_schedule
from cm.recipes import ect_ema_and_scales_fn, ict_ema_and_scales_fn
from cm.schedules import create_ema_and_scales_fn
from cm.train_util import CM_TRAINING_MODES

from test_train_util import build, cm_loop, one_thread, synthetic_data  # noqa: F401  (one_thread: autouse)

SCM_OPTIONS = dict(
    tangent_warmup_steps=10, scm_sigma_max=80.0, jvp="ad", g_norm_spatial_invariance=False,
    divide_x_0_spatial_dim=False, prior_weighting=False, p_mean=-1.0, p_std=1.4,
)


def _scm(teacher):
    """Loop keywords of an sCT/sCD loop: the student carries the log-variance head."""
    from cm.nn import attach_logvar_head
    from cm.scm import tangent_warmup

    model, diffusion = build()
    return dict(model=attach_logvar_head(model), diffusion=diffusion, teacher=teacher, target_model=None,
                ema_scale_fn=lambda step: (0.0, tangent_warmup(step, 10)), loss_options=SCM_OPTIONS)


def _meanflow():
    """Loop keywords of a MeanFlow loop: a two-time student, no target, no warm-up."""
    model, diffusion = build(time_inputs=2)
    return dict(model=model, diffusion=diffusion, teacher=False, target_model=None, ema_scale_fn=meanflow_schedule(0))


def dmd2_critic():
    """dmd2's extra network: a fake score (here not a copy of the teacher) and a bottleneck GAN head."""
    from cm.dmd2_heads import build_discriminator
    from cm.dmd2_train import DMD2Critic

    fake = build(dropout=0.0)[0]
    return {"dmd2_critic": DMD2Critic(fake, build_discriminator("bottleneck", fake, 8), None, lr=1e-3)}


def dmd2_options():
    from cm.dmd2_train import FLAG_DEFAULTS

    return dict(FLAG_DEFAULTS, dmd_gan=True, gan_max_step=10)


# mode -> (loop keywords, {network: fewest calls in one step})
SETUPS = {
    "consistency_distillation": (dict(), {"student": 1, "target": 1, "teacher": 2}),
    "consistency_training": (dict(teacher=False), {"student": 1, "target": 1}),
    "progdist": (dict(ema_scale_fn=create_ema_and_scales_fn("fixed", 0.0, "progdist", 8, 2, 4, 2)),
                 {"student": 1, "teacher": 2}),
    "ict": (dict(teacher=False, target_model=None, ema_scale_fn=ict_ema_and_scales_fn(16)), {"student": 2}),
    "ect": (dict(teacher=False, target_model=None, ema_scale_fn=ect_ema_and_scales_fn(2)), {"student": 2}),
    # the JVP pass is the one float32 call (FLOAT32_CALLS)
    "sct": (lambda: _scm(teacher=False), {"student": 1}),
    "scd": (lambda: _scm(teacher=True), {"student": 1, "teacher": 1}),
    "meanflow": (lambda: _meanflow(), {"student": 2}),
    # the generator once, then 4 fresh samples for the critic; the fake score in the DM and GAN terms and 5 updates
    "dmd2": (dict(target_model=None, ema_scale_fn=lambda step: (0.0, step), loss_options=dmd2_options,
                  extra_networks=dmd2_critic), {"student": 5, "teacher": 1, "fake": 7}),
}
FLOAT32_CALLS = {"sct": ["student"], "scd": ["student"], "meanflow": ["student"]}  # the JVP passes


def record_autocast(module, name, calls):
    def hook(mod, args):
        calls.append((name, torch.is_autocast_enabled(args[0].device.type)))

    return module.register_forward_pre_hook(hook)


def test_every_mode_has_a_setup():
    assert sorted(SETUPS) == sorted(CM_TRAINING_MODES)


@pytest.mark.parametrize("mode", sorted(SETUPS))
def test_bf16_runs_every_network_call_under_autocast(tmp_path, mode):
    kw, expected = SETUPS[mode]
    kw = kw() if callable(kw) else kw
    kw = {k: v() if k in ("extra_networks", "loss_options") and callable(v) else v for k, v in kw.items()}  # fresh per test
    logger.configure(dir=str(tmp_path), format_strs=[])
    try:
        loop = cm_loop(tmp_path, mode, precision="bf16", **kw)
        calls = []
        networks = {"student": loop.model, "target": loop.target_model, "teacher": loop.teacher_model}
        if "dmd2_critic" in loop.extra_networks:
            networks["fake"] = loop.extra_networks["dmd2_critic"].fake
        for name, module in networks.items():
            if module is not None:
                record_autocast(module, name, calls)
        batch, cond = next(synthetic_data())
        loop.run_step(batch, cond)
    finally:
        logger.reset()
    outside = [name for name, on in calls if not on]
    assert outside == FLOAT32_CALLS.get(mode, []), f"{mode}: network calls outside bf16 autocast: {outside}"
    counts = {name: sum(1 for n, _ in calls if n == name) for name in networks}
    for name, fewest in expected.items():
        assert counts[name] >= fewest, (mode, counts)
