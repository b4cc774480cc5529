"""Pixel-space baseline protections, as pure functions of (sd, params, images, key, config).

    advdm       PGD maximising the LDM noise-prediction loss (EOT over latent / t / noise draws)
    aspl        Anti-DreamBooth ASPL: rounds of {surrogate DreamBooth steps on the clean images (a
                fresh copy of the model), sign-PGD against that copy, model steps on the perturbed images}
    fsmg        Anti-DreamBooth FSMG: PGD against a fixed DreamBooth model trained on the clean images
    photoguard  PhotoGuard encoder attack: PGD pulling the VAE posterior mean to zero or to a target's
    mist        Mist: minimise  ||E(x') - E(y)||^2 (sum)  -  rate * noise-prediction loss  (target y)
    sds / sds-  Xue et al.: the score-distillation gradient (eps_pred - eps) pushed through the encoder
                only (the UNet Jacobian skipped); ``sds`` ascends, ``sds-`` descends
    pid         PID: PGD moving the VAE posterior mean and log-variance away from the clean image's

Each function maps images [B, R, R, 3] in [-1, 1] to ``(protected, info)``; ``info['trace']`` is the
method's objective (mean over the batch) at every PGD step, in the direction it optimises (see
``DIRECTION``). Every PGD loop is one ``lax.fori_loop`` (ASPL: a loop over rounds holding the
surrogate loops and the PGD loop), so one jit compiles it once whatever the number of steps.

Budgets are L-inf on the [0, 1] scale (``eps``, ``step_size``); the iterate is projected onto the
eps-ball around the input and clipped to the valid range [-1, 1] after every step.

``params``: the SD parameters {'vae', 'unet', 'text_encoder'} plus the method's fixed inputs, made
by ``prepare``: 'ids' [L] (the prompt), 'target' [1, R, R, 3] (photoguard, mist), and for the
DreamBooth surrogates with prior preservation 'class_images' [N, R, R, 3] and 'class_ids' [L].

Layout: ``config`` (names, defaults, checks, ``prepare``), ``engine`` (PGD and the shared losses),
one module per method family (``advdm``, ``anti_dreambooth``, ``photoguard``, ``mist``, ``sds``,
``pid``); this module holds the registry ``REGISTRY`` and the entry points. Loading a model for a
baseline and protecting folders with it: ``ldu_jax/jobs/protect.py``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from ldu_jax.errors import ConfigError
from ldu_jax.protect.baselines.advdm import advdm, evaluate_advdm
from ldu_jax.protect.baselines.anti_dreambooth import aspl, evaluate_surrogate, fsmg
from ldu_jax.protect.baselines.config import (METHODS, SD_PARTS, base_config, check_config, config_name,
                                              pattern_image, prepare, target_image)
from ldu_jax.protect.baselines.engine import (draw_latents, noise_pred, pgd, pgd_start, pgd_value_and_grad,
                                              posterior, semantic_loss, target_posterior)
from ldu_jax.protect.baselines.mist import evaluate_mist, mist, mist_objective
from ldu_jax.protect.baselines.photoguard import evaluate_photoguard, photoguard, photoguard_objective
from ldu_jax.protect.baselines.pid import evaluate_pid, pid, pid_objective
from ldu_jax.protect.baselines.sds import evaluate_sds, sds, sds_minus, sds_plus, sds_surrogate
from ldu_jax.sd import schedule as sch

__all__ = [
    "METHODS", "DIRECTION", "REGISTRY", "PROTECT", "SD_PARTS", "Method",
    "base_config", "config_name", "check_config", "pattern_image", "target_image", "prepare",
    "protect", "objective",
    "advdm", "aspl", "fsmg", "photoguard", "mist", "sds", "sds_plus", "sds_minus", "pid",
    "mist_objective", "photoguard_objective", "pid_objective", "sds_surrogate",
    "posterior", "target_posterior", "draw_latents", "noise_pred", "semantic_loss",
    "pgd", "pgd_start", "pgd_value_and_grad",
]


class Method(NamedTuple):
    protect: Callable     # (sd, params, x, key, cfg) -> (protected, info)
    evaluate: Callable    # (sd, sched, params, x_adv, x, key, cfg, surrogate) -> objective per image
    direction: int        # +1: the objective in info['trace'] goes up over the run; -1: down


REGISTRY = {
    "advdm": Method(advdm, evaluate_advdm, +1),
    "aspl": Method(aspl, evaluate_surrogate, +1),
    "fsmg": Method(fsmg, evaluate_surrogate, +1),
    "photoguard": Method(photoguard, evaluate_photoguard, -1),
    "mist": Method(mist, evaluate_mist, -1),
    "sds": Method(sds_plus, evaluate_sds, +1),
    "sds-": Method(sds_minus, evaluate_sds, -1),
    "pid": Method(pid, evaluate_pid, +1),
}
assert tuple(REGISTRY) == METHODS, (tuple(REGISTRY), METHODS)

DIRECTION = {m: r.direction for m, r in REGISTRY.items()}

PROTECT = {m: r.protect for m, r in REGISTRY.items()}


def protect(method: str, sd, params, x, key, cfg):
    """Dispatch: ``(protected images, info)``."""
    return PROTECT[method](sd, params, x, key, cfg)


def objective(method: str, sd, params, x_adv, x, key, cfg, surrogate=None):
    """The quantity ``method`` optimises, per image, at ``x_adv`` (for reports and tests; noisy
    objectives use ``key`` and ``cfg.n_draws``). ASPL / FSMG: the denoising loss under the
    surrogate parameters ``surrogate`` (info['surrogate']); SDS: the noise-prediction loss."""
    sched = sch.make_schedule(sd.scheduler)
    if method not in REGISTRY:
        raise ConfigError(f"unknown baseline {method!r}")
    return REGISTRY[method].evaluate(sd, sched, params, x_adv, x, key, cfg, surrogate)
