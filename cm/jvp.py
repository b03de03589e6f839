"""Tangents of network calls: forward-mode AD (`torch.autograd.forward_ad`) or central differences.

The continuous-time recipes need the directional derivative of the network
along the probability-flow trajectory: sCM's J = cos t̂ sin t̂·dF/dt̂ (Lu & Song
2024, Alg. 1) and MeanFlow's du/dt. Both are computed here, the same way:

* on the **unwrapped** module (no DDP/autocast wrapper) and without gradient,
  so DDP never sees this pass and its gradients stay those of the training pass;
* under the **same dropout mask** as the training pass: the caller takes
  ``rng = fork_rng(device)`` just before that pass and hands it in, and the
  RNG is restored to it before each network call made here (as
  `cm.losses.consistency_loss` does for its target);
* ``method="ad"``: forward-mode AD (`cm.jvp_rules.forward_jvp`: torch's rules,
  with closed-form ones for convolutions, linear layers, GroupNorm and
  arithmetic with a constant, which cost about two forwards) and attention
  computed by explicit products (`cm.nn.explicit_attention`: torch's fused CPU
  attention has no forward-mode rule). A layer that cannot take forward-mode
  AD is a one-line `ForwardADError` naming it;
* ``method="fd"``: the central difference (f(path(t + ε)) − f(path(t − ε)))/(2ε)
  along a caller-given path, differenced in float64, for settings where
  forward-mode AD cannot run (flash attention kernels, FSDP).
"""

import torch

from .cli import UsageError
from .losses import _fork_rng_state, _restore_rng_state
from .jvp_rules import forward_jvp
from .nn import explicit_attention

JVP_METHODS = ("ad", "fd")
JVP_HELP = "tangent of the network: ad (forward-mode AD) or fd (central finite differences)"


class ForwardADError(UsageError):
    """A layer of the network has no forward-mode derivative (one line, names the layer)."""


def check_jvp_method(method):
    if method not in JVP_METHODS:
        raise UsageError(f"--jvp must be one of {', '.join(JVP_METHODS)}, got {method!r}")
    return method


def fork_rng(device):
    """Snapshot of the RNG streams dropout draws from (take it just before the training pass)."""
    return _fork_rng_state(torch.device(device))


def _restore(rng, device):
    if rng is not None:
        _restore_rng_state(rng, torch.device(device))


def _failing_layer(module, call):
    """(qualified name, class name, message) of the innermost layer of ``module`` that raises in ``call``."""
    stack, failed = [], []
    hooks = []
    for name, sub in module.named_modules():
        def enter(_mod, _args, name=name):
            stack.append(name)

        def leave(_mod, _args, _out):
            stack.pop()

        hooks.append(sub.register_forward_pre_hook(enter))
        hooks.append(sub.register_forward_hook(leave))
    try:
        call()
    except (RuntimeError, NotImplementedError) as exc:
        failed = [stack[-1] if stack else "", str(exc)]
    finally:
        for h in hooks:
            h.remove()
    if not failed:
        return None
    name, message = failed
    layer = module.get_submodule(name) if name else module
    return name or "(top level)", type(layer).__name__, message


def _first_line(text):
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def jvp(fn, primals, tangents, module=None, rng=None, device="cpu"):
    """(fn(*primals), its directional derivative along ``tangents``) by forward-mode AD, no grad.

    ``module``: the network ``fn`` calls (named in the error if one of its layers
    has no forward-mode rule). ``rng``: dropout RNG state to run under (`fork_rng`).
    """
    primals, tangents = tuple(primals), tuple(tangents)
    with torch.no_grad(), explicit_attention():
        _restore(rng, device)
        try:
            return forward_jvp(fn, primals, tangents)
        except (RuntimeError, NotImplementedError) as exc:
            if module is None:
                raise
            reason = _first_line(exc)
            _restore(rng, device)
            found = _failing_layer(module, lambda: forward_jvp(fn, primals, tangents))
            where = f"layer {found[0]} ({found[1]})" if found else "the network"
            raise ForwardADError(
                f"--jvp ad: {where} cannot take forward-mode AD ({reason}); --jvp fd works without it"
            ) from None


def check_forward_ad(fn, primals, tangents, module):
    """Raise `ForwardADError` now (before a run writes anything) if ``fn`` has no forward-mode derivative."""
    jvp(fn, primals, tangents, module=module)


def central_difference(fn, path, t, eps, rng=None, device="cpu"):
    """(f(path(t + ε)) − f(path(t − ε)))/(2ε) in float64, no grad; ``path(s)`` gives fn's inputs at s.

    ``t`` and ``eps`` are per-sample tensors (float64); the network calls run
    under the dropout state ``rng`` each.
    """
    with torch.no_grad():
        _restore(rng, device)
        plus = fn(*path(t + eps)).double()
        _restore(rng, device)
        minus = fn(*path(t - eps)).double()
    shape = (-1,) + (1,) * (plus.ndim - 1)
    return (plus - minus) / (2 * eps.double().reshape(shape))
