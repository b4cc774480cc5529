"""The mini-world: procedural 64x64 portraits of seeded identities, with captions.

An *identity* (``make_identity(seed)``) is a fixed set of attributes drawn from a seeded RNG: head
shape, skin tone, hair style and colour, eye shape and colour, brows, nose, mouth, clothing,
accessory (glasses, sunglasses, hat, earrings) and marks (mole, freckles, scar, beard). An *image*
(``render(identity, variant)``) varies pose (shift, scale, rotation), expression (neutral, smile,
open mouth, raised brows), lighting (direction, strength, tint), background (flat, gradient,
stripes, blotches) and sensor noise; the variant number seeds those draws, so the same
(identity, variant) always gives the same pixels. Shapes are drawn as signed distances with a
one-pixel coverage ramp (anti-aliased without supersampling), in numpy.

``caption(identity, variant)`` names attributes that are visible ("a photo of a person with short
red hair and glasses"); ``caption(..., scene=True)`` also names the skin tone, the shirt's colour
and the background ("..., in a blue shirt, on a green and pink striped background"), which carry
most of an image's variance; ``vocabulary(scene)`` lists every word a caption or an attack prompt
can use.

Files: ``write_training_set`` (images, ``captions.jsonl`` with identity labels, ``identities.json``)
and ``write_heldout_subjects`` (the Anti-DreamBooth layout ``<root>/<subject>/set_A|set_B|set_C``)
write atomically and keep files that already exist, so an interrupted run resumes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import numpy as np

from ldu_jax import data as data_lib

# -------------------------------------------------------------------------------- attributes

SKIN_TONES = np.array([[0.98, 0.86, 0.76], [0.95, 0.78, 0.65], [0.89, 0.70, 0.56], [0.80, 0.60, 0.45],
                       [0.70, 0.50, 0.36], [0.58, 0.40, 0.28], [0.45, 0.30, 0.21], [0.34, 0.22, 0.16]])
HAIR_COLOURS = {"black": (0.08, 0.07, 0.07), "brown": (0.38, 0.22, 0.10), "blonde": (0.93, 0.80, 0.45),
                "red": (0.72, 0.20, 0.08), "grey": (0.60, 0.60, 0.62), "white": (0.95, 0.95, 0.93),
                "blue": (0.15, 0.35, 0.85), "pink": (0.95, 0.45, 0.70)}
HAIR_STYLES = ("short", "long", "bald", "curly", "bun")
EYE_COLOURS = {"brown": (0.35, 0.20, 0.08), "blue": (0.20, 0.45, 0.90), "green": (0.20, 0.60, 0.25),
               "grey": (0.55, 0.58, 0.62)}
EYE_SHAPES = ("round", "almond", "narrow")
BROW_STYLES = ("thin", "thick", "arched")
NOSE_STYLES = ("small", "long", "wide")
ACCESSORIES = ("none", "glasses", "sunglasses", "hat", "earrings")
_ACCESSORY_P = (0.40, 0.18, 0.12, 0.15, 0.15)
EXPRESSIONS = ("neutral", "smile", "open")
MARKS = ("mole", "freckles", "scar", "beard")
_MARK_P = {"mole": 0.25, "freckles": 0.2, "scar": 0.12, "beard": 0.22}

#: The prompts the attacks and the evaluation use (their words are in ``vocabulary()``).
PROMPTS = ("a photo of sks person", "a dslr portrait of sks person", "a photo of person", "person", "photo",
           "dslr", "portrait", "sks")
_PREFIXES = ("a photo of a", "a portrait of a", "a dslr portrait of a", "a close-up photo of a",
             "a picture of a")

TRAIN_BASE, HELDOUT_OFFSET, BLOCK = 0, 2 ** 19, 2 ** 20
SETS = ("set_A", "set_B", "set_C")


@dataclasses.dataclass(frozen=True)
class Identity:
    """A person of the world: everything that stays the same across their photos."""
    seed: int
    face_w: float            # head half-width (face units; the canvas spans [-1, 1])
    face_h: float            # head half-height
    jaw: float               # 0 round .. 1 narrow pointed chin
    skin: tuple
    hair_style: str
    hair_colour: str
    hairline: float          # how far down the forehead the hair reaches
    eye_shape: str
    eye_colour: str
    eye_spacing: float
    eye_size: float
    eye_height: float
    brows: str
    nose: str
    mouth_width: float
    lip: tuple
    shirt: tuple
    accessory: str
    accessory_colour: tuple
    marks: tuple             # subset of MARKS
    mole_pos: tuple

    def has(self, attribute: str) -> bool:
        """Whether a mark or accessory name applies ('glasses', 'beard', ...)."""
        return attribute in self.marks or attribute == self.accessory

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_identity(seed: int) -> Identity:
    """The identity with this seed (any non-negative int); the same seed gives the same person."""
    r = np.random.default_rng([0x1D, int(seed)])
    skin = SKIN_TONES[r.integers(len(SKIN_TONES))] * r.uniform(0.94, 1.04, 3)
    hair_colour = str(r.choice(list(HAIR_COLOURS), p=[0.2, 0.2, 0.14, 0.12, 0.1, 0.06, 0.09, 0.09]))
    hair_style = str(r.choice(HAIR_STYLES, p=[0.3, 0.25, 0.1, 0.2, 0.15]))
    accessory = str(r.choice(ACCESSORIES, p=_ACCESSORY_P))
    marks = tuple(m for m in MARKS if r.uniform() < _MARK_P[m])
    lip = np.clip(skin * np.array([0.85, 0.55, 0.55]) + [0.1, 0.0, 0.0], 0, 1)
    return Identity(
        seed=int(seed), face_w=float(r.uniform(0.30, 0.40)), face_h=float(r.uniform(0.40, 0.50)),
        jaw=float(r.uniform(0.0, 1.0)), skin=tuple(np.clip(skin, 0, 1).round(4)),
        hair_style=hair_style, hair_colour=hair_colour, hairline=float(r.uniform(-0.22, -0.08)),
        eye_shape=str(r.choice(EYE_SHAPES)), eye_colour=str(r.choice(list(EYE_COLOURS))),
        eye_spacing=float(r.uniform(0.11, 0.16)), eye_size=float(r.uniform(0.045, 0.065)),
        eye_height=float(r.uniform(-0.06, 0.02)), brows=str(r.choice(BROW_STYLES)),
        nose=str(r.choice(NOSE_STYLES)), mouth_width=float(r.uniform(0.08, 0.15)), lip=tuple(lip.round(4)),
        shirt=tuple(r.uniform(0.05, 0.95, 3).round(4)), accessory=accessory,
        accessory_colour=tuple(r.uniform(0.05, 0.95, 3).round(4)), marks=marks,
        mole_pos=(float(r.uniform(-0.2, 0.2)), float(r.uniform(0.0, 0.25))))


def train_identities(n: int, seed: int = 0) -> list[Identity]:
    """``n`` training identities; their seeds never meet ``heldout_identities``' (any seeds)."""
    if n > HELDOUT_OFFSET:
        raise ValueError(f"at most {HELDOUT_OFFSET} identities per seed, asked for {n}")
    return [make_identity(seed * BLOCK + TRAIN_BASE + i) for i in range(n)]


def heldout_identities(n: int, seed: int = 0) -> list[Identity]:
    """``n`` held-out identities (for protection / personalization tests), disjoint from training."""
    if n > BLOCK - HELDOUT_OFFSET:
        raise ValueError(f"at most {BLOCK - HELDOUT_OFFSET} identities per seed, asked for {n}")
    return [make_identity(seed * BLOCK + HELDOUT_OFFSET + i) for i in range(n)]


# -------------------------------------------------------------------------------- drawing

def _cov(d, aa):
    """Coverage of a shape with signed distance ``d`` (negative inside), one-pixel ramp ``aa``."""
    return np.clip(0.5 - d / aa, 0.0, 1.0)


def _ellipse(u, v, cx, cy, a, b):
    return (np.sqrt(((u - cx) / a) ** 2 + ((v - cy) / b) ** 2) - 1.0) * min(a, b)


def _circle(u, v, cx, cy, r):
    return np.sqrt((u - cx) ** 2 + (v - cy) ** 2) - r


def _box(u, v, cx, cy, hw, hh, r=0.0):
    qx, qy = np.abs(u - cx) - hw + r, np.abs(v - cy) - hh + r
    return np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2) + np.minimum(np.maximum(qx, qy), 0) - r


def _segment(u, v, x0, y0, x1, y1, r):
    px, py, dx, dy = u - x0, v - y0, x1 - x0, y1 - y0
    t = np.clip((px * dx + py * dy) / (dx * dx + dy * dy + 1e-12), 0, 1)
    return np.sqrt((px - t * dx) ** 2 + (py - t * dy) ** 2) - r


def _curve(u, v, cx, cy, half_w, bend, r):
    """A thick parabola arc v = cy + bend * ((u - cx) / half_w)^2 - bend for |u - cx| <= half_w."""
    x = (u - cx) / half_w
    d = np.abs(v - (cy + bend * (x * x - 1.0))) - r
    return np.maximum(d, np.abs(u - cx) - half_w)


def _paint(img, cov, colour):
    cov = cov[..., None]
    img *= 1.0 - cov
    img += cov * np.asarray(colour, np.float32)


@dataclasses.dataclass(frozen=True)
class Variant:
    """What changes between photos of one identity."""
    dx: float
    dy: float
    scale: float
    angle: float
    expression: str
    brow_raise: float
    light_dir: float
    light_strength: float
    brightness: float
    tint: tuple
    background: str
    bg_colours: tuple
    noise: float
    gaze: tuple


def make_variant(identity: Identity, variant: int) -> Variant:
    r = np.random.default_rng([0x7A, identity.seed, int(variant)])
    return Variant(
        dx=float(r.uniform(-0.12, 0.12)), dy=float(r.uniform(-0.08, 0.10)), scale=float(r.uniform(0.95, 1.2)),
        angle=float(r.uniform(-0.2, 0.2)), expression=str(r.choice(EXPRESSIONS, p=[0.45, 0.35, 0.2])),
        brow_raise=float(r.uniform(0, 0.04) if r.uniform() < 0.3 else 0.0),
        light_dir=float(r.uniform(0, 2 * np.pi)), light_strength=float(r.uniform(0.0, 0.35)),
        brightness=float(r.uniform(0.8, 1.15)), tint=tuple(r.uniform(0.9, 1.1, 3)),
        background=str(r.choice(("flat", "gradient", "stripes", "blotches"))),
        bg_colours=tuple(map(tuple, r.uniform(0.05, 0.95, (2, 3)))), noise=float(r.uniform(0.0, 0.04)),
        gaze=(float(r.uniform(-0.3, 0.3)), float(r.uniform(-0.2, 0.2))))


def _grid(size):
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    return np.meshgrid(c, c)  # x right, y down


def _background(size, kind, colours, rng):
    x, y = _grid(size)
    c0, c1 = (np.asarray(c, np.float32) for c in colours)
    if kind == "flat":
        t = np.zeros_like(x)
    elif kind == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        t = np.clip(0.5 + 0.5 * (np.cos(a) * x + np.sin(a) * y), 0, 1)
    elif kind == "stripes":
        a, f = rng.uniform(0, np.pi), rng.uniform(2, 6)
        t = 0.5 + 0.5 * np.sin(np.pi * f * (np.cos(a) * x + np.sin(a) * y) + rng.uniform(0, 6.3))
    else:  # blotches: a few soft random bumps
        t = np.zeros_like(x)
        for _ in range(4):
            cx, cy, s = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.2, 0.6)
            t += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))
        t = np.clip(t, 0, 1)
    return (c0 * (1 - t[..., None]) + c1 * t[..., None]).astype(np.float32)


def _draw_person(img, ident: Identity, var: Variant, size: int, features: bool = True):
    """Paint the person over ``img`` (float32 HxWx3 in [0, 1]) in place."""
    x, y = _grid(size)
    ca, sa = np.cos(var.angle), np.sin(var.angle)
    px, py = (x - var.dx) / var.scale, (y - var.dy) / var.scale
    u, v = ca * px + sa * py, -sa * px + ca * py          # face coordinates (rotated, scaled)
    aa = 2.0 / size / var.scale
    skin, hair = np.asarray(ident.skin, np.float32), np.asarray(HAIR_COLOURS[ident.hair_colour], np.float32)
    fw, fh = ident.face_w, ident.face_h
    style, hat = ident.hair_style, ident.accessory == "hat"

    # long hair and buns behind the head; then neck and shoulders
    if style == "long":
        _paint(img, _cov(_box(u, v, 0, 0.18, fw + 0.09, 0.52, 0.15), aa), hair * 0.92)
    if style == "bun" and not hat:
        _paint(img, _cov(_circle(u, v, 0, -fh - 0.12, 0.14), aa), hair)
    _paint(img, _cov(_box(u, v, 0, fh + 0.05, 0.11, 0.2, 0.03), aa), skin * 0.85)
    _paint(img, _cov(_ellipse(u, v, 0, fh + 0.55, fw + 0.35, 0.4), aa), ident.shirt)
    if style == "long":  # locks over the shoulders
        for s in (-1, 1):
            _paint(img, _cov(_box(u, v, s * (fw + 0.02), 0.35, 0.07, 0.3, 0.06), aa), hair * 0.95)
    # ears, head (narrower towards the chin with ``jaw``)
    for s in (-1, 1):
        _paint(img, _cov(_ellipse(u, v, s * fw * 0.98, 0.02, 0.05, 0.085), aa), skin * 0.93)
    taper = 1.0 - 0.38 * ident.jaw * np.clip(v / fh, 0, 1) ** 2
    head_d = (np.sqrt((u / (fw * taper)) ** 2 + (v / fh) ** 2) - 1.0) * fw
    head = _cov(head_d, aa)
    shade = 1.0 - 0.18 * np.clip(1.0 + head_d / 0.12, 0, 1)[..., None]  # darker towards the rim
    img[:] = img * (1 - head[..., None]) + head[..., None] * skin * shade
    if "beard" in ident.marks:
        beard = _cov(np.maximum(head_d - 0.012, 0.16 - v), aa) * (0.8 if features else 0.0)
        _paint(img, beard, hair * 0.9)
    # hair on top of the head
    if style in ("short", "long", "bun"):
        wig = np.maximum(_ellipse(u, v, 0, -0.02, fw + 0.035, fh + 0.05), v - (ident.hairline - 0.2
                         + 0.04 * np.cos(u * 14.0 + ident.seed)))
        if style == "long":
            wig = np.minimum(wig, np.maximum(_box(u, v, 0, -0.05, fw + 0.05, 0.3, 0.05),
                                             np.abs(u) - fw + 0.06 - 0.25 * np.clip(v + 0.1, 0, 1)))
            wig = np.maximum(wig, -np.maximum(np.abs(u) - fw + 0.08, ident.hairline - 0.15 - v))
        _paint(img, _cov(wig, aa), hair)
    elif style == "curly":
        n = 11
        for k in range(n):
            t = np.pi * (0.05 + 0.9 * k / (n - 1))
            cx, cy = -np.cos(t) * (fw + 0.02), -np.sin(t) * (fh * 0.95) + 0.02
            _paint(img, _cov(_circle(u, v, cx, cy, 0.085), aa), hair * (0.9 + 0.1 * (k % 2)))
    if not features:
        return
    skin_dark = skin * 0.72
    ey, es, sp = ident.eye_height, ident.eye_size, ident.eye_spacing
    # brows
    by = ey - es * 1.3 - 0.035 - var.brow_raise
    thick = {"thin": 0.008, "thick": 0.018, "arched": 0.011}[ident.brows]
    bend = 0.025 if ident.brows == "arched" else 0.008
    brow_col = hair * 0.8 if style != "bald" else skin * 0.45
    for s in (-1, 1):
        _paint(img, _cov(_curve(u, v, s * sp, by, es * 1.25, bend, thick), aa), brow_col)
    # eyes: white, iris, pupil; the shape sets the opening
    ry = {"round": 1.0, "almond": 0.62, "narrow": 0.38}[ident.eye_shape] * es
    iris_col = EYE_COLOURS[ident.eye_colour]
    gx, gy = var.gaze
    for s in (-1, 1):
        white = _ellipse(u, v, s * sp, ey, es * 1.2, ry)
        _paint(img, _cov(white - 0.008, aa), skin_dark * 0.5)  # lid outline
        _paint(img, _cov(white, aa), (0.96, 0.96, 0.94))
        ix, iy = s * sp + gx * es * 0.5, ey + gy * ry * 0.4
        iris = np.maximum(_circle(u, v, ix, iy, es * 0.62), white)
        _paint(img, _cov(iris, aa), iris_col)
        _paint(img, _cov(np.maximum(_circle(u, v, ix, iy, es * 0.28), white), aa), (0.03, 0.03, 0.03))
    # nose
    ny = ey + 0.13
    if ident.nose == "small":
        _paint(img, _cov(_ellipse(u, v, 0, ny, 0.025, 0.018), aa), skin_dark)
    elif ident.nose == "long":
        _paint(img, _cov(_segment(u, v, 0.01, ey + 0.03, 0.02, ny + 0.02, 0.008), aa), skin_dark)
        _paint(img, _cov(_ellipse(u, v, 0, ny + 0.02, 0.03, 0.014), aa), skin_dark)
    else:
        for s in (-1, 1):
            _paint(img, _cov(_circle(u, v, s * 0.032, ny, 0.014), aa), skin_dark * 0.85)
    # mouth
    my, mw = ny + 0.1, ident.mouth_width
    if var.expression == "smile":
        _paint(img, _cov(_curve(u, v, 0, my + 0.02, mw * 1.1, -0.04, 0.013), aa), ident.lip)
    elif var.expression == "open":
        _paint(img, _cov(_ellipse(u, v, 0, my + 0.01, mw * 0.75, 0.045), aa), ident.lip)
        _paint(img, _cov(_ellipse(u, v, 0, my + 0.01, mw * 0.6, 0.03), aa), (0.25, 0.05, 0.06))
        _paint(img, _cov(_box(u, v, 0, my - 0.012, mw * 0.45, 0.008), aa), (0.95, 0.95, 0.92))
    else:
        _paint(img, _cov(_curve(u, v, 0, my, mw, -0.008, 0.011), aa), ident.lip)
    # marks
    if "mole" in ident.marks:
        mx, mpy = ident.mole_pos
        _paint(img, _cov(_circle(u, v, mx, ey + mpy, 0.016), aa), skin * 0.35)
    if "freckles" in ident.marks:
        fr = np.random.default_rng([0xF2, ident.seed])
        for _ in range(14):
            fx, fy = fr.uniform(0.03, 0.2) * fr.choice((-1, 1)), ey + fr.uniform(0.06, 0.15)
            _paint(img, _cov(_circle(u, v, fx, fy, 0.01), aa) * 0.8, skin * 0.55)
    if "scar" in ident.marks:
        _paint(img, _cov(_segment(u, v, sp + 0.07, ey - 0.12, sp - 0.02, ey + 0.14, 0.009), aa),
               (0.75, 0.3, 0.3))
    # accessories
    acc = np.asarray(ident.accessory_colour, np.float32)
    if ident.accessory == "glasses":
        for s in (-1, 1):
            _paint(img, _cov(np.abs(_circle(u, v, s * sp, ey, es * 1.55)) - 0.011, aa), acc * 0.5)
        _paint(img, _cov(_segment(u, v, -sp + es * 1.55, ey, sp - es * 1.55, ey, 0.009), aa), acc * 0.5)
    elif ident.accessory == "sunglasses":
        for s in (-1, 1):
            _paint(img, _cov(_box(u, v, s * sp, ey + 0.005, es * 1.55, es * 1.1, 0.02), aa), (0.04, 0.04, 0.06))
        _paint(img, _cov(_segment(u, v, -sp, ey - 0.01, sp, ey - 0.01, 0.01), aa), (0.04, 0.04, 0.06))
    elif ident.accessory == "hat":
        top = -fh * 0.55
        _paint(img, _cov(_box(u, v, 0, top - 0.02, fw + 0.16, 0.035, 0.02), aa), acc * 0.8)
        _paint(img, _cov(_box(u, v, 0, top - 0.2, fw * 0.85, 0.19, 0.08), aa), acc)
    elif ident.accessory == "earrings":
        for s in (-1, 1):
            _paint(img, _cov(_circle(u, v, s * fw * 0.99, 0.12, 0.025), aa), (0.95, 0.78, 0.2))


def _light(img, var: Variant):
    x, y = _grid(img.shape[0])
    ramp = 1.0 + var.light_strength * (np.cos(var.light_dir) * x + np.sin(var.light_dir) * y)
    return img * (ramp[..., None] * var.brightness) * np.asarray(var.tint, np.float32)


def render(identity: Identity, variant: int, size: int = 64, dtype=np.float32) -> np.ndarray:
    """One photo of ``identity``: float32 HxWx3 in [-1, 1] (``dtype=np.uint8``: uint8 pixels)."""
    var = make_variant(identity, variant)
    rng = np.random.default_rng([0xB6, identity.seed, int(variant)])
    img = _background(size, var.background, var.bg_colours, rng)
    _draw_person(img, identity, var, size)
    img = _light(img, var) + rng.normal(0.0, var.noise, img.shape).astype(np.float32)
    out = (np.clip(img, 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)
    return data_lib.to_uint8(out) if dtype == np.uint8 else out


def render_batch(identities, variants, size: int = 64) -> np.ndarray:
    """[N, size, size, 3] float32 in [-1, 1]."""
    return np.stack([render(i, v, size) for i, v in zip(identities, variants)])


# -------------------------------------------------------------------------------- non-faces

NONFACE_KINDS = ("background", "scrambled", "noise", "faceless", "blobs")
_NONFACE_P = (0.15, 0.2, 0.1, 0.35, 0.2)   # featureless heads are the hard case: drawn most


def render_nonface(index: int, seed: int = 0, size: int = 64, kind: str | None = None) -> np.ndarray:
    """A non-face image in [-1, 1] for the face detector: an empty background, a portrait cut into
    shuffled tiles, smooth noise, a head with no features, or random skin-coloured blobs."""
    r = np.random.default_rng([0xDE7, int(seed), int(index)])
    kind = kind or str(r.choice(NONFACE_KINDS, p=_NONFACE_P))
    ident = make_identity(int(r.integers(2 ** 40)) + BLOCK * 1024)
    var = make_variant(ident, int(r.integers(2 ** 31)))
    img = _background(size, var.background, var.bg_colours, r)
    if kind == "scrambled":
        _draw_person(img, ident, var, size)
        t = int(r.choice((8, 16)))
        n = size // t
        tiles = img.reshape(n, t, n, t, 3).transpose(0, 2, 1, 3, 4).reshape(n * n, t, t, 3)[r.permutation(n * n)]
        img = tiles.reshape(n, n, t, t, 3).transpose(0, 2, 1, 3, 4).reshape(size, size, 3).copy()
    elif kind == "noise":
        coarse = r.uniform(0, 1, (int(r.integers(2, 9)),) * 2 + (3,)).astype(np.float32)
        k = size // coarse.shape[0] + 1
        img = np.kron(coarse, np.ones((k, k, 1), np.float32))[:size, :size]
        img = 0.5 * img + 0.5 * _background(size, "blotches", var.bg_colours, r)
    elif kind == "faceless":
        _draw_person(img, ident, var, size, features=False)
    elif kind == "blobs":
        x, y = _grid(size)
        for _ in range(int(r.integers(2, 6))):
            d = _ellipse(x, y, r.uniform(-0.7, 0.7), r.uniform(-0.7, 0.7), r.uniform(0.1, 0.5), r.uniform(0.1, 0.5))
            col = SKIN_TONES[r.integers(len(SKIN_TONES))] if r.uniform() < 0.6 else r.uniform(0, 1, 3)
            _paint(img, _cov(d, 2.0 / size), col)
    img = _light(img, var) + r.normal(0.0, var.noise, img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)


def random_backgrounds(n: int, seed: int = 0, size: int = 64) -> np.ndarray:
    """[n, size, size, 3] non-face images in [-1, 1] (every kind of ``NONFACE_KINDS``)."""
    return np.stack([render_nonface(i, seed, size) for i in range(n)])


# -------------------------------------------------------------------------------- captions

def _hair_phrase(ident: Identity) -> str | None:
    colour, style = ident.hair_colour, ident.hair_style
    if ident.accessory == "hat":  # the hat hides the style; only long or curly hair shows its colour
        return f"{colour} hair" if style in ("long", "curly") else None
    if style == "bald":
        return "a bald head"
    if style == "bun":
        return f"{colour} hair in a bun"
    return f"{style} {colour} hair"


def caption(identity: Identity, variant: int = 0, scene: bool = False) -> str:
    """A caption naming visible attributes of this photo; which ones varies with ``variant``.
    ``scene``: also skin tone, shirt colour and background (the same draws otherwise)."""
    r = np.random.default_rng([0xCA, identity.seed, int(variant)])
    var = make_variant(identity, variant)
    phrases = []
    hair = _hair_phrase(identity)
    if hair and r.uniform() < 0.9:
        phrases.append(hair)
    acc = identity.accessory
    if acc != "none" and r.uniform() < 0.8:
        phrases.append({"glasses": "glasses", "sunglasses": "sunglasses", "hat": "a hat",
                        "earrings": "earrings"}[acc])
    if acc != "sunglasses" and r.uniform() < 0.35:
        phrases.append(f"{identity.eye_colour} eyes")
    for mark in identity.marks:
        if r.uniform() < (0.7 if mark == "beard" else 0.5):
            phrases.append({"mole": "a mole", "freckles": "freckles", "scar": "a scar", "beard": "a beard"}[mark])
    if var.expression == "open" and r.uniform() < 0.5:
        phrases.append("an open mouth")
    who = "smiling person" if var.expression == "smile" and r.uniform() < 0.5 else "person"
    text = f"{_PREFIXES[int(r.integers(len(_PREFIXES)))]} {who}"
    suffix = ""
    if scene:
        skin, suffix = _scene_phrases(identity, variant, var)
        phrases = ([skin] if skin else []) + phrases
    if phrases:
        text += " with " + (phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1])
    return text + suffix


#: Colour words of scene captions, with the RGB each one names (nearest wins).
COLOUR_NAMES = {"black": (0.1, 0.1, 0.1), "white": (0.95, 0.95, 0.95), "grey": (0.55, 0.55, 0.55),
                "red": (0.8, 0.15, 0.15), "orange": (0.95, 0.55, 0.1), "yellow": (0.95, 0.85, 0.2),
                "green": (0.2, 0.65, 0.25), "teal": (0.1, 0.55, 0.55), "blue": (0.2, 0.35, 0.85),
                "purple": (0.5, 0.25, 0.7), "pink": (0.95, 0.5, 0.7), "brown": (0.5, 0.3, 0.15)}
SKIN_WORDS = ("pale", "fair", "light", "medium", "olive", "tan", "brown", "dark")   # SKIN_TONES' order
_BACKGROUND_WORDS = {"gradient": "gradient", "stripes": "striped", "blotches": "blotchy"}


def colour_name(rgb) -> str:
    """The word of ``COLOUR_NAMES`` nearest to an RGB colour in [0, 1]."""
    names = list(COLOUR_NAMES)
    d = np.sum((np.asarray(list(COLOUR_NAMES.values())) - np.asarray(rgb, np.float64)) ** 2, axis=1)
    return names[int(np.argmin(d))]


def skin_word(identity: Identity) -> str:
    return SKIN_WORDS[int(np.argmin(np.sum((SKIN_TONES - np.asarray(identity.skin)) ** 2, axis=1)))]


def _scene_phrases(identity: Identity, variant: int, var: Variant) -> tuple[str | None, str]:
    """(a skin phrase or None, the suffix naming shirt and background) of a scene caption."""
    r = np.random.default_rng([0x5C, identity.seed, int(variant)])
    skin = f"{skin_word(identity)} skin" if r.uniform() < 0.7 else None
    suffix = f", in a {colour_name(identity.shirt)} shirt" if r.uniform() < 0.8 else ""
    if r.uniform() < 0.9:
        c0 = colour_name(var.bg_colours[0])
        if var.background == "flat":
            suffix += f", on a {c0} background"
        else:
            suffix += f", on a {c0} and {colour_name(var.bg_colours[1])} {_BACKGROUND_WORDS[var.background]} background"
    return skin, suffix


def words(text: str) -> list[str]:
    """A caption's words (commas are their own word)."""
    return text.replace(",", " , ").split()


def vocabulary(scene: bool = False) -> list[str]:
    """Every word a caption (``scene`` ones with ``scene``) or one of ``PROMPTS`` can contain,
    sorted (',' included)."""
    parts = list(PROMPTS) + list(_PREFIXES) + ["smiling person with , and", "a bald head", "hair in a bun",
                                               "glasses sunglasses a hat earrings", "eyes an open mouth",
                                               "a mole freckles a scar a beard"]
    parts += list(HAIR_COLOURS) + list(HAIR_STYLES) + list(EYE_COLOURS)
    if scene:
        parts += list(COLOUR_NAMES) + list(SKIN_WORDS) + list(_BACKGROUND_WORDS.values())
        parts += ["skin , in a shirt , on a background"]
    return sorted({w for p in parts for w in words(p)})


# -------------------------------------------------------------------------------- files

def _write_text_atomic(path: str, text: str):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_training_set(root: str, n_identities: int, per_identity: int, seed: int = 0, size: int = 64,
                       progress: bool = False) -> int:
    """Write ``images/<label>_<variant>.png`` for ``n_identities`` training identities (labels
    0..n-1), ``captions.jsonl`` ({file, caption, label, identity_seed, variant} per image) and
    ``identities.json``. Existing images are kept (resume). Returns the number of images rendered."""
    idents = train_identities(n_identities, seed)
    rows, written = [], 0
    it = [(label, ident, v) for label, ident in enumerate(idents) for v in range(per_identity)]
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="training set", dynamic_ncols=True)
    for label, ident, v in it:
        rel = f"images/{label:05d}_{v:03d}.png"
        path = os.path.join(root, rel)
        if not os.path.exists(path):
            data_lib.save_image_atomic(path, render(ident, v, size))
            written += 1
        rows.append({"file": rel, "caption": caption(ident, v), "label": label, "identity_seed": ident.seed,
                     "variant": v})
    _write_text_atomic(os.path.join(root, "captions.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    _write_text_atomic(os.path.join(root, "identities.json"),
                       json.dumps([i.to_dict() for i in idents], indent=1))
    return written


def write_heldout_subjects(root: str, n: int, seed: int = 0, per_set: int = 4, size: int = 64) -> list[str]:
    """Held-out identities in the Anti-DreamBooth layout: ``<root>/subject_<i>/set_A|set_B|set_C``
    with ``per_set`` PNGs each (variants 0.. in order) and ``subject.json`` (attributes, captions).
    Existing images are kept. Returns the subject folder names."""
    names = []
    for i, ident in enumerate(heldout_identities(n, seed)):
        name = f"subject_{i}"
        names.append(name)
        caps = {}
        for k, set_name in enumerate(SETS):
            for j in range(per_set):
                v = k * per_set + j
                rel = f"{set_name}/{j:02d}.png"
                path = os.path.join(root, name, rel)
                if not os.path.exists(path):
                    data_lib.save_image_atomic(path, render(ident, v, size))
                caps[rel] = caption(ident, v)
        _write_text_atomic(os.path.join(root, name, "subject.json"),
                           json.dumps({"identity": ident.to_dict(), "captions": caps}, indent=1))
    return names
