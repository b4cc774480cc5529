"""Ascent under a per-image budget, with steps measured in the image metric.

The generic half of ``ldu-opt``: a differentiable map ``f: δ -> x'`` (here: shift of the noise
latent -> protected image), an objective on x', and a budget on d(x', x). Plain gradient ascent in δ
takes steps that are short or long in the image depending on how the map stretches each direction
(the δ -> x' Jacobian J of LDU is badly conditioned), so the step here is the Gauss-Newton one:
p = (JᵀJ + μ I)⁻¹ Jᵀ h for the image gradient h, solved by conjugate gradient with JᵀJ applied
through jvp / vjp. J p is then the steepest ascent direction in the image among the changes the map
can make, and its length in the image sets the step.

Every array has a leading batch axis of independent images: dot products, CG's coefficients,
step sizes and budget scales are all per image.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def bdot(a, b):
    """Per-image dot product over all axes but the first: [B]."""
    return jnp.sum((a * b).reshape(a.shape[0], -1), axis=1)


def bnorm(a):
    return jnp.sqrt(bdot(a, a))


def _bcast(s, like):
    return s.reshape((-1,) + (1,) * (like.ndim - 1))


def cg(matvec: Callable, b, iters: int, damping=0.0):
    """Solve (A + damping I) x = b for symmetric positive semi-definite A, per image, by ``iters``
    steps of conjugate gradient from x = 0 (one ``lax.fori_loop``). ``damping``: scalar or [B]."""
    damping = jnp.broadcast_to(jnp.asarray(damping, b.dtype), b.shape[:1])

    def av(v):
        return matvec(v) + _bcast(damping, v) * v

    def body(_, carry):
        x, r, p, rr = carry
        ap = av(p)
        pap = bdot(p, ap)
        alpha = jnp.where(pap > 0, rr / jnp.where(pap > 0, pap, 1.0), 0.0)
        x = x + _bcast(alpha, p) * p
        r = r - _bcast(alpha, ap) * ap
        rr_new = bdot(r, r)
        beta = jnp.where(rr > 0, rr_new / jnp.where(rr > 0, rr, 1.0), 0.0)
        return x, r, r + _bcast(beta, p) * p, rr_new

    x0 = jnp.zeros_like(b)
    x, *_ = jax.lax.fori_loop(0, iters, body, (x0, b, b, bdot(b, b)))
    return x


def gauss_newton_solve(jvp: Callable, vjp: Callable, h, iters: int, damping: float):
    """(p, J p) with p ≈ (JᵀJ + μ I)⁻¹ Jᵀ h, J given by its products ``jvp(v) = J v`` and
    ``vjp(u) = Jᵀ u`` (e.g. from ``jax.linearize`` and ``jax.linear_transpose``).

    μ = ``damping`` x the curvature ||J g||² / ||g||² along g = Jᵀ h, per image, so the damping is
    relative to the map's own scale. ``iters`` = 0 gives the plain gradient direction g / μ."""
    g = vjp(h)
    jg = jvp(g)
    mu = damping * bdot(jg, jg) / jnp.maximum(bdot(g, g), 1e-30)
    if iters == 0:
        return g, jg
    p = cg(lambda v: vjp(jvp(v)), g, iters, mu)
    return p, jvp(p)


def bisect_scale(feasible: Callable, s_max, iters: int, batch: int):
    """Per image, the largest s in [0, s_max] found feasible by ``iters`` bisection steps.

    ``feasible(s [B]) -> bool [B]`` must hold at s = 0 for the result to be feasible (it is then
    always one that was checked, or 0). If s_max is feasible it is returned as is."""
    s_max = jnp.broadcast_to(jnp.asarray(s_max, jnp.float32), (batch,))
    ok_max = feasible(s_max)

    def body(_, lohi):
        lo, hi = lohi
        mid = 0.5 * (lo + hi)
        ok = feasible(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, iters, body, (jnp.zeros_like(s_max), s_max))
    return jnp.where(ok_max, s_max, lo)


def keep_best(best, candidate, score, best_score, feasible):
    """Per image: ``candidate`` replaces ``best`` where it is feasible and scores higher.
    Returns (best, best_score)."""
    better = feasible & (score > best_score)
    pick = lambda c, b: jnp.where(_bcast(better, c), c, b)  # noqa: E731
    return jax.tree_util.tree_map(pick, candidate, best), jnp.where(better, score, best_score)


def step_fraction(i, steps: int, start: float, end: float):
    """Cosine decay of the step's image-space length, as a fraction of the budget radius."""
    frac = i / jnp.maximum(steps - 1, 1)
    return end + 0.5 * (start - end) * (1 + jnp.cos(jnp.pi * frac))
