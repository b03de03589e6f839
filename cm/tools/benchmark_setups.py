"""The benchmark's measures: one setup per name, building what one timed iteration runs.

Each ``setup_<name>(cfg, device)`` returns (step, model, networks): ``step()``
is one iteration, ``model`` the network whose parameters are counted, and
``networks`` what ``--compile`` compiles. A new measure is one setup here and
one entry in `MEASURES` (its description and network evaluations per image).
"""

import torch

from .. import precision as prec
from ..script_util import model_and_diffusion_defaults


def _model_kwargs(cfg, **overrides):
    keys = model_and_diffusion_defaults().keys()
    kwargs = {k: cfg[k] for k in keys}
    kwargs["use_fp16"] = cfg["dtype"] == "float16"
    kwargs.update(overrides)
    return kwargs


def _inputs(cfg, device):
    g = torch.Generator().manual_seed(cfg["seed"])
    n, size = cfg["batch_size"], cfg["image_size"]
    x = (torch.rand(n, 3, size, size, generator=g) * 2 - 1).to(device)
    cond = {"y": torch.randint(0, 10, (n,), generator=g).to(device)} if cfg["class_cond"] else {}
    return x, cond


def _train_loop_kwargs(cfg, model, diffusion):
    return dict(
        model=model,
        diffusion=diffusion,
        data=None,
        batch_size=cfg["batch_size"],
        microbatch=-1,
        lr=cfg["lr"],
        ema_rate=cfg["ema_rate"],
        log_interval=10**9,
        save_interval=0,
        resume_checkpoint="",
        use_fp16=cfg["dtype"] == "float16",
        seed=cfg["seed"],
        precision=cfg["precision"],
    )


def setup_edm_train(cfg, device):
    from ..script_util import create_model_and_diffusion
    from ..train_util import TrainLoop

    model, diffusion = create_model_and_diffusion(**_model_kwargs(cfg, dropout=cfg["edm_dropout"]))
    model.to(device)
    _memory_format(cfg, model)
    loop = TrainLoop(**_train_loop_kwargs(cfg, model, diffusion))
    x, cond = _inputs(cfg, device)
    return lambda: loop.run_step(x, cond), model, [model]


def setup_cd_train(cfg, device):
    from ..script_util import create_ema_and_scales_fn, create_model_and_diffusion
    from ..train_util import CMTrainLoop

    kwargs = _model_kwargs(cfg, distillation=True, loss_norm=cfg["loss_norm"], lpips_path=cfg["lpips_path"] or None)
    model, diffusion = create_model_and_diffusion(**kwargs)
    target, _ = create_model_and_diffusion(**kwargs)
    teacher_kwargs = dict(kwargs, dropout=cfg["edm_dropout"], distillation=False)
    teacher, teacher_diffusion = create_model_and_diffusion(**teacher_kwargs)
    for m in (model, target, teacher):
        m.to(device)
        _memory_format(cfg, m)
    if cfg["loss_norm"] == "lpips":
        diffusion.lpips_loss  # load the weights before timing
    ema_scale_fn = create_ema_and_scales_fn(
        target_ema_mode="fixed",
        start_ema=cfg["start_ema"],
        scale_mode="fixed",
        start_scales=cfg["start_scales"],
        end_scales=cfg["start_scales"],
        total_steps=10**9,
        distill_steps_per_iter=50000,
    )
    loop = CMTrainLoop(
        target_model=target,
        teacher_model=teacher,
        teacher_diffusion=teacher_diffusion,
        training_mode="consistency_distillation",
        ema_scale_fn=ema_scale_fn,
        total_training_steps=10**9,
        **_train_loop_kwargs(cfg, model, diffusion),
    )
    x, cond = _inputs(cfg, device)
    return lambda: loop.run_step(x, cond), model, [model, target, teacher]


SCM_BENCH_OPTIONS = dict(
    tangent_warmup_steps=0, scm_sigma_max=80.0, jvp="ad", g_norm_spatial_invariance=False,
    divide_x_0_spatial_dim=False, prior_weighting=False, p_mean=-1.0, p_std=1.4,
)


def _recipe_train(
    cfg, device, mode, distillation, ema_scale_fn, loss_options, teacher=False, head=False, **network
):
    """One step of a later recipe's row in `CMTrainLoop` (no EMA target); ``network``: model flags."""
    from ..nn import attach_logvar_head
    from ..script_util import create_model_and_diffusion
    from ..train_util import CMTrainLoop

    kwargs = _model_kwargs(cfg, distillation=distillation, loss_norm="l2", **network)
    model, diffusion = create_model_and_diffusion(**kwargs)
    if head:
        attach_logvar_head(model)
    teacher_model = teacher_diffusion = None
    if teacher:
        teacher_model, teacher_diffusion = create_model_and_diffusion(
            **dict(kwargs, dropout=cfg["edm_dropout"], distillation=False)
        )
    networks = [m for m in (model, teacher_model) if m is not None]
    for m in networks:
        m.to(device)
        _memory_format(cfg, m)
    loop = CMTrainLoop(
        target_model=None, teacher_model=teacher_model, teacher_diffusion=teacher_diffusion, training_mode=mode,
        ema_scale_fn=ema_scale_fn, total_training_steps=10**9, loss_options=loss_options,
        **_train_loop_kwargs(cfg, model, diffusion),
    )
    x, cond = _inputs(cfg, device)
    return lambda: loop.run_step(x, cond), model, networks


def setup_ect_train(cfg, device):
    from ..recipes import ect_ema_and_scales_fn

    return _recipe_train(cfg, device, "ect", True, ect_ema_and_scales_fn(25000), dict(ect_q=2.0, huber_c=0.0))


def setup_sct_train(cfg, device):
    # past the tangent warm-up (r = 1): the full loss
    return _recipe_train(cfg, device, "sct", False, lambda step: (0.0, 1.0), SCM_BENCH_OPTIONS, head=True)


def setup_scd_train(cfg, device):
    return _recipe_train(cfg, device, "scd", False, lambda step: (0.0, 1.0), SCM_BENCH_OPTIONS, teacher=True,
                         head=True)


def setup_meanflow_train(cfg, device):
    """One MeanFlow step on the same network with a second time input (EDM's dropout, as edm_train)."""
    from ..meanflow import meanflow_schedule

    return _recipe_train(
        cfg, device, "meanflow", False, meanflow_schedule(0), dict(mf_times="fastgen", jvp="ad"), time_inputs=2,
        dropout=cfg["edm_dropout"],
    )


def _memory_format(cfg, model):
    if cfg["channels_last"]:
        prec.to_channels_last(model)


def _sampling_model(cfg, device, distillation):
    from ..script_util import create_model_and_diffusion

    kwargs = _model_kwargs(cfg, distillation=distillation)
    model, diffusion = create_model_and_diffusion(**kwargs)
    model.to(device)
    if kwargs["use_fp16"]:
        model.convert_to_fp16()
    _memory_format(cfg, model)
    return model.eval(), diffusion


def setup_onestep(cfg, device):
    from ..karras_diffusion import karras_sample
    from ..random_util import get_generator

    model, diffusion = _sampling_model(cfg, device, distillation=True)
    _, cond = _inputs(cfg, device)
    shape = (cfg["batch_size"], 3, cfg["image_size"], cfg["image_size"])
    generator = get_generator("dummy")

    net = prec.wrap(model, cfg["precision"], frozen=True)

    def step():
        return karras_sample(
            diffusion, net, shape, steps=40, model_kwargs=cond, device=device, sampler="onestep",
            sigma_min=cfg["sigma_min"], sigma_max=cfg["sigma_max"], generator=generator,
        )

    return step, model, [model]


def setup_heun_step(cfg, device):
    from ..random_util import get_generator
    from ..samplers import sample_heun
    from ..schedules import get_sigmas_karras

    model, diffusion = _sampling_model(cfg, device, distillation=False)
    _, cond = _inputs(cfg, device)
    # two adjacent levels in the middle of an 18-level schedule: one step with its Heun correction
    sigmas = get_sigmas_karras(18, cfg["sigma_min"], cfg["sigma_max"], device=device)[8:10]
    generator = get_generator("dummy")
    x = generator.randn(cfg["batch_size"], 3, cfg["image_size"], cfg["image_size"], device=device) * sigmas[0]

    net = prec.wrap(model, cfg["precision"], frozen=True)

    def denoiser(x_t, sigma):
        return diffusion.denoise(net, x_t, sigma, **cond)[1].clamp(-1, 1)

    return lambda: sample_heun(denoiser, x, sigmas, generator), model, [model]


# name: (setup, description, network evaluations per image in one iteration; a backward counts as none)
MEASURES = {
    "edm_train": (setup_edm_train, "EDM training step (fwd+bwd, RAdam, EMA)", 1),
    "cd_train": (setup_cd_train, "CD step (teacher Heun + target + student fwd/bwd)", 4),
    "ect_train": (setup_ect_train, "ECT step (student fwd/bwd + no-grad r-call)", 2),
    "sct_train": (setup_sct_train, "sCT step (student fwd/bwd + forward-mode JVP)", 2),
    "scd_train": (setup_scd_train, "sCD step (teacher + student fwd/bwd + forward-mode JVP)", 3),
    "meanflow_train": (setup_meanflow_train, "MeanFlow step (JVP pass + fwd/bwd, Adam, EMA)", 2),
    "onestep": (setup_onestep, "one-step CM sampling", 1),
    "heun_step": (setup_heun_step, "one Heun step (EDM sampler)", 2),
}
BENCHMARKS = tuple(MEASURES)
SETUPS = {name: m[0] for name, m in MEASURES.items()}
DESCRIPTIONS = {name: m[1] for name, m in MEASURES.items()}
EVALUATIONS = {name: m[2] for name, m in MEASURES.items()}
