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
    "onestep": (setup_onestep, "one-step CM sampling", 1),
    "heun_step": (setup_heun_step, "one Heun step (EDM sampler)", 2),
}
BENCHMARKS = tuple(MEASURES)
SETUPS = {name: m[0] for name, m in MEASURES.items()}
DESCRIPTIONS = {name: m[1] for name, m in MEASURES.items()}
EVALUATIONS = {name: m[2] for name, m in MEASURES.items()}
