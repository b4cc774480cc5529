"""What an evaluation measures in a cell: the protected photos' imperceptibility, and the attack's
generated images against the person's clean photos; a metric that cannot run is recorded as
skipped with its reason, not failed."""
from __future__ import annotations

import numpy as np
from PIL import Image

from ldu_jax import sources
from ldu_jax.evaluate.subjects import read_images
from ldu_jax.metrics import face, fid, quality
from ldu_jax.metrics import image as im


class Skip(Exception):
    """A cell or metric that cannot be computed, with the reason recorded in results.csv."""


class Metrics:
    """The measurement models, loaded once; each metric knows why it cannot run."""

    def __init__(self, cfg, log=print):
        self.cfg, self.log, self._cache = cfg, log, {}

    def _get(self, name, load):
        if name not in self._cache:
            try:
                self._cache[name] = (load(), None)
            except Exception as e:  # noqa: BLE001 - recorded as the metric's skip reason
                self._cache[name] = (None, f"{name}: {e}")
                self.log(f"metric {name} skipped: {e}")
        model, reason = self._cache[name]
        if reason:
            raise Skip(reason)
        return model

    def fid_params(self):
        def load():
            if not self.cfg.fid_weights:
                raise Skip("no Inception weights (config fid_weights)")
            return fid.load_weights(self.cfg.fid_weights)
        return self._get("fid", load)

    def fid(self, images_a, images_b):
        p = self.fid_params()
        return fid.fid(p, np.stack(same_size(images_a)), np.stack(same_size(images_b)),
                       batch_size=self.cfg.fid_batch)

    def face(self, images, reference, others=()):
        model = self._get("face", lambda: sources.face_model(self.cfg.face_backend))
        try:
            m = face.face_metrics(images, reference, model=model, others=others)
        except ValueError as e:  # e.g. no face in the reference photos
            raise Skip(str(e)) from None
        return {"fdfr": m["fdfr"], "ism": m["ism"], "fd_identity": m["fd"],
                **({"ism_others": m["ism_others"]} if others else {})}

    def brisque(self, images):
        return float(np.mean(quality.brisque(images)))

    def clip_iqa(self, images):
        if not self.cfg.clip_iqa:
            raise Skip("no CLIP weights (config clip_iqa)")
        return float(np.mean(quality.clip_iqa(images, self.cfg.clip_iqa)))


def same_size(images):
    h, w = images[0].shape[:2]
    return [i if i.shape[:2] == (h, w) else np.asarray(Image.fromarray(i).resize((w, h), Image.BICUBIC))
            for i in images]


def _measure(row: dict, notes: list, name: str, fn):
    """row[name] = fn() (or a dict of columns), recording a skip reason in notes instead of failing."""
    try:
        value = fn()
    except Skip as e:
        notes.append(f"{name} skipped: {e}")
        return
    except Exception as e:  # noqa: BLE001 - a metric failure must not stop the table
        notes.append(f"{name} failed: {type(e).__name__}: {e}")
        return
    row.update(value if isinstance(value, dict) else {name: value})


def imperceptibility(clean_dir: str, protected_dir: str, metrics: Metrics) -> dict:
    """PSNR / SSIM / L-inf of protected vs clean (paired by stem) and FID between the two sets."""
    stems_c, clean = read_images(clean_dir)
    stems_p, prot = read_images(protected_dir)
    by_stem = dict(zip(stems_p, prot))
    pairs = [(c, by_stem[s]) for s, c in zip(stems_c, clean) if s in by_stem and by_stem[s].shape == c.shape]
    out, notes = {"n_protected": len(prot)}, []
    if pairs:
        a = [p[0].astype(np.float32) / 255 for p in pairs]
        b = [p[1].astype(np.float32) / 255 for p in pairs]
        out["psnr"] = float(np.mean([im.psnr(x, y) for x, y in zip(a, b)]))
        out["ssim"] = float(np.mean([float(im.ssim(x, y)) for x, y in zip(a, b)]))
        out["linf"] = float(np.max([im.linf(x, y) for x, y in zip(a, b)]))
    _measure(out, notes, "fid_protected", lambda: metrics.fid(clean, prot))
    out["notes"] = "; ".join(notes)
    return out


def generation_metrics(generated, reference, metrics: Metrics, others=()) -> dict:
    """Protection metrics of the attack's generated images against the person's clean photos
    (``others``: other people's clean photo sets, for ``ism_others``)."""
    out, notes = {"n_generated": len(generated)}, []
    _measure(out, notes, "face", lambda: metrics.face(generated, reference, others))
    _measure(out, notes, "brisque", lambda: metrics.brisque(generated))
    _measure(out, notes, "clip_iqa", lambda: metrics.clip_iqa(generated))
    _measure(out, notes, "fid_generated", lambda: metrics.fid(reference, generated))
    out["notes"] = "; ".join(notes)
    return out


