"""How far apart two float32 evaluations of the same maths may be (issue 20).

Compiled differently (jit or op by op, other fusion, FMA or a multiply and an add, another vector
width or reduction order, batched or single, sharded or not, XLA or PyTorch / NumPy), float32
results differ by rounding. Each dependent layer (a matmul or conv, a norm, an attention, a
reassociated sum) may round its result differently by about an ulp (float32 eps = 2^-23 = 1.2e-7
relative) of the values it carries, and over ``depth`` dependent layers these differences add up,
in the worst case linearly: two evaluations differ by at most about ``ulps * depth * eps * scale``,
``scale`` being the magnitude of the values carried (by default max |desired|). In practice the
roundings partly cancel: the suite's comparisons use at most ~0.4 of this under six kinds of code
generation (bench/test_variants.py), while a real error (a missing term, a sign, the wrong block or
step count) lies orders of magnitude outside it; tests that loosened a tolerance check that too.

LDU_JAX_TEST_F32_LOG=<file> appends each comparison's largest share of its tolerance.
"""
import json
import os

import jax
import numpy as np

EPS = float(np.finfo(np.float32).eps)


def _log(share, tol, what):
    """With LDU_JAX_TEST_F32_LOG set, append a passed comparison's worst share of its tolerance."""
    if os.environ.get("LDU_JAX_TEST_F32_LOG"):
        with open(os.environ["LDU_JAX_TEST_F32_LOG"], "a") as f:
            f.write(json.dumps(dict(test=os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], what=what,
                                    ratio=float(np.max(share, initial=0) / tol))) + "\n")


def f32_tol(scale, depth, ulps=1):
    """Absolute tolerance: ``ulps`` ulps per dependent layer over ``depth`` layers, at ``scale``."""
    return ulps * depth * EPS * float(scale)


def assert_f32_close(actual, desired, *, depth, scale=None, ulps=1, err_msg=""):
    """assert_allclose with atol = f32_tol(scale, depth, ulps) and the same factor as rtol (for
    values above ``scale``); returns atol, for checking that a wrong result lies far outside it."""
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    scale = np.abs(desired).max() if scale is None else scale
    atol, rtol = f32_tol(scale, depth, ulps), f32_tol(1, depth, ulps)
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol, err_msg=err_msg)
    _log(np.abs(actual - desired) / np.maximum(atol + rtol * np.abs(desired), 1e-300), 1.0, err_msg)
    return atol


def assert_adam_close(actual, desired, *, lr, steps, depth, cancelling=None, max_share=0.05):
    """Parameters (arrays or trees) after ``steps`` Adam steps from gradients computed differently.
    An update is lr * m / sqrt(v), in which the gradient's scale cancels: an entry differs by lr
    times its gradient's relative rounding, ~depth ulps where the gradient is not near zero, up to a
    flipped sign (2 lr a step) where it is at rounding level. So every entry lies within
    2 * steps * lr, and all but 1% of them (at least one) within f32_tol(steps * lr, depth).

    ``cancelling(path) -> bool`` (a leaf's ``jax.tree_util.keystr``) names the leaves whose
    gradients are sums that cancel (a term the next layer removes, a difference of the batch's
    halves): their relative rounding is eps times the cancellation, not the depth, so they are held
    to the bound alone; they must be under ``max_share`` of the entries, so that the rest are held
    to the tolerance."""
    if cancelling is not None:
        flat_a, flat_d = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (actual, desired))
        loose = [cancelling(jax.tree_util.keystr(k)) for k, _ in flat_d]
        n_loose = sum(x.size for (_, x), c in zip(flat_d, loose) if c)
        assert 0 < n_loose < max_share * sum(x.size for _, x in flat_d), (n_loose, "entries held to the bound alone")
        d = max(float(np.abs(np.asarray(a, np.float64) - np.asarray(b)).max())
                for (_, a), (_, b), c in zip(flat_a, flat_d, loose) if c)
        assert d <= 2 * steps * lr, f"max {d} (bound {2 * steps * lr}) on the cancelling leaves"
        actual = [a for (_, a), c in zip(flat_a, loose) if not c]
        desired = [b for (_, b), c in zip(flat_d, loose) if not c]
    flat = lambda t: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(t)])  # noqa: E731
    d = np.sort(np.abs(flat(actual) - flat(desired)))[::-1]
    tol, bound = f32_tol(steps * lr, depth), 2 * steps * lr
    kth = d[min(int(np.ceil(0.01 * d.size)), d.size - 1)]   # the largest entry held to tol
    assert d[0] <= bound and kth <= tol, f"max {d[0]} (bound {bound}), 99% {kth} (tol {tol})"
    _log(max(kth / tol, d[0] / bound), 1.0, "adam")


def tiny_unet_offsets(path: str) -> bool:
    """The tiny SD bundle's UNet (``cancelling`` for ``assert_adam_close``): its first level has 32
    channels in 32 GroupNorm groups, which remove every per-channel offset, so there the biases and
    the timestep projections get gradients of rounding noise, which Adam makes steps of +-lr."""
    return ("down_blocks_0" in path or "up_blocks_1" in path) and ("bias" in path or "time_emb" in path)
