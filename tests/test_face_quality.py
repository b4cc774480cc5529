"""Face identity (dlib: FDFR, ISM) and no-reference quality (BRISQUE against the brisque package,
CLIP-IQA against transformers' image processor and a NumPy softmax on a tiny random CLIP; its parity
with transformers' PyTorch CLIP is in test_clip_model.py) on scikit-image's photos."""
import importlib.util
import os

import jax
import numpy as np
import pytest
from PIL import Image

from ldu_jax.metrics import face, quality
from numerics import assert_f32_close

skimage_data = pytest.importorskip('skimage.data')


@pytest.fixture(scope='module')
def photos():
    astro = skimage_data.astronaut()
    lfw = (skimage_data.lfw_subset()[0] * 255).astype(np.uint8)  # a 25x25 grey LFW face: another person
    other = np.array(Image.fromarray(lfw).resize((160, 160), Image.BICUBIC))
    return {'astro': astro, 'mirror': np.ascontiguousarray(astro[:, ::-1]), 'coffee': skimage_data.coffee(),
            'other': other}


@pytest.fixture(scope='module')
def dlib_model():
    pytest.importorskip('dlib')
    return face.load_face_model('dlib')


def test_detect_and_fdfr(photos, dlib_model):
    boxes = dlib_model.detect(photos['astro'])
    assert boxes.shape[1] == 4 and len(boxes) >= 1
    left, top, right, bottom = boxes[np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))]
    assert 150 < (left + right) / 2 < 290 and 50 < (top + bottom) / 2 < 190  # Eileen Collins' face
    assert dlib_model.detect(photos['coffee']).shape == (0, 4)
    assert dlib_model.embed(photos['coffee']) is None
    e = dlib_model.embed(photos['astro'])
    assert e.shape == (128,)
    assert np.isclose(np.linalg.norm(dlib_model.embed(photos['mirror']) - e), 0.19, atol=0.05)  # same-person < 0.6
    assert face.fdfr([photos['astro'], photos['coffee']], model=dlib_model) == 0.5


def test_ism_and_face_metrics(photos, dlib_model):
    same, n = face.ism([photos['mirror']], [photos['astro']], model=dlib_model)
    other, _ = face.ism([photos['other']], [photos['astro']], model=dlib_model)
    assert n == 1 and same > 0.95 and other < same - 0.1
    m = face.face_metrics([photos['mirror'], photos['coffee'], photos['other']], [photos['astro']],
                          model=dlib_model)
    assert m['n'] == 3 and m['n_faces'] == 2 and np.isclose(m['fdfr'], 1 / 3)
    assert np.isclose(m['ism'], (same + other) / 2)
    none, n = face.ism([photos['coffee']], [photos['astro']], model=dlib_model)
    assert n == 0 and np.isnan(none)
    with pytest.raises(ValueError, match='no face detected in any of the 1 reference'):
        face.ism([photos['astro']], [photos['coffee']], model=dlib_model)
    with pytest.raises(ValueError, match='uint8'):
        face.fdfr([photos['astro'].astype(np.float32)], model=dlib_model)
    with pytest.raises(ValueError, match="unknown face backend"):
        face.load_face_model('vgg')


def test_identity_fd_is_the_frechet_distance_of_unit_embeddings():
    from ldu_jax.metrics.fid import frechet_distance
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    a, b = unit(rng.normal(size=(12, 8)) + 3), unit(rng.normal(size=(10, 8)) - 3)
    fd = face.identity_fd([*a, None], [x * 5 for x in b])  # None (no face) skipped; scale removed
    ref = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert fd == pytest.approx(ref, rel=1e-6) and fd > 1.0
    assert face.identity_fd(list(a), list(a)) == pytest.approx(0.0, abs=1e-9)
    assert np.isnan(face.identity_fd([a[0], None], list(b)))  # fewer than 2 faces
    m = face.metrics_from_embeddings([a[0], None, a[1]], list(a))
    assert m['n'] == 3 and m['n_faces'] == 2 and np.isclose(m['fdfr'], 1 / 3) and m['fd'] > 0


def _reference_brisque(img):
    """The brisque package's own features (with its opencv resize) and libsvm prediction. Its
    ``score`` breaks on numpy 2 (it calls float() on 1-element arrays), so we flatten here."""
    cv2 = pytest.importorskip('cv2')
    pytest.importorskip('libsvm')
    from brisque import BRISQUE
    from skimage.color import rgb2gray
    ref = BRISQUE(url=False)
    g = rgb2gray(img)
    half = cv2.resize(g, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
    feats = [*ref.calculate_brisque_features(g, 7, 7 / 6), *ref.calculate_brisque_features(half, 7, 7 / 6)]
    return float(ref.calculate_image_quality_score(np.array([float(np.ravel(f)[0]) for f in feats])))


def test_brisque_matches_reference_package(photos):
    pytest.importorskip('brisque')
    chelsea = skimage_data.chelsea()  # odd width: checks the half-size resize
    imgs = [photos['astro'][:256, 128:384], photos['coffee'], chelsea]
    ours = quality.brisque(imgs)
    ref = np.array([_reference_brisque(im) for im in imgs])
    assert ours.shape == (3,)
    np.testing.assert_allclose(ours, ref, atol=0.02)


def test_brisque_rises_with_distortion(photos):
    if importlib.util.find_spec('brisque') is None:  # only its model files are needed here
        pytest.skip('the brisque package (model files) is not installed')
    from scipy import ndimage
    img = photos['coffee'][::2, ::2]
    blur = ndimage.gaussian_filter(img.astype(np.float64), (2, 2, 0))
    noise = img + np.random.default_rng(0).normal(0, 20, img.shape)
    imgs = np.stack([img, *(np.clip(np.rint(x), 0, 255).astype(np.uint8) for x in (blur, noise))])
    clean, blurred, noisy = quality.brisque(imgs)
    assert blurred > clean + 10 and noisy > clean + 10
    assert quality.brisque_features(img).shape == (36,)
    with pytest.raises(FileNotFoundError, match='svm.txt'):
        quality.brisque([img], model_dir='/nonexistent')


@pytest.fixture(scope='module')
def tiny_clip(tmp_path_factory):
    """A random tiny CLIP folder as transformers writes it: config.json, model.safetensors (our
    parameters in PyTorch's names and layouts), the tokenizer."""
    from safetensors.numpy import save_file
    from transformers import CLIPConfig

    from ldu_jax.sd import clip, convert
    from ldu_jax.sd import models as M
    from ldu_jax.sd.vae import compiled_init
    tok = M.tiny_tokenizer()
    vision = {'hidden_size': 32, 'intermediate_size': 37, 'num_hidden_layers': 2, 'num_attention_heads': 2,
              'image_size': 32, 'patch_size': 8}
    cfg = CLIPConfig(text_config=M.tiny_text_config(tok), vision_config=vision, projection_dim=16)
    model = clip.CLIPModel(clip.CLIPConfig.from_dict(cfg.to_dict()))
    params = compiled_init(model.init_params, jax.random.PRNGKey(0))
    path = str(tmp_path_factory.mktemp('clip'))
    cfg.save_pretrained(path)
    save_file(convert.flax_to_torch(jax.device_get(params)), os.path.join(path, 'model.safetensors'))
    tok.save_pretrained(path)
    return path


def test_clip_iqa(photos, tiny_clip):
    from transformers import CLIPImageProcessor
    imgs = [photos['astro'], photos['coffee'], skimage_data.chelsea()]
    scores = quality.clip_iqa(imgs, tiny_clip, batch_size=2)
    assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 1))
    assert np.ptp(scores) > 0

    model, params, tok = quality.load_clip(tiny_clip)
    proc = CLIPImageProcessor(size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32})
    px = proc(imgs, return_tensors='np')['pixel_values']
    t = tok(['Good photo.', 'Bad photo.'], padding=True, return_tensors='np')
    img = np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x, method=model.get_image_features))(
        params, px.transpose(0, 2, 3, 1)), np.float64)
    txt = np.asarray(jax.jit(lambda p, i: model.apply({'params': p}, i, method=model.get_text_features))(
        params, t['input_ids']), np.float64)
    img /= np.linalg.norm(img, axis=-1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
    logits = np.exp(float(params['logit_scale'])) * img @ txt.T
    expected = 1 / (1 + np.exp(logits[:, 1] - logits[:, 0]))
    # other batches: two cosines after a tower's ~20 layers, each moving the score by <= logit scale / 4
    assert_f32_close(scores, expected, depth=20, scale=np.exp(float(params['logit_scale'])) / 2)
