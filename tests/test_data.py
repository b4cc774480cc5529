"""Tests for ldu_jax.data: listing, decoding odd/broken files, batch streams, saving."""

import io
import itertools

import numpy as np
import pytest
from PIL import Image

from ldu_jax.files import atomic_dir
from ldu_jax.data import (
    DataError, ImageFolder, list_images, load_image, load_images, make_grid, report_bad,
    save_image_atomic, synthetic_batches)

SIZE = 8


def _gradient(w=20, h=12):
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(0, 255, h)[:, None, None]
    return np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                           np.full((h, w, 1), 60.0)], -1).astype(np.uint8)


def _jpeg_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format='JPEG', quality=95)
    return buf.getvalue()


@pytest.fixture
def mixed(tmp_path):
    """A folder of good, odd-mode and broken files; returns (root, good names, bad names)."""
    rgb = Image.fromarray(_gradient())
    rgb.save(tmp_path / 'a.png')
    rgb.save(tmp_path / 'b.JPG', quality=95)
    rgb.save(tmp_path / 'c.webp')
    (tmp_path / 'sub').mkdir()
    Image.fromarray(np.full((10, 14), 200, np.uint8), 'L').save(tmp_path / 'sub' / 'gray.png')
    rgba = np.zeros((10, 10, 4), np.uint8)  # fully transparent black
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'sub' / 'rgba.png')
    Image.new('CMYK', (12, 12), (0, 255, 255, 0)).save(tmp_path / 'cmyk.jpg', quality=95)
    g16 = np.full((8, 8), 65535, np.uint16)
    g16[:, 4:] = 32896
    Image.fromarray(g16).save(tmp_path / 'g16.png')
    (tmp_path / 'empty.png').write_bytes(b'')
    (tmp_path / 'text.jpg').write_bytes(b'this is not an image at all\n' * 10)
    data = _jpeg_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    (tmp_path / 'trunc.jpeg').write_bytes(data[:len(data) // 2])
    (tmp_path / 'notes.txt').write_text('ignored')
    (tmp_path / '.hidden').mkdir()
    rgb.save(tmp_path / '.hidden' / 'h.png')
    rgb.save(tmp_path / '.dot.png')
    good = ['a.png', 'b.JPG', 'c.webp', 'cmyk.jpg', 'g16.png', 'sub/gray.png', 'sub/rgba.png']
    return tmp_path, good, ['empty.png', 'text.jpg', 'trunc.jpeg']


def test_missing_folder_names_path(tmp_path):
    with pytest.raises(DataError, match='does not exist') as e:
        list_images(tmp_path / 'nope')
    assert str(tmp_path / 'nope') in str(e.value)
    with pytest.raises(DataError, match='nope'):
        ImageFolder(tmp_path / 'nope', SIZE)


def test_empty_folder_names_path(tmp_path):
    (tmp_path / 'notes.txt').write_text('x')
    with pytest.raises(DataError, match='no image files') as e:
        list_images(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_list_images(mixed):
    root, good, bad = mixed
    names = [p.relative_to(root).as_posix() for p in list_images(root)]
    assert names == sorted(good + bad)


def test_load_images_converts_good_and_reports_bad(mixed):
    root, good, bad = mixed
    paths = list_images(root)
    images, ok, skipped = load_images(paths, SIZE)
    assert [p.relative_to(root).as_posix() for p in ok] == sorted(good)
    assert sorted(p.name for p, _ in skipped) == sorted(bad)
    assert images.shape == (len(good), SIZE, SIZE, 3) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0

    lines = []
    report_bad(skipped, len(paths), log=lines.append)
    assert len(lines) == len(bad) + 1
    for name in bad:
        assert any(line.startswith('skipped ') and name in line for line in lines)
    assert lines[-1] == f'skipped {len(bad)} of {len(paths)} files'
    reasons = dict((p.name, r) for p, r in skipped)
    assert 'empty' in reasons['empty.png'] and 'not a recognised' in reasons['text.jpg']


def test_odd_modes(mixed):
    root, _, _ = mixed
    gray = load_image(root / 'sub' / 'gray.png', SIZE)
    np.testing.assert_allclose(gray, 200 / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(load_image(root / 'sub' / 'rgba.png', SIZE), 1.0)  # white
    cmyk = load_image(root / 'cmyk.jpg', SIZE)  # pure red
    np.testing.assert_allclose(cmyk.mean((0, 1)), [1, -1, -1], atol=0.05)
    g16 = load_image(root / 'g16.png', 8)  # left half 65535, right half 32896; no resize
    np.testing.assert_allclose(g16[:, 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(g16[:, -1], 0.0, atol=0.01)


def test_load_image_errors_name_file(mixed):
    root, _, bad = mixed
    for name in bad:
        with pytest.raises(DataError, match=name):
            load_image(root / name, SIZE)


def test_folder_all_bad_raises(tmp_path):
    (tmp_path / 'x.png').write_bytes(b'')
    (tmp_path / 'y.jpg').write_bytes(b'hello')
    with pytest.raises(DataError, match='2 files') as e:
        ImageFolder(tmp_path, SIZE, log=lambda s: None)
    assert str(tmp_path) in str(e.value)


def test_folder_skips_bad_in_batches(mixed):
    root, good, bad = mixed
    logged = []
    ds = ImageFolder(root, SIZE, log=logged.append)
    for b in itertools.islice(ds.batches(4, seed=0), 6):  # 24 samples > 10 files
        assert b.shape == (4, SIZE, SIZE, 3) and np.isfinite(b).all()
    assert sorted(p.name for p, _ in ds.bad) == sorted(bad)
    assert len(logged) == len(bad)  # each bad file reported once


def _stream(ds, k):
    return list(itertools.islice(ds.batches(3, seed=7), k))


def test_batches_deterministic_and_resumable(mixed):
    root, _, _ = mixed
    ds = ImageFolder(root, SIZE, log=lambda s: None)
    full = _stream(ds, 9)  # 27 samples: wraps several epochs
    fresh = ImageFolder(root, SIZE, cache=False, log=lambda s: None)
    np.testing.assert_array_equal(np.stack(full), np.stack(_stream(fresh, 9)))
    for k in (1, 4, 7):
        resumed = list(itertools.islice(ds.batches(3, seed=7, start_step=k), 9 - k))
        np.testing.assert_array_equal(np.stack(resumed), np.stack(full[k:]))
    other = list(itertools.islice(ds.batches(3, seed=8), 9))
    assert not np.array_equal(np.stack(other), np.stack(full))


def test_flip_happens(tmp_path):
    rgb = Image.fromarray(_gradient(16, 16))
    for i in range(4):
        rgb.rotate(90 * i).save(tmp_path / f'{i}.png')
    ds = ImageFolder(tmp_path, SIZE)
    originals = [load_image(p, SIZE) for p in ds.paths]
    flipped = plain = 0
    for b in itertools.islice(ds.batches(4, seed=1), 5):
        for img in b:
            plain += any(np.array_equal(img, o) for o in originals)
            flipped += any(np.array_equal(img, o[:, ::-1]) for o in originals)
    assert flipped > 0 and plain > 0 and flipped + plain == 20
    no_flip = next(ds.batches(4, seed=1, flip=False))
    assert all(any(np.array_equal(img, o) for o in originals) for img in no_flip)


def test_hosts_yield_their_rows_of_the_same_global_batches(tmp_path):
    """2 hosts: each yields its half of every global batch, the halves side by side are the
    1-host batches, and each host decodes only the files of its rows."""
    for i in range(7):
        Image.new('RGB', (4, 4), (i * 30, 0, 0)).save(tmp_path / f'{i}.png')
    one = ImageFolder(tmp_path, 4, cache=False, log=lambda s: None)
    hosts = [ImageFolder(tmp_path, 4, process_index=r, process_count=2, cache=True, log=lambda s: None)
             for r in (0, 1)]
    for k, whole in enumerate(itertools.islice(one.batches(6, seed=3), 4)):
        halves = [next(h.batches(6, seed=3, start_step=k)) for h in hosts]
        assert halves[0].shape == (3, 4, 4, 3)
        np.testing.assert_array_equal(np.concatenate(halves), whole)
        assert not np.array_equal(halves[0], halves[1])
    # host 1 decoded only files drawn for its rows (and the first usable one, checked at start-up)
    hosts[1]._images.clear()
    next(hosts[1].batches(6, seed=3))
    assert len(hosts[1]._images) <= 3
    with pytest.raises(ValueError, match="divisible by the 2 processes"):
        next(hosts[0].batches(5, seed=3))
    # synthetic images likewise
    whole = next(synthetic_batches(4, 8, 3, seed=1, start_step=2))
    halves = [next(synthetic_batches(4, 8, 3, seed=1, start_step=2, process_index=r, process_count=2))
              for r in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(halves), whole)


def test_synthetic_batches():
    a = list(itertools.islice(synthetic_batches(2, 16, 3, seed=0), 3))
    assert a[0].shape == (2, 16, 16, 3) and a[0].dtype == np.float32
    assert all(x.min() >= -1 and x.max() <= 1 and x.std() > 0.05 for x in a)
    b = next(synthetic_batches(2, 16, 3, seed=0, start_step=2))
    np.testing.assert_array_equal(a[2], b)
    assert not np.array_equal(a[0], a[1])


def test_save_image_atomic_roundtrip(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (9, 7, 3), np.uint8)
    path = tmp_path / 'out' / 'deep' / 'x.png'
    save_image_atomic(path, img)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), img)
    save_image_atomic(path, img[::-1])  # overwrite
    np.testing.assert_array_equal(np.asarray(Image.open(path)), img[::-1])
    save_image_atomic(tmp_path / 'out' / 'f.jpg', img / 127.5 - 1.0)
    assert Image.open(tmp_path / 'out' / 'f.jpg').format == 'JPEG'
    assert sorted(p.name for p in (tmp_path / 'out').rglob('*')) == ['deep', 'f.jpg', 'x.png']


def test_atomic_dir_replaces_only_on_success(tmp_path):
    dest = tmp_path / 'models'
    with atomic_dir(dest) as tmp:
        assert tmp == str(tmp_path / 'models.tmp') and not (tmp_path / 'models.tmp').exists()
        (tmp_path / 'models.tmp').mkdir()
        (tmp_path / 'models.tmp' / 'a.txt').write_text('old')
    assert (dest / 'a.txt').read_text() == 'old' and not (tmp_path / 'models.tmp').exists()
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp_path / 'models.tmp').mkdir()
            (tmp_path / 'models.tmp' / 'b.txt').write_text('new')
            raise RuntimeError('killed half way')
    assert sorted(p.name for p in dest.iterdir()) == ['a.txt']   # the old folder is intact
    with atomic_dir(dest) as tmp:   # a leftover .tmp from the failed run is cleared first
        assert not (tmp_path / 'models.tmp').exists()
        (tmp_path / 'models.tmp').mkdir()
        (tmp_path / 'models.tmp' / 'c.txt').write_text('newer')
    assert sorted(p.name for p in dest.iterdir()) == ['c.txt']


def test_make_grid():
    imgs = np.full((5, 4, 6, 3), -1.0, np.float32)
    grid = make_grid(imgs, ncol=3)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 6 + 2, 3 * 8 + 2, 3)
    assert (grid[:2] == 255).all() and (grid[2:6, 2:8] == 0).all()
    assert (grid[8:12, 18:24] == 255).all()  # empty 6th cell stays white


@pytest.mark.parametrize('umask', [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask_and_are_atomic(tmp_path, umask):
    """Outputs get open()'s permissions (0666 less the umask), not mkstemp's 0600; a failed write
    leaves the old file and no temp file."""
    import os
    from ldu_jax import files
    from ldu_jax.protect import io as pio
    old = os.umask(umask)
    try:
        img = np.zeros((8, 8, 3), np.uint8)
        save_image_atomic(tmp_path / 'a.png', img)
        files.write_json(tmp_path / 'r.json', {'x': np.float32(1.5)})
        report = pio.write_report(tmp_path / 'out', [{'file': 'a.png'}])
        with open(tmp_path / 'plain.txt', 'w') as f:   # what a user's own file gets
            f.write('x')
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert (os.stat(tmp_path / 'plain.txt').st_mode & 0o777) == want
    for p in (tmp_path / 'a.png', tmp_path / 'r.json', report):
        assert (os.stat(p).st_mode & 0o777) == want, p
    assert files.read_json(tmp_path / 'r.json') == {'x': 1.5}
    with pytest.raises(RuntimeError):
        with files.atomic_write(tmp_path / 'r.json', 'w') as f:
            f.write('{"half": ')
            raise RuntimeError('killed half way')
    assert files.read_json(tmp_path / 'r.json') == {'x': 1.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.png', 'out', 'plain.txt', 'r.json']
