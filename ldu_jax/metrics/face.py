"""Face identity metrics of generated images: FDFR (face detection failure rate) and ISM
(identity score matching), as in Anti-DreamBooth's evaluation.

Images are uint8 HxWx3 RGB numpy arrays (HxW grey and HxWx4 RGBA are converted), given as a list
or an NxHxWx3 array, of any size. Backends:

- ``'dlib'`` (default, offline): dlib's HOG frontal face detector, its 5-point landmark model and
  its 128-d ResNet face descriptor, read from the ``face_recognition_models`` package
  (``pip install dlib-bin face-recognition-models``).
- ``'arcface'``: ArcFace embeddings through ``deepface`` (RetinaFace detector, as Anti-DreamBooth)
  or else ``insightface`` (buffalo_l), whichever is installed; both fetch their weights on first use.

ISM is the mean cosine similarity between each image's face embedding (its largest face) and the
mean of the reference (clean) photos' unit embeddings; images without a face are left out of ISM
and counted by FDFR.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import numpy as np

from ldu_jax.errors import ConfigError
from ldu_jax.metrics.image import as_images

DLIB_INSTALL = 'pip install dlib-bin face-recognition-models'


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / max(np.linalg.norm(v), 1e-12)


class FaceModel:
    """A face detector + embedder. ``detect(img) -> (n, 4)`` int boxes (left, top, right, bottom);
    ``embed(img) ->`` the largest face's embedding (float64 vector) or None when no face is found."""

    name = 'base'

    def faces(self, img: np.ndarray) -> list[tuple[np.ndarray, object]]:
        """(box, handle) per detected face; the handle is whatever ``_embed_face`` needs."""
        raise NotImplementedError

    def _embed_face(self, img: np.ndarray, handle) -> np.ndarray:
        raise NotImplementedError

    def detect(self, img: np.ndarray) -> np.ndarray:
        (img,) = as_images([img], 'img')
        boxes = [b for b, _ in self.faces(img)]
        return np.asarray(boxes, np.int64).reshape(-1, 4)

    def embed_batch(self, images) -> list:
        """``embed`` of each image (models that embed a batch in one pass override this)."""
        return [self.embed(img) for img in images]

    def embed(self, img: np.ndarray) -> np.ndarray | None:
        (img,) = as_images([img], 'img')
        found = self.faces(img)
        if not found:
            return None
        _box, handle = max(found, key=lambda f: (f[0][2] - f[0][0]) * (f[0][3] - f[0][1]))
        return np.asarray(self._embed_face(img, handle), np.float64)


class DlibFaceModel(FaceModel):
    """dlib HOG detector (``upsample`` pyramid-ups), 5- or 68-point landmarks, 128-d descriptor."""

    name = 'dlib'

    def __init__(self, *, landmarks: int = 5, upsample: int = 1, jitters: int = 1):
        try:
            import dlib
        except ImportError as e:
            raise ImportError(f'the dlib face backend needs dlib: {DLIB_INSTALL}') from e
        spec = importlib.util.find_spec('face_recognition_models')  # not imported: it needs pkg_resources
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f'the dlib face backend needs the face_recognition_models package: {DLIB_INSTALL}')
        models = os.path.join(next(iter(spec.submodule_search_locations)), 'models')
        if landmarks not in (5, 68):
            raise ValueError(f'landmarks must be 5 or 68, got {landmarks}')
        paths = {'shape': os.path.join(models, f'shape_predictor_{landmarks}_face_landmarks.dat'),
                 'descriptor': os.path.join(models, 'dlib_face_recognition_resnet_model_v1.dat')}
        for p in paths.values():
            if not os.path.isfile(p):
                raise FileNotFoundError(f'{p}: missing dlib model file; reinstall: {DLIB_INSTALL}')
        self.detector = dlib.get_frontal_face_detector()
        self.shape = dlib.shape_predictor(paths['shape'])
        self.descriptor = dlib.face_recognition_model_v1(paths['descriptor'])
        self.upsample, self.jitters = int(upsample), int(jitters)

    def faces(self, img):
        return [(np.array([r.left(), r.top(), r.right(), r.bottom()]), r)
                for r in self.detector(img, self.upsample)]

    def _embed_face(self, img, rect):
        return np.array(self.descriptor.compute_face_descriptor(img, self.shape(img, rect), self.jitters))


class DeepFaceArcFace(FaceModel):
    """ArcFace (512-d) through deepface, with its ``detector`` (RetinaFace by default)."""

    name = 'arcface'

    def __init__(self, *, detector: str = 'retinaface'):
        from deepface import DeepFace
        self._df, self.detector = DeepFace, detector

    def faces(self, img):
        reps = self._df.represent(img_path=np.ascontiguousarray(img[..., ::-1]), model_name='ArcFace',
                                  detector_backend=self.detector, enforce_detection=False, align=True)
        out = []
        for r in reps:
            if not r.get('face_confidence'):  # no face: deepface returns the whole image with confidence 0
                continue
            a = r['facial_area']
            out.append((np.array([a['x'], a['y'], a['x'] + a['w'], a['y'] + a['h']]), r['embedding']))
        return out

    def _embed_face(self, img, embedding):
        return embedding


class InsightFaceArcFace(FaceModel):
    """ArcFace (512-d, buffalo_l) through insightface on the CPU or a CUDA onnxruntime."""

    name = 'arcface'

    def __init__(self, *, pack: str = 'buffalo_l', det_size: int = 640):
        from insightface.app import FaceAnalysis
        self.app = FaceAnalysis(name=pack, providers=['CUDAExecutionProvider', 'CPUExecutionProvider'])
        self.app.prepare(ctx_id=0, det_size=(det_size, det_size))

    def faces(self, img):
        return [(np.round(f.bbox).astype(np.int64), f.normed_embedding)
                for f in self.app.get(np.ascontiguousarray(img[..., ::-1]))]

    def _embed_face(self, img, embedding):
        return embedding


@functools.lru_cache(maxsize=4)
def load_face_model(backend: str = 'dlib', **options) -> FaceModel:
    """The face backend ``'dlib'`` or ``'arcface'``, loaded once per (backend, options)."""
    if backend == 'dlib':
        return DlibFaceModel(**options)
    if backend == 'arcface':
        if importlib.util.find_spec('deepface') is not None:
            return DeepFaceArcFace(**options)
        if importlib.util.find_spec('insightface') is not None:
            return InsightFaceArcFace(**options)
        raise ImportError("backend='arcface' needs deepface (pip install deepface) or insightface "
                          "(pip install insightface onnxruntime); neither is installed")
    raise ConfigError(f"unknown face backend {backend!r}: expected 'dlib' or 'arcface'")


def _model(model, backend):
    return model if model is not None else load_face_model(backend)


def embeddings(images, *, backend: str = 'dlib', model: FaceModel | None = None) -> list:
    """The largest face's embedding per image (None where no face is detected)."""
    return _model(model, backend).embed_batch(as_images(images))


def _ref_embeddings(reference_images, model):
    return model.embed_batch(as_images(reference_images, 'reference_images'))


def _fdfr(embs) -> float:
    return float(np.mean([e is None for e in embs])) if embs else math.nan


def _ism(embs, ref_embs) -> tuple[float, int]:
    refs = [_unit(e) for e in ref_embs if e is not None]
    if not refs:
        raise ValueError(f'ism: no face detected in any of the {len(ref_embs)} reference images')
    centre = _unit(np.mean(refs, axis=0))
    sims = [float(_unit(e) @ centre) for e in embs if e is not None]
    return (float(np.mean(sims)) if sims else math.nan), len(sims)


def fdfr(images, *, backend: str = 'dlib', model: FaceModel | None = None) -> float:
    """Face detection failure rate: the share of images in which no face is detected."""
    return _fdfr(embeddings(images, backend=backend, model=model))


def ism(images, reference_images, *, backend: str = 'dlib', model: FaceModel | None = None
        ) -> tuple[float, int]:
    """(ISM, n_faces): mean cosine similarity of each detected face to the references' mean unit
    embedding, over the n_faces images with a face; (nan, 0) when none has one."""
    model = _model(model, backend)
    return _ism(embeddings(images, model=model), _ref_embeddings(reference_images, model))


def identity_fd(embs, ref_embs) -> float:
    """Fréchet distance between the Gaussian fits of the unit embeddings of the detected faces
    (``None`` entries are skipped) and of the detected references; nan with fewer than 2 of either."""
    from ldu_jax.metrics.fid import frechet_distance_features
    a = [_unit(e) for e in embs if e is not None]
    b = [_unit(e) for e in ref_embs if e is not None]
    return frechet_distance_features(np.stack(a), np.stack(b)) if min(len(a), len(b)) >= 2 else math.nan


def face_metrics(images, reference_images, *, backend: str = 'dlib', model: FaceModel | None = None,
                 others=()) -> dict:
    """dict(fdfr, ism, fd (``identity_fd``), n (images), n_faces (images with a face)); each image
    is embedded once. ``others``: reference photo sets of other people; adds ``ism_others``, the mean
    ISM of ``images`` against each set with a face (what samples that did not learn the person score)."""
    model = _model(model, backend)
    embs = embeddings(images, model=model)
    out = metrics_from_embeddings(embs, _ref_embeddings(reference_images, model))
    if len(others):
        refs = [r for r in (_ref_embeddings(o, model) for o in others) if any(e is not None for e in r)]
        out['ism_others'] = float(np.nanmean([_ism(embs, r)[0] for r in refs])) if refs else math.nan
    return out


def metrics_from_embeddings(embs, ref_embs) -> dict:
    """``face_metrics`` from per-image embeddings (``None``: no face detected)."""
    score, n_faces = _ism(embs, ref_embs)
    return {'fdfr': _fdfr(embs), 'ism': score, 'fd': identity_fd(embs, ref_embs), 'n': len(embs),
            'n_faces': n_faces}
