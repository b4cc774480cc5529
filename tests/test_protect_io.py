"""Tests for ldu_jax.protect.io (folder protection I/O, budget guarantee) and ldu_jax.metrics.image."""

import csv
import hashlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageOps

from ldu_jax import data
from ldu_jax.metrics import image as metrics
from ldu_jax.protect import io as pio
from numerics import assert_f32_close

RES = 16
BATCH = 4
MAX_PIXELS = 10_000
MSE = pio.Budget('mse', (8 / 255) ** 2)
LINF = pio.Budget('linf', 8 / 255)


def _photo(h, w, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(xx[..., None] / 7.0 + np.arange(3)) * np.cos(yy[..., None] / 5.0)
    return np.clip(base + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)


def _checker(shape):
    *_, h, w, c = shape
    return np.where((np.arange(h)[:, None] + np.arange(w)[None, :]) % 2 == 0, 1.0, -1.0)[..., None]


def _strong(x):
    """Violates every budget here: +-0.5 checkerboard on [-1, 1]."""
    return np.clip(x + 0.5 * _checker(x.shape), -1, 1).astype(np.float32)


def _gentle(x):
    """Within every budget here: +-0.01 on [-1, 1] (about 1.3 pixel levels)."""
    return np.clip(x + 0.01 * _checker(x.shape), -1, 1).astype(np.float32)


@pytest.fixture
def folder(tmp_path):
    """Input folder: good images of odd sizes (two sharing a stem), plus four broken files."""
    root = tmp_path / 'in'
    (root / 'sub').mkdir(parents=True)
    Image.fromarray(_photo(50, 80, 1)).save(root / 'a.png')
    Image.fromarray(_photo(64, 37, 2)).save(root / 'b.jpg', quality=95)
    Image.fromarray(_photo(40, 40, 3)).save(root / 'c.jpg', quality=95)
    Image.fromarray(_photo(40, 40, 4)).save(root / 'c.png')
    Image.fromarray(_photo(30, 30, 5)).save(root / 'sub' / 'd.png')
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    Image.fromarray(_photo(24, 40, 6)).save(root / 'rot.jpg', quality=95, exif=exif)
    (root / 'zero.jpg').write_bytes(b'')
    (root / 'text.jpg').write_text('not an image\n' * 20)
    buf = io.BytesIO()
    Image.fromarray(_photo(48, 48, 7)).save(buf, format='PNG')
    (root / 'trunc.png').write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.fromarray(_photo(200, 200, 8)).save(root / 'bomb.png')  # over MAX_PIXELS
    sizes = {'a.png': (80, 50), 'b.jpg': (37, 64), 'c.jpg': (40, 40), 'c.png': (40, 40),
             'sub/d.png': (30, 30), 'rot.jpg': (24, 40)}
    return root, sizes, {'zero.jpg', 'text.jpg', 'trunc.png', 'bomb.png'}


def _hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob('*')) if p.is_file()}


def _run(folder, tmp_path, budget, fn, logs=None):
    root = folder[0]
    calls = []

    def protect_batch(x, index):
        calls.append((index, x.shape))
        return fn(x)

    rows = pio.protect_folder(root, tmp_path / 'out', 'fake', RES, budget, protect_batch, BATCH,
                              log=(logs.append if logs is not None else lambda s: None),
                              max_pixels=MAX_PIXELS)
    return rows, calls


@pytest.mark.parametrize('budget', [MSE, LINF], ids=['mse', 'linf'])
def test_protect_folder_meets_budget_and_keeps_inputs(folder, tmp_path, budget):
    root, sizes, bad = folder
    before = _hashes(root)
    logs = []
    rows, calls = _run(folder, tmp_path, budget, _strong, logs)
    assert _hashes(root) == before  # inputs untouched, nothing new in the input folder
    assert calls == [(i, (BATCH, RES, RES, 3)) for i in range(2)]  # 6 good images, last batch padded
    out = tmp_path / 'out'
    by_file = {r['file']: r for r in rows}
    assert set(by_file) == set(sizes) | bad
    for name, (w, h) in sizes.items():
        row = by_file[name]
        assert row['error'] == ''
        if budget.kind == 'mse':  # scaled back by bisection; L-inf clips into the ball instead
            assert row['scaled'] and 0 < row['scale'] < 1
        else:
            assert not row['scaled'] and row['scale'] == 1
        back = np.asarray(Image.open(out / row['output']).convert('RGB'))
        assert back.shape == (h, w, 3)  # original size (EXIF orientation applied)
        orig = np.asarray(data._to_rgb(ImageOps.exif_transpose(Image.open(root / name))))
        diff = back.astype(np.float64) - orig
        if budget.kind == 'mse':
            assert np.mean((diff / 127.5) ** 2) <= budget.eps
        else:
            assert np.abs(diff).max() / 255 <= budget.eps + 1e-12
        assert np.abs(diff).max() > 0  # something was added
        assert row['psnr'] == pytest.approx(float(metrics.psnr(orig / 255, back / 255)))
        assert row['linf'] == pytest.approx(float(metrics.linf(orig / 255, back / 255)))
        assert row['ssim'] == pytest.approx(float(metrics.ssim(orig / 255, back / 255)), abs=1e-6)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ['a.png', 'b.png', 'c_jpg.png', 'c_png.png', 'd.png', 'rot.png', 'report.csv'])
    assert sum('skipped' in s for s in logs) == len(bad) + 1


def test_gentle_perturbation_is_not_scaled(folder, tmp_path):
    rows, _ = _run(folder, tmp_path, LINF, _gentle)
    good = [r for r in rows if not r['error']]
    assert len(good) == 6 and all(not r['scaled'] and r['scale'] == 1.0 for r in good)
    assert all(r['budget_ok'] and 0 < r['linf'] <= 3 / 255 for r in good)


def test_report_csv(folder, tmp_path):
    root, sizes, bad = folder
    _run(folder, tmp_path, MSE, _strong)
    with open(tmp_path / 'out' / 'report.csv', newline='') as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == pio.REPORT_COLUMNS
        rows = {r['file']: r for r in reader}
    assert set(rows) == set(sizes) | bad
    for name in bad:
        r = rows[name]
        assert name in r['error']
        assert all(r[k] == '' for k in ('width', 'height', 'psnr', 'ssim', 'linf', 'budget_ok',
                                        'seconds'))
    assert 'pixels' in rows['bomb.png']['error']
    for name, (w, h) in sizes.items():
        r = rows[name]
        assert r['error'] == '' and r['method'] == 'fake' and r['budget_ok'] == 'true'
        assert (int(r['width']), int(r['height'])) == (w, h)
        assert 0 < float(r['ssim']) <= 1 and float(r['psnr']) > 20 and float(r['seconds']) >= 0


def test_check_dirs(tmp_path):
    src = tmp_path / 'in'
    src.mkdir()
    with pytest.raises(ValueError, match='is the input folder'):
        pio.check_dirs(src, src)
    (tmp_path / 'link').symlink_to(src)
    with pytest.raises(ValueError, match='is the input folder'):
        pio.check_dirs(src, tmp_path / 'link')
    with pytest.raises(ValueError, match='inside the input folder'):
        pio.check_dirs(src, src / 'protected')
    with pytest.raises(data.DataError, match='nope') as e:
        pio.check_dirs(tmp_path / 'nope', tmp_path / 'out')
    assert str(tmp_path / 'nope') in str(e.value)
    pio.check_dirs(src, tmp_path / 'out')  # a sibling is fine


def test_protect_folder_refuses_input_as_output(folder):
    root = folder[0]
    before = _hashes(root)
    with pytest.raises(ValueError):
        pio.protect_folder(root, root, 'fake', RES, MSE, _strong, BATCH, log=lambda s: None)
    assert _hashes(root) == before


def test_output_names():
    assert pio.output_names(['x/a.jpg', 'x/a.png', 'x/b.png', 'y/b.png', 'x/a_jpg.webp']) == [
        'a_jpg', 'a_png', 'b_png', 'b_png_2', 'a_jpg_2']
    assert pio.output_names(['A.jpg', 'a.png']) == ['A_jpg', 'a_png']


def test_read_inputs(folder):
    root, sizes, bad = folder
    items, bad_found = pio.read_inputs(root, RES, max_pixels=MAX_PIXELS)
    assert {p.name for p, _ in bad_found} == bad
    assert {it.stem for it in items} == {'a', 'b', 'c_jpg', 'c_png', 'd', 'rot'}
    for it in items:
        assert it.original_u8.dtype == np.uint8 and it.model_input.shape == (RES, RES, 3)
        assert -1 <= it.model_input.min() and it.model_input.max() <= 1
    a = next(it for it in items if it.stem == 'a')
    np.testing.assert_allclose(a.model_input, data.load_image(root / 'a.png', RES), atol=1e-6)
    # Default limit (PIL's) accepts the 200x200 image.
    items, bad_found = pio.read_inputs(root, RES)
    assert 'bomb' in {it.stem for it in items}


def test_apply_perturbation_geometry_and_bisection():
    orig = _photo(50, 80)
    x = np.zeros((RES, RES, 3), np.float32)
    out, info = pio.apply_perturbation(orig, x, x + 0.1, pio.Budget('linf', 1.0))  # +12.75 levels
    assert not info['scaled'] and info['scale'] == 1.0
    np.testing.assert_array_equal(out[:, :15], orig[:, :15])  # crop is columns 15..64
    np.testing.assert_array_equal(out[:, 65:], orig[:, 65:])
    inside = out[:, 15:65].astype(int) - orig[:, 15:65]
    assert np.all((inside >= 12) & (inside <= 13) | (orig[:, 15:65] > 240))

    strong = _strong(x[None])[0]
    out, info = pio.apply_perturbation(orig, x, strong, MSE)
    assert info['scaled'] and 0 < info['scale'] < 1 and MSE.ok(orig, out)
    assert MSE.measure(orig, out) > 0.9 * MSE.eps  # bisection used most of the budget
    # L-inf: the resized perturbation is clipped into the ball, never scaled down
    out, info = pio.apply_perturbation(orig, x, strong, LINF)
    assert not info['scaled'] and LINF.ok(orig, out) and LINF.measure(orig, out) > 0.9 * LINF.eps
    out, info = pio.apply_perturbation(orig, x, x + 0.1, pio.Budget('linf', 0.0))
    np.testing.assert_array_equal(out, orig)


def test_budget():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 8
    assert LINF.ok(a, b) and LINF.measure(a, b) == pytest.approx(8 / 255)
    b[0, 0, 0] = 9
    assert not LINF.ok(a, b)
    assert MSE.measure(a, b) == pytest.approx(81 / 48 / 127.5 ** 2)
    with pytest.raises(ValueError):
        pio.Budget('l2', 1.0)


# ---- metrics ----

SSIM_DEPTH = 30


def _ssim_reference(a, b, sigma=1.5, data_range=1.0):
    """Slow, direct Wang et al. SSIM: 2-D Gaussian window sums over valid positions, float64."""
    r = int(3.5 * sigma + 0.5)
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    win = np.outer(g, g) / np.outer(g, g).sum()
    h, w, c = a.shape
    oh, ow = h - 2 * r, w - 2 * r
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for ch in range(c):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        m = {k: np.zeros((oh, ow)) for k in ('x', 'y', 'xx', 'yy', 'xy')}
        for i in range(2 * r + 1):
            for j in range(2 * r + 1):
                xs, ys = x[i:i + oh, j:j + ow], y[i:i + oh, j:j + ow]
                for k, v in (('x', xs), ('y', ys), ('xx', xs * xs), ('yy', ys * ys), ('xy', xs * ys)):
                    m[k] += win[i, j] * v
        vx, vy, cxy = m['xx'] - m['x'] ** 2, m['yy'] - m['y'] ** 2, m['xy'] - m['x'] * m['y']
        s = ((2 * m['x'] * m['y'] + c1) * (2 * cxy + c2)
             / ((m['x'] ** 2 + m['y'] ** 2 + c1) * (vx + vy + c2)))
        vals.append(s.mean())
    return float(np.mean(vals))


def _pairs():
    rng = np.random.default_rng(0)
    a = _photo(33, 41, 9) / 255.0
    return [(a, np.clip(a + rng.normal(0, s, a.shape), 0, 1)) for s in (0.01, 0.05, 0.2)]


def test_ssim_matches_reference():
    pairs = _pairs()
    # float32 against float64: two 11-tap blurs, the map (~30 operations) on values <= 1
    for a, b in pairs:
        assert_f32_close(metrics.ssim(a, b), _ssim_reference(a, b), depth=SSIM_DEPTH, scale=1)
    batched = metrics.ssim(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
    assert batched.shape == (3,)
    assert_f32_close(batched, [_ssim_reference(a, b) for a, b in pairs], depth=SSIM_DEPTH, scale=1)


def test_ssim_matches_skimage():
    skm = pytest.importorskip('skimage.metrics')
    for a, b in _pairs():
        ref = skm.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, data_range=1, channel_axis=-1)
        assert_f32_close(metrics.ssim(a, b), ref, depth=SSIM_DEPTH, scale=1)


def test_ssim_jit_grad_and_identity():
    a, b = (jnp.asarray(x, jnp.float32) for x in _pairs()[1])
    assert_f32_close(metrics.ssim(a, a), 1.0, depth=SSIM_DEPTH)
    assert_f32_close(jax.jit(metrics.ssim)(a, b), metrics.ssim(a, b), depth=SSIM_DEPTH, scale=1)
    g = jax.grad(lambda x: metrics.ssim(x, b))(a)
    assert g.shape == a.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
    with pytest.raises(ValueError):
        metrics.ssim(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)))


def test_psnr_mse_linf():
    a, b = _pairs()[1]
    assert metrics.psnr(a, a) == np.inf and metrics.mse(a, a) == 0 and metrics.linf(a, a) == 0
    assert metrics.psnr(a, b) == pytest.approx(10 * np.log10(1 / np.mean((a - b) ** 2)))
    assert metrics.linf(a, b) == pytest.approx(np.abs(a - b).max())
    batch = metrics.psnr(np.stack([a, a]), np.stack([a, b]))
    assert batch.shape == (2,) and batch[0] == np.inf and np.isfinite(batch[1])
    assert metrics.psnr(a * 255, b * 255, data_range=255) == pytest.approx(metrics.psnr(a, b))


def test_non_finite_model_output_is_an_error_row(folder, tmp_path):
    rows, _ = _run(folder, tmp_path, MSE, lambda x: np.full_like(x, np.nan))
    assert all(r['error'] for r in rows)
    assert sum('not finite' in r['error'] for r in rows) == 6
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['report.csv']
