"""Tests for the mini-world: the portrait generator, its files, and the identity model's trainer."""

import hashlib
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from ldu_jax import data as data_lib
from ldu_jax.miniworld import world
from numerics import assert_f32_close


# -------------------------------------------------------------------------------- generator

def test_same_seed_same_person_pixels_and_caption():
    a, b = world.make_identity(123), world.make_identity(123)
    assert a == b
    np.testing.assert_array_equal(world.render(a, 7), world.render(b, 7))
    assert world.caption(a, 7) == world.caption(b, 7)
    np.testing.assert_array_equal(world.random_backgrounds(3, seed=1), world.random_backgrounds(3, seed=1))


def test_identities_and_variants_differ():
    ids = world.train_identities(6)
    assert len({(i.hair_style, i.hair_colour, i.accessory, i.eye_colour, i.skin) for i in ids}) == 6
    imgs = [world.render(i, 0) for i in ids]
    for j in range(1, 6):
        assert np.abs(imgs[0] - imgs[j]).mean() > 0.05
    assert np.abs(world.render(ids[0], 0) - world.render(ids[0], 1)).mean() > 0.01


def test_image_shape_range_dtype():
    ident = world.make_identity(0)
    x = world.render(ident, 3)
    assert x.shape == (64, 64, 3) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.1
    u = world.render(ident, 3, dtype=np.uint8)
    assert u.dtype == np.uint8 and u.shape == (64, 64, 3)
    assert world.render(ident, 3, size=32).shape == (32, 32, 3)
    neg = world.random_backgrounds(5, seed=0)
    assert neg.shape == (5, 64, 64, 3) and neg.min() >= -1 and neg.max() <= 1
    for kind in world.NONFACE_KINDS:
        assert world.render_nonface(0, kind=kind).shape == (64, 64, 3)


def test_train_and_heldout_seeds_disjoint():
    for s_train in range(3):
        for s_held in range(3):
            a = {i.seed for i in world.train_identities(50, s_train)}
            b = {i.seed for i in world.heldout_identities(50, s_held)}
            assert not a & b


def test_captions_name_only_present_attributes():
    vocab = set(world.vocabulary())
    for p in world.PROMPTS:
        assert set(world.words(p)) <= vocab
    mentioned = set()
    for ident in world.train_identities(80, seed=3):
        for v in range(3):
            text = world.caption(ident, v)
            w = world.words(text)
            mentioned |= set(w)
            assert set(w) <= vocab, text
            assert w[:3] in (["a", "photo", "of"], ["a", "portrait", "of"], ["a", "dslr", "portrait"],
                             ["a", "close-up", "photo"], ["a", "picture", "of"]), text
            assert ("glasses" in w) <= (ident.accessory == "glasses"), text
            assert ("sunglasses" in w) <= (ident.accessory == "sunglasses"), text
            assert ("hat" in w) <= (ident.accessory == "hat"), text
            assert ("earrings" in w) <= (ident.accessory == "earrings"), text
            for mark in world.MARKS:
                assert (mark in w) <= (mark in ident.marks), text
            assert ("bald" in w) <= (ident.hair_style == "bald"), text
            for style in ("short", "long", "curly", "bun"):
                assert (style in w) <= (ident.hair_style == style), text
            for k, word in enumerate(w[1:], 1):
                if word == "hair" and w[k - 1] in world.HAIR_COLOURS:
                    assert w[k - 1] == ident.hair_colour, text
                if word == "eyes":
                    assert w[k - 1] == ident.eye_colour and ident.accessory != "sunglasses", text
            assert ("smiling" in w) <= (world.make_variant(ident, v).expression == "smile"), text
    assert {"glasses", "hat", "beard", "hair", "eyes"} <= mentioned  # the captions do name things


def test_scene_captions_name_skin_shirt_and_background_and_keep_the_rest():
    vocab = set(world.vocabulary(scene=True))
    assert set(world.vocabulary()) < vocab
    for name, rgb in world.COLOUR_NAMES.items():
        assert world.colour_name(rgb) == name
    seen = set()
    for ident in world.train_identities(60, seed=5):
        for v in range(3):
            plain, text = world.caption(ident, v), world.caption(ident, v, scene=True)
            w = world.words(text)
            assert set(w) <= vocab, text
            var = world.make_variant(ident, v)
            if "shirt" in w:
                assert f"in a {world.colour_name(ident.shirt)} shirt" in text, text
            if "background" in w:
                seen.add(var.background)
                assert f"on a {world.colour_name(var.bg_colours[0])} " in text, text
                if var.background != "flat":
                    assert f"and {world.colour_name(var.bg_colours[1])} " in text, text
            if "skin" in w:
                assert w[w.index("skin") - 1] == world.skin_word(ident), text
            # the scene phrases are added to the plain caption's, drawn from an RNG of their own
            stripped = text.split(", in a ")[0].split(", on a ")[0]
            stripped = stripped.replace(f"{world.skin_word(ident)} skin, ", "").replace(
                f" and {world.skin_word(ident)} skin", "").replace(f"with {world.skin_word(ident)} skin and ", "with ")
            if stripped.endswith(f" with {world.skin_word(ident)} skin"):
                stripped = stripped[: -len(f" with {world.skin_word(ident)} skin")]
            assert stripped == plain, (plain, text)
    assert seen == {"flat", "gradient", "stripes", "blotches"}


# -------------------------------------------------------------------------------- styles

def _fine_rms(x):
    """RMS over pixels and channels of (image - its Gaussian blur, sigma 1 px), in [0, 1] units."""
    return float(np.sqrt(np.mean((_to01(x) - _blur(_to01(x), 1.0)) ** 2)))


def _to01(x):
    return (np.asarray(x, np.float64) + 1.0) / 2.0


def _blur(x, sigma):
    r = int(np.ceil(4 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    p = np.pad(x, ((r, r), (r, r), (0, 0)), mode="reflect")
    b = sum(k[i] * p[i:i + x.shape[0]] for i in range(2 * r + 1))
    return sum(k[i] * b[:, i:i + x.shape[1]] for i in range(2 * r + 1))


def _sha(u8):
    return hashlib.sha256(np.ascontiguousarray(u8).tobytes()).hexdigest()


def test_v1_pixels_unchanged_by_the_styles():
    # computed with the code before styles existed (uint8, so float rounding noise cannot hide a change)
    u = world.render(world.make_identity(3), 5, 64, dtype=np.uint8)
    assert [u[10, 20].tolist(), u[32, 32].tolist(), u[50, 40].tolist()] == [[91, 96, 162], [192, 185, 162],
                                                                              [127, 135, 93]]
    assert _sha(u) == "8ec5d7214ccc826467f540215441e14271278011cf3c5201db1d359ba2e7b52a"
    np.testing.assert_array_equal(world.render(world.make_identity(3), 5, 64, dtype=np.uint8, style="v1"), u)
    big = world.render(world.make_identity(7), 1, 128)
    assert _sha(data_lib.to_uint8(big)) == "63b9615596913403e6ec0081442591bbe2b0deb3e22ea4aa485e0a5b1b57c083"
    neg = world.random_backgrounds(5, seed=2)   # blobs, scrambled, faceless x2, background
    assert _sha(data_lib.to_uint8(neg)) == "0f24e8f7394bfbb9cdb175d58535f013682062aaa3f0b64bcfd1397b90d857c2"


def test_v2_deterministic_shape_range_and_distinct():
    ids = world.heldout_identities(4)
    a = world.render(ids[0], 2, 128, style="v2")
    np.testing.assert_array_equal(a, world.render(world.make_identity(ids[0].seed), 2, 128, style="v2"))
    assert a.shape == (128, 128, 3) and a.dtype == np.float32
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.1
    u = world.render(ids[0], 2, 128, dtype=np.uint8, style="v2")
    assert u.dtype == np.uint8 and u.shape == (128, 128, 3)
    np.testing.assert_array_equal(u, data_lib.to_uint8(a))
    assert world.render(ids[0], 2, 64, style="v2").shape == (64, 64, 3)
    batch = world.render_batch(ids[:2], [2, 2], 128, style="v2")
    assert batch.shape == (2, 128, 128, 3)
    np.testing.assert_array_equal(batch[0], a)
    assert np.abs(a - world.render(ids[0], 3, 128, style="v2")).mean() > 0.01          # variants differ
    for other in [batch[1]] + [world.render(i, 2, 128, style="v2") for i in ids[2:]]:
        assert np.abs(a - other).mean() > 0.05                               # people differ
    neg = world.random_backgrounds(5, seed=2, size=64, style="v2")
    np.testing.assert_array_equal(neg, world.random_backgrounds(5, seed=2, size=64, style="v2"))
    assert neg.shape == (5, 64, 64, 3) and neg.min() >= -1 and neg.max() <= 1
    assert np.abs(neg - world.random_backgrounds(5, seed=2, size=64)).mean() > 0.005
    for kind in world.NONFACE_KINDS:
        assert world.render_nonface(0, size=128, kind=kind, style="v2").shape == (128, 128, 3)


def test_v2_is_the_same_scene_as_v1_with_fine_structure():
    ids = world.heldout_identities(6)
    v1 = [world.render(i, 0, 128) for i in ids]
    v2 = [world.render(i, 0, 128, style="v2") for i in ids]
    fine1, fine2 = np.mean([_fine_rms(x) for x in v1]), np.mean([_fine_rms(x) for x in v2])
    assert fine2 >= 0.03 and fine2 > 2 * fine1, (fine1, fine2)
    # blurred, a v2 photo is close to its v1 twin (same shapes, colours, layout), far from other people
    lo1, lo2 = [_blur(_to01(x), 3.0) for x in v1], [_blur(_to01(x), 3.0) for x in v2]
    twins = [np.abs(a - b).mean() for a, b in zip(lo1, lo2)]
    others = [np.abs(lo1[i] - lo1[j]).mean() for i in range(6) for j in range(i + 1, 6)]
    assert max(twins) < 0.5 * np.mean(others), (twins, np.mean(others))


def test_sensor_noise_scales_only_the_noise():
    ident = world.heldout_identities(1)[0]
    sigma = world.make_variant(ident, 4).noise                  # std in [0, 1] units
    assert sigma > 0.01
    for style in world.STYLES:
        full = world.render(ident, 4, 128, style=style)
        np.testing.assert_array_equal(full, world.render(ident, 4, 128, style=style, sensor_noise=1.0))
        clean = world.render(ident, 4, 128, style=style, sensor_noise=0.0)
        half = world.render(ident, 4, 128, style=style, sensor_noise=0.5)
        inside = (np.abs(clean) < 0.8) & (np.abs(full) < 0.99)    # away from clipping
        # [-1, 1] is twice [0, 1]: the difference is the noise, of std 2 sigma (half of it at 0.5)
        assert np.std((full - clean)[inside]) == pytest.approx(2 * sigma, rel=0.05)
        assert np.std((half - clean)[inside]) == pytest.approx(sigma, rel=0.05)
        np.testing.assert_array_equal(world.render_batch([ident], [4], 128, style, sensor_noise=0.0)[0], clean)


def test_grain_scales_only_v2_white_grain():
    ident = world.heldout_identities(2)[1]
    v2 = world.render(ident, 1, 128, style="v2", sensor_noise=0.0)
    np.testing.assert_array_equal(v2, world.render(ident, 1, 128, style="v2", sensor_noise=0.0, grain=1.0))
    smooth = world.render(ident, 1, 128, style="v2", sensor_noise=0.0, grain=0.0)
    diff = np.abs(v2 - smooth)
    assert 0.003 < diff.mean() < 0.05                       # the grain, a small part of the picture ...
    assert _fine_rms(smooth) < _fine_rms(v2)                 # ... and of its fine structure
    assert np.abs(_blur(_to01(v2), 3.0) - _blur(_to01(smooth), 3.0)).mean() < 0.01   # the rest is the same
    np.testing.assert_array_equal(world.render(ident, 1, 64, grain=0.0), world.render(ident, 1, 64))   # v1: none
    np.testing.assert_array_equal(world.render_batch([ident], [1], 128, "v2", sensor_noise=0.0, grain=0.0)[0], smooth)


def test_unknown_style_raises(tmp_path):
    ident = world.make_identity(0)
    calls = {"v3": lambda style: world.render(ident, 0, style=style),
             "V2": lambda style: world.render_batch([], [], style=style),
             "flat": lambda style: world.render_nonface(0, style=style),
             "": lambda style: world.random_backgrounds(0, style=style),
             "v0": lambda style: world.write_training_set(str(tmp_path / "t"), 0, 1, style=style),
             "2": lambda style: world.write_heldout_subjects(str(tmp_path / "h"), 0, style=style)}
    for bad, call in calls.items():
        with pytest.raises(ValueError) as e:
            call(bad)
        assert repr(bad) in str(e.value) and "('v1', 'v2')" in str(e.value), str(e.value)
    assert not os.listdir(tmp_path)  # checked before anything is written (even with nothing to render)
    assert world.STYLES == ("v1", "v2")


def test_heldout_subjects_and_training_set_in_v2(tmp_path):
    root = str(tmp_path / "subjects")
    assert world.write_heldout_subjects(root, 1, seed=0, per_set=1, size=128, style="v2") == ["subject_0"]
    ident = world.heldout_identities(1, 0)[0]
    for k, s in enumerate(world.SETS):
        got = np.asarray(Image.open(os.path.join(root, "subject_0", s, "00.png")))
        assert got.shape == (128, 128, 3)
        np.testing.assert_array_equal(got, world.render(ident, k, 128, dtype=np.uint8, style="v2"))
    train = str(tmp_path / "train")
    assert world.write_training_set(train, 1, 1, size=128, style="v2") == 1
    got = np.asarray(Image.open(os.path.join(train, "images", "00000_000.png")))
    np.testing.assert_array_equal(got, world.render(world.train_identities(1)[0], 0, 128, dtype=np.uint8, style="v2"))


# -------------------------------------------------------------------------------- files

def _listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_heldout_subjects_layout_resumable_atomic(tmp_path):
    root = str(tmp_path / "subjects")
    names = world.write_heldout_subjects(root, 2, seed=0)
    assert names == ["subject_0", "subject_1"] and sorted(os.listdir(root)) == names
    for name in names:
        assert sorted(os.listdir(os.path.join(root, name))) == ["set_A", "set_B", "set_C", "subject.json"]
        for s in world.SETS:
            files = sorted(os.listdir(os.path.join(root, name, s)))
            assert files == ["00.png", "01.png", "02.png", "03.png"]
    assert not [f for f in _listing(root) if f.split("/")[-1].startswith(".")]  # no temp files left
    ident = world.heldout_identities(2, 0)[1]
    got = np.asarray(Image.open(os.path.join(root, "subject_1", "set_B", "02.png")))
    np.testing.assert_array_equal(got, world.render(ident, 6, dtype=np.uint8))  # set_B = variants 4..7
    meta = json.load(open(os.path.join(root, "subject_1", "subject.json")))
    assert meta["identity"]["seed"] == ident.seed and meta["captions"]["set_B/02.png"] == world.caption(ident, 6)
    # resumable: existing files are kept, missing ones are written again
    kept = os.path.join(root, "subject_0", "set_A", "00.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(kept)
    os.remove(os.path.join(root, "subject_0", "set_C", "03.png"))
    before = _listing(root)
    world.write_heldout_subjects(root, 2, seed=0)
    assert _listing(root) == sorted(before + ["subject_0/set_C/03.png"])
    assert np.asarray(Image.open(kept)).max() == 0


def test_training_set_captions_labels_resume(tmp_path):
    root = str(tmp_path / "train")
    assert world.write_training_set(root, 3, 2, seed=0) == 6
    rows = [json.loads(line) for line in open(os.path.join(root, "captions.jsonl"))]
    assert [r["label"] for r in rows] == [0, 0, 1, 1, 2, 2]
    idents = world.train_identities(3, 0)
    for r in rows:
        assert os.path.isfile(os.path.join(root, r["file"]))
        assert r["caption"] == world.caption(idents[r["label"]], r["variant"])
        assert r["identity_seed"] == idents[r["label"]].seed
    assert len(json.load(open(os.path.join(root, "identities.json")))) == 3
    assert world.write_training_set(root, 3, 2, seed=0) == 0  # resumed: nothing to redo


# -------------------------------------------------------------------------------- identity model

ID_DEPTH = 14   # the test profile's identity net: stem, 2 stages of norm + conv pairs, head


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from configs.miniworld_identity import get_config
    from ldu_jax.miniworld import identity
    c = get_config()
    c.n_identities, c.batch_size, c.neg_batch = 4, 8, 8
    c.max_steps, c.log_every, c.save_every, c.prefetch = 24, 6, 12, 1
    c.model.widths, c.model.embed_dim, c.model.groups = (4, 8, 8, 8), 8, 4
    c.optim.lr, c.optim.warmup = 1e-2, 2
    workdir = str(tmp_path_factory.mktemp("mw_identity"))
    state = identity.train(c, workdir, log=lambda *_: None)
    return c, workdir, state


@pytest.fixture(scope="module")
def tiny_model(tiny_run):
    from ldu_jax.miniworld import identity
    return identity.load(tiny_run[1], batch_size=4)


def test_identity_loss_falls(tiny_run):
    c, workdir, state = tiny_run
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [6, 12, 18, 24] and int(state.step) == 24
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2, rows
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_identity_resume_and_load_round_trip(tiny_run, tiny_model):
    import jax
    from ldu_jax.miniworld import identity
    c, workdir, state = tiny_run
    model = tiny_model
    imgs = np.stack([world.render(i, 5, dtype=np.uint8) for i in world.heldout_identities(6, 0)])
    e, p = model.run(imgs)
    assert e.shape == (6, 8) and p.shape == (6,)
    np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, atol=1e-5)
    net = identity.make_net(c.model)
    ref_e, ref_logit = net.apply({"params": jax.device_get(state.params["net"])}, imgs.astype(np.float32) / 127.5 - 1)
    # jit against op by op: the identity net's ~14 conv / norm / dense layers, on unit embeddings
    # and on logits of |ref_logit| (a sigmoid's slope is <= 1/4)
    assert_f32_close(e, np.asarray(ref_e) / np.linalg.norm(ref_e, axis=-1, keepdims=True), depth=ID_DEPTH, scale=1)
    assert_f32_close(p, 1 / (1 + np.exp(-np.asarray(ref_logit))), depth=ID_DEPTH,
                     scale=np.abs(ref_logit).max() / 4)
    # a larger image is centre-cropped and resized, a list works as well as an array
    big = np.asarray(Image.fromarray(imgs[0]).resize((128, 128), Image.BICUBIC))
    assert model.embed([big, imgs[1]]).shape == (2, 8)
    # resume: a longer run continues from step 24
    c2 = c.copy_and_resolve_references()
    c2.max_steps = 26
    logs = []
    assert int(identity.train(c2, workdir, log=logs.append).step) == 26
    assert any("resuming" in m and "24" in m for m in logs)


def test_identity_face_metrics_semantics(tiny_model):
    from ldu_jax.metrics import face
    model = tiny_model
    imgs = np.stack([world.render(i, v, dtype=np.uint8) for i in world.heldout_identities(3, 0) for v in range(2)])
    model.threshold = 0.0  # everything is a face
    m = model.face_metrics(imgs, imgs[:2])
    assert m["fdfr"] == 0.0 and m["n"] == 6 and m["n_faces"] == 6 and -1 <= m["ism"] <= 1
    e = model.embed(imgs).astype(np.float64)
    centre = e[:2].mean(0) / np.linalg.norm(e[:2].mean(0))
    # embeddings of other batches (the identity net's depth), then a mean and cosines (unit vectors)
    assert_f32_close(m["ism"], np.mean(e @ centre), depth=ID_DEPTH + 3, scale=1)
    assert_f32_close(model.face_metrics(imgs[:1], imgs[:1])["ism"], 1.0, depth=ID_DEPTH + 3)
    via_face = face.face_metrics(imgs, imgs[:2], model=model.as_face_model())
    assert via_face["n_faces"] == 6
    assert_f32_close(via_face["ism"], m["ism"], depth=ID_DEPTH + 3, scale=1)
    # others: the mean ISM against each other person's photos, as if each were the reference
    both = face.face_metrics(imgs, imgs[:2], model=model.as_face_model(), others=[imgs[2:4], imgs[4:]])
    assert both["ism"] == via_face["ism"]
    assert_f32_close(both["ism_others"], np.mean([model.face_metrics(imgs, r)["ism"] for r in (imgs[2:4], imgs[4:])]),
                     depth=ID_DEPTH + 3, scale=1)
    assert "ism_others" not in via_face
    # split by detector score: references detected, images not -> ISM nan, FDFR 1
    p = model.face_prob(imgs)
    order = np.argsort(p)
    assert p[order[-1]] > p[order[0]]
    model.threshold = float((p[order[0]] + p[order[-1]]) / 2)
    low, high = imgs[p <= model.threshold], imgs[p > model.threshold]
    m = model.face_metrics(low, high)
    assert m["fdfr"] == 1.0 and m["n_faces"] == 0 and math.isnan(m["ism"]) and m["n"] == len(low)
    assert model.detect(high).all() and not model.detect(low).any()
    with pytest.raises(ValueError, match="reference"):
        model.face_metrics(high, low)
