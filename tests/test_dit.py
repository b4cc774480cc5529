"""The shortcut DiT: parameter tree of the public model, its maths (checked against NumPy), options."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldu_jax.models.dit import DiT
from numerics import assert_f32_close

CFG = dict(patch_size=2, hidden_size=32, depth=2, num_heads=4, mlp_ratio=2.0, out_channels=4, num_classes=3)
X_SHAPE = (2, 8, 8, 4)


def _inputs():
    k = jax.random.split(jax.random.PRNGKey(1), 2)
    x = jax.random.normal(k[0], X_SHAPE)
    return x, jnp.array([0.25, 0.75]), jnp.array([3.0, 0.0]), jnp.array([1, 3], jnp.int32)


@pytest.fixture(scope="module")
def model_params():
    model = DiT(**CFG)
    x, t, dt, y = _inputs()
    params = model.init(jax.random.PRNGKey(0), x, t, dt, y)["params"]
    # Random values everywhere (the zero-initialised layers would hide most of the maths).
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    params = tree.unflatten([0.2 * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)])
    return model, params


def test_parameter_tree_matches_public_model(model_params):
    model, params = model_params
    h, p, c = CFG["hidden_size"], CFG["patch_size"], CFG["out_channels"]
    m = int(h * CFG["mlp_ratio"])
    block = {"Dense_0": (h, 6 * h), "Dense_1": (h, h), "Dense_2": (h, h), "Dense_3": (h, h), "Dense_4": (h, h),
             "MlpBlock_0/Dense_0": (h, m), "MlpBlock_0/Dense_1": (m, h)}
    expected = {"PatchEmbed_0/Conv_0": (p, p, c, h), "TimestepEmbedder_0/Dense_0": (256, h),
                "TimestepEmbedder_0/Dense_1": (h, h), "TimestepEmbedder_1/Dense_0": (256, h),
                "TimestepEmbedder_1/Dense_1": (h, h), "FinalLayer_0/Dense_0": (h, 2 * h),
                "FinalLayer_0/Dense_1": (h, p * p * c)}
    for i in range(CFG["depth"]):
        expected.update({f"DiTBlock_{i}/{k}": v for k, v in block.items()})
    got = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [k.key for k in path]
        got["/".join(names)] = leaf.shape
    for name, shape in expected.items():
        assert got.pop(f"{name}/kernel") == shape, name
        assert got.pop(f"{name}/bias") == (shape[-1],), name
    assert got.pop("LabelEmbedder_0/Embed_0/embedding") == (CFG["num_classes"] + 1, h)
    assert got.pop("Embed_0/embedding") == (256, 1)
    assert got == {}


def _np_forward(params, x, t, dt, y, cfg):
    """An independent NumPy transcription of the shortcut DiT (REFERENCE.md section 2)."""
    P = jax.tree_util.tree_map(np.asarray, params)
    x, t, dt, y = map(np.asarray, (x, t, dt, y))
    h, p, heads = cfg["hidden_size"], cfg["patch_size"], cfg["num_heads"]
    b, s = x.shape[0], x.shape[1]
    g = s // p
    dense = lambda a, d: a @ d["kernel"] + d["bias"]  # noqa: E731
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    gelu = lambda a: 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3)))  # noqa: E731

    def ln(a):
        mu = a.mean(-1, keepdims=True)
        return (a - mu) / np.sqrt(((a - mu) ** 2).mean(-1, keepdims=True) + 1e-6)

    def temb(v, d):
        freqs = np.exp(-np.log(10000) * np.arange(128) / 128)
        args = v[:, None] * freqs[None]
        e = np.concatenate([np.cos(args), np.sin(args)], -1)
        return dense(silu(dense(e, d["Dense_0"])), d["Dense_1"])

    # patches (row-major over the grid), conv as a matmul
    patches = x.reshape(b, g, p, g, p, x.shape[-1]).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
    conv = P["PatchEmbed_0"]["Conv_0"]
    tok = patches @ conv["kernel"].reshape(-1, h) + conv["bias"]
    omega = 1 / 10000 ** (np.arange(h // 4) / (h // 4))
    rows, cols = np.divmod(np.arange(g * g), g)
    pos = np.concatenate([np.sin(cols[:, None] * omega), np.cos(cols[:, None] * omega),
                          np.sin(rows[:, None] * omega), np.cos(rows[:, None] * omega)], 1)
    tok = tok + pos[None]
    c = temb(t, P["TimestepEmbedder_0"]) + temb(dt, P["TimestepEmbedder_1"]) \
        + P["LabelEmbedder_0"]["Embed_0"]["embedding"][y]
    dh = h // heads
    for i in range(cfg["depth"]):
        B = P[f"DiTBlock_{i}"]
        sm, cm, gm, sf, cf, gf = np.split(dense(silu(c), B["Dense_0"]), 6, -1)
        a = ln(tok) * (1 + cm[:, None]) + sm[:, None]
        k, q, v = (dense(a, B[f"Dense_{j}"]).reshape(b, -1, heads, dh) for j in (1, 2, 3))
        logits = np.einsum("bqhc,bkhc->bhqk", q, k) / dh
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        att = np.einsum("bhqk,bkhc->bqhc", w, v).reshape(b, -1, h)
        tok = tok + gm[:, None] * dense(att, B["Dense_4"])
        a = ln(tok) * (1 + cf[:, None]) + sf[:, None]
        mlp = dense(gelu(dense(a, B["MlpBlock_0"]["Dense_0"])), B["MlpBlock_0"]["Dense_1"])
        tok = tok + gf[:, None] * mlp
    F = P["FinalLayer_0"]
    sh, sc = np.split(dense(silu(c), F["Dense_0"]), 2, -1)
    out = dense(ln(tok) * (1 + sc[:, None]) + sh[:, None], F["Dense_1"])
    co = cfg["out_channels"]
    return out.reshape(b, g, g, p, p, co).transpose(0, 1, 3, 2, 4, 5).reshape(b, s, s, co)


def test_forward_matches_numpy_transcription(model_params):
    model, params = model_params
    x, t, dt, y = _inputs()
    got = np.asarray(model.apply({"params": params}, x, t, dt, y))
    want = _np_forward(params, x, t, dt, y, CFG)
    assert np.abs(want).max() > 0.1
    # float32 against a mostly float64 transcription: embeddings ~4 layers + 2 blocks x ~9
    assert_f32_close(got, want, depth=22)


def test_options_do_not_change_the_maths(model_params):
    model, params = model_params
    x, t, dt, y = _inputs()
    ref = model.apply({"params": params}, x, t, dt, y)
    for opts in (dict(remat=True), dict(attention="xla")):
        out = model.clone(**opts).apply({"params": params}, x, t, dt, y)
        assert_f32_close(out, ref, depth=22, err_msg=str(opts))  # the DiT's ~22 layers
    bf16 = model.clone(dtype=jnp.bfloat16).apply({"params": params}, x, t, dt, y)
    assert bf16.dtype == jnp.bfloat16
    rel = float(jnp.linalg.norm(bf16.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    assert rel < 0.05


def test_conditioning_matters_and_zero_init_output():
    model = DiT(**CFG)
    x, t, dt, y = _inputs()
    params = model.init(jax.random.PRNGKey(0), x, t, dt, y)["params"]
    # adaLN-Zero: the final layer starts at zero, so the untrained model predicts zero velocity.
    assert float(jnp.abs(model.apply({"params": params}, x, t, dt, y)).max()) == 0.0


def test_each_condition_changes_the_output(model_params):
    model, params = model_params
    x, t, dt, y = _inputs()
    ref = model.apply({"params": params}, x, t, dt, y)
    for changed in ((x, t + 0.1, dt, y), (x, t, dt + 1, y), (x, t, dt, (y + 1) % 4)):
        assert float(jnp.abs(model.apply({"params": params}, *changed) - ref).max()) > 1e-3
    naive = model.clone(ignore_dt=True)
    np.testing.assert_array_equal(naive.apply({"params": params}, x, t, dt, y),
                                  naive.apply({"params": params}, x, t, dt + 3, y))
