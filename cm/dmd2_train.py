"""DMD2 as a row of the consistency loop: the critic network, its optimiser, the loss adapter.

One loop step is one generator update followed by ``--dfake_gen_update_ratio`` (R)
critic updates, i.e. R iterations of the seed's loop (`DMD2.md` §7): iteration
s·R updates the generator on x_g (made before that update) and then the fake
score on the same sg(x_g); iterations s·R + 1 … s·R + R − 1 update the fake score
on fresh one-step samples of the updated generator. The lr warm-up counts
iterations, as the seed's schedulers do (generator: factor (s·R)/warmup;
critic update j: (s·R + j)/warmup). A checkpoint therefore always falls
between two generator updates, and a resumed run repeats the seed-for-step RNG
of every iteration exactly.

The critic (`DMD2Critic`) is the loop's one extra network ``dmd2_critic``: the fake
score and the optional discriminator, with its AdamW optimiser and update count
kept in the module's extra state, so that its checkpoint file holds all of it.
"""

import hashlib

import torch
import torch.nn as nn

from . import dist_util, logger
from .dmd2 import DMD2Options, critic_turn, generate, generator_turn, lr_warmup, realism, scorer

BETAS = (0.9, 0.999)  # DMD2's AdamW for both networks
DMD2_FLAGS = (
    "init_from", "dfake_gen_update_ratio", "lr_warmup_steps", "max_grad_norm", "dmd_variant", "dmd_num_steps",
    "dmd_min_step", "dmd_max_step", "dmd_generator", "dmd_fake_weighting", "dmd_fake_sigma", "dmd_vsd_eps",
    "dmd_gan", "gan_placement", "gan_gen_weight", "gan_disc_weight", "gan_max_step", "fake_lr", "fake_dropout",
)


def options_from(opts):
    """`DMD2Options` from the loop's loss options (flag name → value)."""
    return DMD2Options(
        num_steps=opts["dmd_num_steps"], min_step_pct=opts["dmd_min_step"], max_step_pct=opts["dmd_max_step"],
        vsd_eps=opts["dmd_vsd_eps"], fake_weighting=opts["dmd_fake_weighting"], fake_sigma=opts["dmd_fake_sigma"],
        gan_placement=opts["gan_placement"], gan_gen_weight=opts["gan_gen_weight"],
        gan_disc_weight=opts["gan_disc_weight"], gan_max_step=opts["gan_max_step"],
    )


def _is_autocast(net):
    """The loop's `cm.precision.AutocastModel` (not imported: cm.precision imports the recipe table)."""
    d = getattr(net, "__dict__", {})
    return "model" in d and "precision" in d


def unwrap(net):
    """The module under the loop's wrappers (autocast, DDP)."""
    while True:
        if _is_autocast(net):
            net = net.__dict__["model"]
        elif isinstance(net, nn.parallel.DistributedDataParallel):
            net = net.module
        else:
            return net


def rewrap(like, module):
    """``module`` under the same precision wrapper as ``like`` (a network the loop wrapped), without DDP."""
    return type(like)(module, like.precision) if _is_autocast(like) else module


class DMD2Critic(nn.Module):
    """The fake score (a trainable copy of the teacher) and the GAN discriminator (or None).

    Its optimiser (AdamW over both) and the number of critic updates done are
    the module's extra state: saved in its state dict, restored by loading it.
    """

    def __init__(self, fake, discriminator, num_classes, lr, weight_decay=0.01, seed=0, first_sample=0):
        super().__init__()
        self.fake = fake
        self.discriminator = discriminator
        self.num_classes = num_classes
        self.lr = lr
        self.opt = torch.optim.AdamW(self.parameters(), lr=lr, betas=BETAS, weight_decay=weight_decay, eps=1e-8)
        self.updates = 0
        self.seed = seed
        self.first_sample = first_sample  # global index of this process's first sample (rank × batch)
        self.stash_step = None
        self.stash = []  # this step's (x_g, y, real images, real labels, generators) per micro-batch

    def sample_generators(self, step, n):
        """One generator per sample of the next ``n`` of this step: seeded by (seed, step, global index).

        Every random number of a DMD2 step comes from these, so a sample's draws
        do not depend on the batch split over processes and micro-batches.
        """
        if self.stash_step != step:
            self.stash_step, self.stash = step, []
        start = self.first_sample + sum(part[0].shape[0] for part in self.stash)
        return [torch.Generator().manual_seed(_sample_seed(self.seed, step, start + i)) for i in range(n)]

    def get_extra_state(self):
        return {"opt": self.opt.state_dict(), "updates": self.updates}

    def set_extra_state(self, state):
        self.opt.load_state_dict(state["opt"])
        self.updates = int(state["updates"])


def _sample_seed(seed, step, index):
    """A 63-bit seed from (seed, step, sample index)."""
    digest = hashlib.sha256(f"dmd2/{seed}/{step}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _draw_z(like, generators):
    return torch.stack([torch.randn(like.shape[1:], generator=g) for g in generators]).to(like.device, like.dtype)


def _gen_labels(num_classes, generators, device):
    if not num_classes:
        return None
    return torch.cat([torch.randint(0, num_classes, (1,), generator=g) for g in generators]).to(device)


def dmd2_loss(diffusion, nets, x_start, level, model_kwargs, options):
    """The generator's per-sample loss on fresh z (and labels), for the loop to backpropagate.

    ``level`` is the loop step (the row's schedule). Draws, from each sample's own
    generator (`DMD2Critic.sample_generators`): z, the label, then the losses' draws.
    """
    opts = options_from(options)
    wrapped = nets.extra["dmd2_critic"]
    critic = unwrap(wrapped)
    gens = critic.sample_generators(level, x_start.shape[0])
    z = _draw_z(x_start, gens)
    y = _gen_labels(critic.num_classes, gens, x_start.device)
    gen = scorer(nets.student, options["dmd_generator"])
    real = scorer(nets.teacher)
    critic.requires_grad_(False)  # the generator turn: gradients reach the generator only
    try:
        fake = scorer(rewrap(wrapped, critic.fake))
        disc = rewrap(wrapped, critic.discriminator) if critic.discriminator is not None else None
        out = generator_turn(gen, real, fake, z, y, opts, disc=disc, generator=gens)
    finally:
        critic.requires_grad_(True)
    critic.stash.append((out["x_g"].detach(), y, x_start, model_kwargs.get("y"), gens))
    dm = out["dm"]
    logger.logkv_mean("loss_dm", out["loss_dm"].mean().item())
    logger.logkv_mean("dm_grad_norm", dm["grad"].double().norm().item())
    logger.logkv_mean("dm_weight", dm["weight"].mean().item())
    if "gan_gen" in out:
        logger.logkv_mean("gan_gen", out["gan_gen"].mean().item())
        logger.logkv_mean("d_fake_gen", realism(out["logits_fake"]))
    return {"loss": out["loss"], "sigmas": dm["sigma"].float()}


def _all_reduce_grads(params):
    """Average the gradients over the processes (the critic is not wrapped in DDP)."""
    world = dist_util.get_world_size()
    if world == 1 or not torch.distributed.is_initialized():
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def dmd2_after_step(loop):
    """The R critic updates of this step (the first on the step's sg(x_g)), AdamW, clipped, warmed up."""
    options = loop.loss_options
    opts = options_from(options)
    critic = loop.extra_networks["dmd2_critic"]
    wrapped = loop.nets.extra["dmd2_critic"]
    if critic.stash_step != loop.step:
        raise RuntimeError(f"dmd2: no generator turn of step {loop.step} before its critic updates")
    stash, critic.stash, critic.stash_step = critic.stash, [], None
    x_g, y, real_images, real_labels = (
        None if parts[0] is None else torch.cat(parts) for parts in list(zip(*stash))[:4]
    )
    gens = [g for part in stash for g in part[4]]
    ratio = int(options["dfake_gen_update_ratio"])
    teacher = scorer(loop.nets.teacher)
    gen = scorer(rewrap(loop.nets.student, loop.model), options["dmd_generator"])
    params = [p for p in critic.parameters() if p.requires_grad]
    disc = critic.discriminator
    for j in range(ratio):
        if j:  # a fresh one-step batch of the updated generator
            with torch.no_grad():
                z = _draw_z(real_images, gens)
                y = _gen_labels(critic.num_classes, gens, z.device)
                x_g = generate(gen, z, y, opts.sigma_max)
        iteration = loop.step * ratio + j
        for group in critic.opt.param_groups:
            group["lr"] = critic.lr * lr_warmup(iteration, options["lr_warmup_steps"])
        critic.opt.zero_grad(set_to_none=True)
        fake = scorer(rewrap(wrapped, critic.fake))
        out = critic_turn(teacher, fake, x_g, y, opts, disc=rewrap(wrapped, disc) if disc else None,
                          real_images=real_images, real_labels=real_labels, generator=gens)
        out["loss"].mean().backward()
        _all_reduce_grads(params)
        norm = torch.nn.utils.clip_grad_norm_(params, options["max_grad_norm"])
        critic.opt.step()
        critic.updates += 1
        logger.logkv_mean("loss_fake", out["loss_fake"].mean().item())
        logger.logkv_mean("critic_grad_norm", float(norm))
        if "gan_disc" in out:
            logger.logkv_mean("gan_disc", out["gan_disc"].mean().item())
            logger.logkv_mean("d_real", realism(out["logits_real"]))
            logger.logkv_mean("d_fake", realism(out["logits_fake"]))
    critic.opt.zero_grad(set_to_none=True)
    logger.logkv("critic_lr", critic.opt.param_groups[0]["lr"])


# ----------------------------------------------------------------------------
# the row's flags (cm_train.py), presets, checks and networks

FLAG_DEFAULTS = dict(
    dfake_gen_update_ratio=5, lr_warmup_steps=500, max_grad_norm=10.0, dmd_variant="seed", dmd_num_steps=40,
    dmd_min_step=2.0, dmd_max_step=98.0, dmd_generator="cm", dmd_fake_weighting="karras", dmd_fake_sigma="grid",
    dmd_vsd_eps=0.0, dmd_gan=False, gan_placement="bottleneck", gan_gen_weight=3e-3, gan_disc_weight=1e-2,
    gan_max_step=0, fake_lr=2e-6, fake_dropout=0.0,
)

FLAG_HELP = {
    "dfake_gen_update_ratio": "dmd2: fake-score (and GAN head) updates per generator update (DMD2: 5)",
    "lr_warmup_steps": "dmd2: linear lr warm-up over this many iterations (generator and fake score; DMD2: 500)",
    "max_grad_norm": "dmd2: clip each optimiser's gradient to this total norm (DMD2: 10)",
    "dmd_variant": "dmd2: seed (the official DMD2 losses, as the seed project) or fastgen (NVIDIA FastGen's "
    "CIFAR-10 DMD2: normaliser +1e-6, unweighted x0 fake loss, GAN heads on the teacher's features, "
    "weights 1e-3 / 1); sets the flags below that you do not give",
    "dmd_num_steps": "dmd2: points N of the ascending Karras grid the noise levels are drawn from (seed: 40)",
    "dmd_min_step": "dmd2: lower bound of the DM loss's grid indices, in percent of N (DMD2: 2)",
    "dmd_max_step": "dmd2: upper bound, in percent of N (DMD2: 98; FastGen: N=1000, 0.2 .. 99.8)",
    "dmd_generator": "dmd2: the generator's scalings: cm (a consistency model, boundary condition) or edm "
    "('DMD2 from EDM': --init_from the teacher)",
    "dmd_fake_weighting": "dmd2: fake-score loss weight: karras (σ⁻² + σ_d⁻², seed) or uniform (FastGen)",
    "dmd_fake_sigma": "dmd2: fake-score noise levels: grid (uniform over all N), dm (the DM loss's range, "
    "FastGen) or lognormal (EDM's training distribution)",
    "dmd_vsd_eps": "dmd2: ε of the normaliser mean|x − D_real| + ε (seed 0, FastGen 1e-6)",
    "dmd_gan": "dmd2: train the GAN head too (discriminator loss on --data_dir images)",
    "gan_placement": "dmd2: bottleneck (one head on the fake score's bottleneck, official DMD2) or teacher "
    "(one head per encoder level of the frozen teacher, FastGen)",
    "gan_gen_weight": "dmd2: weight of the generator's GAN term softplus(−D(fake)) (DMD2: 3e-3)",
    "gan_disc_weight": "dmd2: weight of the discriminator loss in the critic's loss (DMD2: 1e-2)",
    "gan_max_step": "dmd2, bottleneck GAN: noise the head's inputs at a grid level below this (0: clean)",
    "fake_lr": "dmd2: the fake score's (and head's) AdamW lr (DMD2: 2e-6)",
    "fake_dropout": "dmd2: dropout of the fake score (the teacher runs in eval mode, the generator uses --dropout)",
}

FLAG_CHECKS = {
    "dfake_gen_update_ratio": (lambda v: v >= 1, "must be at least 1"),
    "lr_warmup_steps": (lambda v: v >= 0, "must be non-negative"),
    "max_grad_norm": (lambda v: v > 0, "must be positive"),
    "dmd_num_steps": (lambda v: v >= 2, "must be at least 2"),
    "dmd_generator": (lambda v: v in ("cm", "edm"), "must be cm or edm"),
    "dmd_variant": (lambda v: v in ("seed", "fastgen"), "must be seed or fastgen"),
    "dmd_vsd_eps": (lambda v: v >= 0, "must be non-negative"),
    "fake_lr": (lambda v: v >= 0, "must be non-negative"),
    "fake_dropout": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
}

_VARIANT_FLAGS = dict(vsd_eps="dmd_vsd_eps", fake_weighting="dmd_fake_weighting", fake_sigma="dmd_fake_sigma",
                      gan_placement="gan_placement", gan_gen_weight="gan_gen_weight",
                      gan_disc_weight="gan_disc_weight")


def presets(args):
    """DMD2's optimiser (AdamW lr 2e-6, weight decay 0.01) and the --dmd_variant's loss choices."""
    from .dmd2 import variant_defaults

    out = dict(lr=2e-6, weight_decay=0.01)
    variant = getattr(args, "dmd_variant", "seed")
    if variant in ("seed", "fastgen"):
        out.update({_VARIANT_FLAGS[k]: v for k, v in variant_defaults(variant).items()})
    return out


def check_args(args):
    """The checks that need several flags: one ValueError line naming the flag."""
    if getattr(args, "use_fp16", False) or getattr(args, "precision", None) == "fp16":
        raise ValueError("--training_mode dmd2 trains in float32 or bf16 (--precision bf16), not float16")
    options_from({k: getattr(args, k) for k in FLAG_DEFAULTS})  # the option values themselves


def new_optimizer(params, lr, weight_decay):
    """The generator's AdamW (DMD2: betas 0.9/0.999, eps 1e-8)."""
    return torch.optim.AdamW(params, lr=lr, betas=BETAS, weight_decay=weight_decay, eps=1e-8)


def lr_factor(step, options):
    """The generator's warm-up factor at loop step s = iteration s·R."""
    return lr_warmup(step * int(options["dfake_gen_update_ratio"]), options["lr_warmup_steps"])


def build_critic(args, teacher, make_network, batch_size):
    """{``dmd2_critic``: DMD2Critic}: the fake score (a copy of the teacher, --fake_dropout) and the head.

    ``make_network(dropout)`` builds a network of the teacher's architecture;
    ``batch_size`` is this process's batch.
    """
    from .dmd2_heads import build_discriminator

    fake = make_network(args.fake_dropout)
    fake.load_state_dict(teacher.state_dict())
    fake.to(next(teacher.parameters()).device)
    fake.train()
    num_classes = getattr(teacher, "num_classes", None) or getattr(teacher, "label_dim", None) or None
    disc = None
    if args.dmd_gan:
        on = teacher if args.gan_placement == "teacher" else fake
        disc = build_discriminator(args.gan_placement, on, args.image_size, num_classes=num_classes)
        disc.to(next(teacher.parameters()).device)
    critic = DMD2Critic(fake, disc, num_classes, args.fake_lr, args.weight_decay, seed=args.seed,
                        first_sample=dist_util.get_rank() * batch_size)
    return {"dmd2_critic": critic}
