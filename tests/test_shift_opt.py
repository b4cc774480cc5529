"""The budgeted ascent behind ldu-opt: CG, the Gauss-Newton step, bisection onto the budget,
best-feasible selection (pure functions on small explicit problems)."""
import jax.numpy as jnp
import numpy as np
import pytest

from ldu_jax.protect import shift_opt


def _ill_conditioned_maps(b=3, n=24, m=40, cond=100.0, seed=0):
    """Per image a linear map A_i: R^n -> R^m with singular values from 1 down to 1/cond."""
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(b):
        u, _ = np.linalg.qr(rng.normal(size=(m, n)))
        v, _ = np.linalg.qr(rng.normal(size=(n, n)))
        maps.append(u @ np.diag(np.geomspace(1.0, 1.0 / cond, n)) @ v.T)
    return jnp.asarray(np.stack(maps), jnp.float32)


def test_cg_solves_each_images_system():
    a = _ill_conditioned_maps(cond=5.0)
    gram = jnp.einsum("bmi,bmj->bij", a, a)
    rhs = jnp.asarray(np.random.default_rng(1).normal(size=(3, 24)), jnp.float32)
    damping = jnp.asarray([0.0, 0.1, 1.0])
    x = shift_opt.cg(lambda v: jnp.einsum("bij,bj->bi", gram, v), rhs, iters=60, damping=damping)
    for i in range(3):
        want = np.linalg.solve(np.asarray(gram[i], np.float64) + float(damping[i]) * np.eye(24), np.asarray(rhs[i]))
        np.testing.assert_allclose(np.asarray(x[i]), want, rtol=1e-3, atol=1e-4)


def test_gauss_newton_step_beats_the_plain_gradient_step_on_an_ill_conditioned_map():
    """Maximise the linear gain <h, A δ> with the image change ||A δ|| fixed (a quadratic
    constraint): the best step is the projection of h onto A's range. The Gauss-Newton direction
    reaches it; the plain gradient Aᵀh, scaled to the same image length, falls well short."""
    a = _ill_conditioned_maps()
    rng = np.random.default_rng(2)
    h = jnp.asarray(rng.normal(size=(3, 40)), jnp.float32)
    jvp = lambda v: jnp.einsum("bmi,bi->bm", a, v)  # noqa: E731
    vjp = lambda u: jnp.einsum("bmi,bm->bi", a, u)  # noqa: E731
    radius = 1.0

    def gain(jp):
        return np.asarray(shift_opt.bdot(h, jp) * radius / shift_opt.bnorm(jp))

    best = np.asarray([np.linalg.norm(np.asarray(a[i])
                                      @ np.linalg.lstsq(np.asarray(a[i]), np.asarray(h[i]), rcond=None)[0])
                       for i in range(3)]) * radius
    _, jp_plain = shift_opt.gauss_newton_solve(jvp, vjp, h, iters=0, damping=1e-6)
    _, jp_gn = shift_opt.gauss_newton_solve(jvp, vjp, h, iters=60, damping=1e-6)
    assert np.all(gain(jp_gn) >= 0.98 * best), (gain(jp_gn), best)
    assert np.all(gain(jp_plain) <= 0.9 * best), (gain(jp_plain), best)
    # damping trades the two off: heavy damping is the plain gradient direction again
    _, jp_heavy = shift_opt.gauss_newton_solve(jvp, vjp, h, iters=60, damping=1e6)
    np.testing.assert_allclose(gain(jp_heavy), gain(jp_plain), rtol=1e-3)


def test_bisect_scale_finds_the_largest_feasible_scale_per_image():
    limit = jnp.asarray([0.3, 1.7, 5.0, 0.0])     # feasible iff s <= limit
    s = shift_opt.bisect_scale(lambda s: s <= limit, 2.0, iters=12, batch=4)
    s = np.asarray(s)
    assert np.all(s <= np.minimum(np.asarray(limit), 2.0))          # always feasible
    np.testing.assert_allclose(s[:2], [0.3, 1.7], atol=2.0 / 2 ** 12)
    assert s[2] == 2.0 and s[3] == 0.0                                # s_max feasible; nothing feasible but 0


def test_keep_best_keeps_the_best_feasible_iterate_when_the_last_is_infeasible():
    """A constructed run: iterate scores rise every step, but the last two break the budget.
    The kept iterate is the best one that met it, not the last one."""
    b = 2
    best, best_score = jnp.zeros((b, 3)), jnp.full((b,), -jnp.inf)
    iterates = [(jnp.full((b, 3), float(i)), jnp.full((b,), float(i)), jnp.asarray([i < 3, i < 4]))
                for i in range(5)]
    for it, score, feasible in iterates:
        best, best_score = shift_opt.keep_best(best, it, score, best_score, feasible)
    np.testing.assert_array_equal(np.asarray(best_score), [2.0, 3.0])
    np.testing.assert_array_equal(np.asarray(best[:, 0]), [2.0, 3.0])
    # a pytree of iterates is selected leaf by leaf
    tree, _ = shift_opt.keep_best({"a": jnp.zeros((b, 2))}, {"a": jnp.ones((b, 2))}, jnp.asarray([1.0, 1.0]),
                                  jnp.asarray([0.0, 2.0]), jnp.asarray([True, True]))
    np.testing.assert_array_equal(np.asarray(tree["a"][:, 0]), [1.0, 0.0])


def test_step_fraction_decays_from_start_to_end():
    f = [float(shift_opt.step_fraction(jnp.asarray(i), 5, 1.0, 0.1)) for i in range(5)]
    assert f[0] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(f, f[1:]))
