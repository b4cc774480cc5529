"""FID: Fréchet distance, statistics files, weight files, and parity of the Flax FID Inception
with a PyTorch one on the same random weights.

The PyTorch reference is written here with torch.nn only, after pytorch-fid's FID Inception
(torchvision's Inception3 with FIDInceptionA/C/E_1/E_2): pytorch-fid needs torchvision, and no
torchvision on PyPI imports beside the CPU torch 2.13.0 that the suite pins.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ldu_jax import errors
from ldu_jax.metrics import fid as fidm
from numerics import assert_f32_close

torch = pytest.importorskip('torch')
tnn, F = torch.nn, torch.nn.functional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_fid(*args, prelude=''):
    """``python -m ldu_jax.cli.fid ARGS`` in a fresh process (absl flags are process-global), sharing
    the suite's compilation cache; ``prelude``: Python run first (e.g. to replace a function)."""
    env = {**os.environ, 'PYTHONPATH': ROOT, 'LDU_JAX_COMPILE_CACHE': jax.config.jax_compilation_cache_dir or ''}
    code = prelude + '\nimport sys\nfrom ldu_jax.cli import fid\nsys.argv[0] = "fid"\nfid.main()'
    return subprocess.run([sys.executable, '-c', code, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True)


# ----------------------------------------------------------------------------- torch reference

class TConv(tnn.Module):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = tnn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = tnn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def t_avg(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class TA(tnn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.branch1x1 = TConv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = TConv(cin, 48, 1), TConv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = TConv(cin, 64, 1)
        self.branch3x3dbl_2 = TConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = TConv(96, 96, 3, padding=1)
        self.branch_pool = TConv(cin, pool, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(t_avg(x))], 1)


class TB(tnn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = TConv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = TConv(cin, 64, 1)
        self.branch3x3dbl_2 = TConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = TConv(96, 96, 3, stride=2)

    def forward(self, x):
        d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), d, F.max_pool2d(x, 3, stride=2)], 1)


class TC(tnn.Module):
    def __init__(self, cin, c):
        super().__init__()
        r, k = {'kernel_size': (1, 7), 'padding': (0, 3)}, {'kernel_size': (7, 1), 'padding': (3, 0)}
        self.branch1x1 = TConv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = TConv(cin, c, 1), TConv(c, c, **r), TConv(c, 192, **k)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = TConv(cin, c, 1), TConv(c, c, **k)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = TConv(c, c, **r), TConv(c, c, **k)
        self.branch7x7dbl_5 = TConv(c, 192, **r)
        self.branch_pool = TConv(cin, 192, 1)

    def forward(self, x):
        s = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f'branch7x7dbl_{i}')(d)
        return torch.cat([self.branch1x1(x), s, d, self.branch_pool(t_avg(x))], 1)


class TD(tnn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = TConv(cin, 192, 1), TConv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = TConv(cin, 192, 1)
        self.branch7x7x3_2 = TConv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = TConv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = TConv(192, 192, 3, stride=2)

    def forward(self, x):
        s = self.branch3x3_2(self.branch3x3_1(x))
        d = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([s, d, F.max_pool2d(x, 3, stride=2)], 1)


class TE(tnn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = TConv(cin, 320, 1)
        self.branch3x3_1 = TConv(cin, 384, 1)
        self.branch3x3_2a = TConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = TConv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = TConv(cin, 448, 1)
        self.branch3x3dbl_2 = TConv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = TConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = TConv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = TConv(cin, 192, 1)

    def forward(self, x):
        s = self.branch3x3_1(x)
        s = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        p = t_avg(x) if self.pool == 'avg' else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), s, d, self.branch_pool(p)], 1)


class TInception(tnn.Module):
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = TConv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = TConv(32, 32, 3)
        self.Conv2d_2b_3x3 = TConv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = TConv(64, 80, 1)
        self.Conv2d_4a_3x3 = TConv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = TA(192, 32), TA(256, 64), TA(288, 64)
        self.Mixed_6a = TB(288)
        self.Mixed_6b, self.Mixed_6c = TC(768, 128), TC(768, 160)
        self.Mixed_6d, self.Mixed_6e = TC(768, 160), TC(768, 192)
        self.Mixed_7a = TD(768)
        self.Mixed_7b, self.Mixed_7c = TE(1280, 'avg'), TE(2048, 'max')
        self.fc = tnn.Linear(2048, 1008)  # in the real weight file; unused for pool3

    def forward(self, x):  # NCHW in [0, 1]
        x = 2 * F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False) - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ('5b', '5c', '5d', '6a', '6b', '6c', '6d', '6e', '7a', '7b', '7c'):
            x = getattr(self, f'Mixed_{name}')(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _torch_nchw(images):
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


@pytest.fixture(scope='module')
def ref(tmp_path_factory):
    """Random-weight torch reference, its .pth file, two images and the reference features.

    He-normal convs and near-identity random BatchNorm keep activations at unit scale through
    the 94 layers, so float32 rounding stays far below the tolerance (a reference run in float64
    differs from float32 torch by ~4e-6 here).
    """
    torch.manual_seed(0)
    model = TInception()
    rng = np.random.default_rng(0)
    # one shape across the tests; values k / 255, so the uint8 form is the same image
    images = (rng.integers(0, 256, (2, 80, 96, 3)) / 255).astype(np.float32)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, tnn.Conv2d):
                m.weight.normal_(0.0, (2.0 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, tnn.BatchNorm2d):
                m.weight.uniform_(0.8, 1.2)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.8, 1.2)
        expected = model.eval()(_torch_nchw(images)).numpy()
    path = tmp_path_factory.mktemp('fid') / 'pt_inception_random.pth'
    torch.save(model.state_dict(), path)
    return {'path': path, 'images': images, 'expected': expected, 'params': fidm.load_weights(path)}


# ----------------------------------------------------------------------------- network parity

def test_features_match_torch_fid_inception(ref):
    expected = ref['expected']
    assert expected.shape == (2, 2048) and expected.std() > 0.1  # a non-degenerate reference
    got = fidm.features(ref['params'], ref['images'], batch_size=2)
    assert got.shape == (2, 2048) and got.dtype == np.float32
    assert_f32_close(got, expected, depth=94)   # the deepest path: 47 conv + batch-norm pairs


def test_features_pads_last_batch_and_accepts_uint8(ref):
    u8 = np.round(ref['images'] * 255).astype(np.uint8)
    three = np.concatenate([u8, u8[:1]])  # 2 full + 1 padded batch, the same compiled shape
    got = fidm.features(ref['params'], three, batch_size=2)
    expected = ref['expected']
    assert_f32_close(got, np.concatenate([expected, expected[:1]]), depth=94)
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        fidm.features(ref['params'], ref['images'] * 2 - 1, batch_size=2)


def test_resize_matches_torch_interpolate():
    x = np.random.default_rng(1).random((1, 37, 420, 3)).astype(np.float32)  # up in H, down in W
    expected = F.interpolate(_torch_nchw(x), size=(299, 299), mode='bilinear',
                             align_corners=False).numpy().transpose(0, 2, 3, 1)
    # two passes; torch's weights come from float32 source coordinates up to 420, whose ulps move
    # each output by up to its neighbours' difference (<= 1)
    tol = assert_f32_close(fidm.resize_bilinear(x), expected, depth=2, scale=420)
    assert_f32_close(fidm.resize_bilinear_np(x[0]), expected[0], depth=2, scale=420)
    corners = F.interpolate(_torch_nchw(x), size=(299, 299), mode='bilinear', align_corners=True)
    assert np.abs(corners.numpy().transpose(0, 2, 3, 1) - expected).max() > 100 * tol   # another grid is far off


# ----------------------------------------------------------------------------- weight files

def test_weights_convert_round_trip_and_errors(ref, tmp_path):
    out = tmp_path / 'inception_fid.safetensors'
    r = run_fid('convert', f'--weights={ref["path"]}', f'--out={out}')
    assert r.returncode == 0 and f'wrote {out}' in r.stdout, r.stderr[-3000:]
    state = torch.load(ref['path'], weights_only=True)
    for p in (out, tmp_path / 'w.npz'):
        if p.suffix == '.npz':
            fidm.save_weights(p, ref['params'])
        back = fidm.state_dict_from_params(fidm.load_weights(p))
        assert set(back) == {k for k in state if not k.endswith('num_batches_tracked') and not k.startswith('fc.')}
        for k, v in back.items():
            np.testing.assert_array_equal(v, state[k].numpy(), err_msg=k)

    from safetensors.numpy import load_file, save_file
    broken = load_file(str(out))
    del broken['Mixed_6c.branch7x7_2.bn.running_var']
    broken['Mixed_6c.extra.weight'] = np.zeros(3, np.float32)
    bad = tmp_path / 'broken.safetensors'
    save_file(broken, str(bad))
    with pytest.raises(fidm.WeightsError, match='broken.safetensors') as e:
        fidm.load_weights(bad)
    assert 'Mixed_6c.branch7x7_2.bn.running_var' in str(e.value) and 'Mixed_6c.extra.weight' in str(e.value)
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        fidm.load_weights(tmp_path / 'nope.pth')
    assert issubclass(fidm.WeightsError, errors.UserError) and issubclass(fidm.WeightsError, ValueError)


def test_init_random_has_the_weight_file_layout():
    params = fidm.init_random(0)
    sd = fidm.state_dict_from_params(params)
    assert len(sd) == 94 * 5 and sd['Mixed_7c.branch_pool.conv.weight'].shape == (192, 2048, 1, 1)
    assert sd['Conv2d_1a_3x3.conv.weight'].shape == (32, 3, 3, 3)


# ----------------------------------------------------------------------------- statistics

def _independent_fd(mu1, s1, mu2, s2):
    """The textbook formula with scipy's general matrix square root (the implementation uses eigh)."""
    import scipy.linalg
    tr = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 16)) @ rng.standard_normal((16, 16))
    b = rng.standard_normal((150, 16)) * 2 + 0.5
    (mu1, s1), (mu2, s2) = fidm.gaussian_stats(a), fidm.gaussian_stats(b)
    assert s1.shape == (16, 16) and np.allclose(s1, np.cov(a.T))
    d = fidm.frechet_distance(mu1, s1, mu2, s2)
    assert d > 1 and np.isclose(d, _independent_fd(mu1, s1, mu2, s2), rtol=1e-8)
    assert abs(fidm.frechet_distance(mu1, s1, mu1, s1)) < 1e-8
    # rank-deficient covariances (fewer samples than dims): finite, and still the same value
    c, e = rng.standard_normal((5, 16)), rng.standard_normal((6, 16))
    (mu3, s3), (mu4, s4) = fidm.gaussian_stats(c), fidm.gaussian_stats(e)
    assert np.isclose(fidm.frechet_distance(mu3, s3, mu4, s4), _independent_fd(mu3, s3, mu4, s4), atol=1e-3)
    with pytest.raises(ValueError, match='mismatched'):
        fidm.frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])
    # from the features (the nuclear-norm form): the same value, full-rank and rank-deficient
    assert np.isclose(fidm.frechet_distance_features(a, b), d, rtol=1e-8)
    assert np.isclose(fidm.frechet_distance_features(c, e), _independent_fd(mu3, s3, mu4, s4), atol=1e-3)


def test_stats_files(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(8), np.cov(rng.standard_normal((20, 8)).T)
    path = tmp_path / 'ref.npz'
    fidm.save_stats(path, mu, sigma)
    mu2, sigma2 = fidm.load_stats(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    assert [p.name for p in tmp_path.iterdir()] == ['ref.npz']  # no temp file left
    np.savez(tmp_path / 'bad.npz', mu=mu)
    with pytest.raises(fidm.WeightsError, match=r'bad\.npz.*sigma'):
        fidm.load_stats(tmp_path / 'bad.npz')


def test_fid_helpers_and_stats_cli(tmp_path, monkeypatch, capsys, ref):
    """Wiring of fid / fid_to_stats / the `stats` CLI, with features replaced by a cheap stand-in."""
    from PIL import Image

    calls = []

    def fake_features(params, images, batch_size=50):
        images = np.asarray(images, np.float32)
        calls.append(images.shape)
        return images.reshape(len(images), -1)[:, :4] * np.arange(1, 5)

    monkeypatch.setattr(fidm, 'features', fake_features)
    rng = np.random.default_rng(0)
    a, b = rng.random((6, 8, 8, 3)), rng.random((5, 8, 8, 3)) * 0.5
    expected = fidm.frechet_distance(*fidm.gaussian_stats(fake_features(None, a)),
                                     *fidm.gaussian_stats(fake_features(None, b)))
    assert expected > 0 and np.isclose(fidm.fid(None, a, b), expected)
    fidm.save_stats(tmp_path / 'b.npz', *fidm.gaussian_stats(fake_features(None, b)))
    assert np.isclose(fidm.fid_to_stats(None, a, tmp_path / 'b.npz'), expected)

    folder = tmp_path / 'imgs'
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), np.uint8)).save(folder / f'{i}.png')
    (folder / 'broken.jpg').write_bytes(b'not a jpeg')
    calls.clear()
    (mu, sigma), n, bad = fidm.folder_stats(ref['params'], folder, batch_size=2)
    assert n == 3 and [p.name for p, _ in bad] == ['broken.jpg']   # a bad file was skipped, and named
    assert 'broken.jpg' in capsys.readouterr().out
    assert calls == [(2, 299, 299, 3), (1, 299, 299, 3)]
    assert mu.shape == (4,) and sigma.shape == (4, 4)

    # the `stats` command (the same stand-in for the features): exit status 1 for the skipped file
    out = tmp_path / 'ref.npz'
    fake = ('import numpy as np\nfrom ldu_jax.metrics import fid as m\n'
            'm.features = lambda p, x, b=50: np.asarray(x, np.float32).reshape(len(x), -1)[:, :4] * np.arange(1, 5)')
    r = run_fid('stats', f'--weights={ref["path"]}', f'--images={folder}', f'--out={out}', '--batch_size=2',
                prelude=fake)
    assert r.returncode == 1, r.stderr[-3000:]
    assert 'broken.jpg' in r.stdout and f'wrote {out} (3 images)' in r.stdout
    mu2, sigma2 = fidm.load_stats(out)
    np.testing.assert_allclose(mu2, mu, rtol=1e-6)
    np.testing.assert_allclose(sigma2, sigma, rtol=1e-6, atol=1e-9)
    r = run_fid('score', out, tmp_path / 'b.npz')   # two .npz: no weights needed
    assert r.returncode == 0, r.stderr[-3000:]
    score = float(r.stdout.split('FID:')[1])
    assert np.isclose(score, fidm.frechet_distance(mu, sigma, *fidm.load_stats(tmp_path / 'b.npz')), atol=1e-4)


def test_fid_command_reports_user_errors_in_one_line(tmp_path, ref):
    missing = tmp_path / 'none'
    r = run_fid('stats', f'--weights={ref["path"]}', f'--images={missing}', f'--out={tmp_path / "s.npz"}')
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == f'error: image folder {missing} does not exist'
    r = run_fid('score', missing, tmp_path / 'b.npz')   # a folder needs --weights
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (f'error: {missing} is a folder: --weights is needed to '
                                                 'compute its features')
