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

Two styles (``STYLES``; every renderer and writer takes ``style``, default "v1"): "v1" is the flat
look above; "v2" draws the same shapes, colours and scene (so captions and identities are unchanged)
with the fine structure real photos have and cartoons lack, which hides an imperceptible
perturbation there: skin pores and tone, strands and sheen in hair, irises, lashes, knit and woven
cloth, textured backgrounds, soft 3-D shading, in-camera sharpening and vignetting. It is meant for
128 px and up; its extra draws come from streams of their own, so v1 pixels and identities stay as
they were.

Files: ``write_training_set`` (images, ``captions.jsonl`` with identity labels, ``identities.json``)
and ``write_heldout_subjects`` (the Anti-DreamBooth layout ``<root>/<subject>/set_A|set_B|set_C``)
write atomically and keep files that already exist, so an interrupted run resumes.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from ldu_jax import data as data_lib
from ldu_jax import files
from ldu_jax.errors import ConfigError

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
#: Rendering styles: "v1" flat shapes (the default everywhere), "v2" the same with fine texture.
STYLES = ("v1", "v2")


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
        raise ConfigError(f"at most {HELDOUT_OFFSET} identities per seed, asked for {n}")
    return [make_identity(seed * BLOCK + TRAIN_BASE + i) for i in range(n)]


def heldout_identities(n: int, seed: int = 0) -> list[Identity]:
    """``n`` held-out identities (for protection / personalization tests), disjoint from training."""
    if n > BLOCK - HELDOUT_OFFSET:
        raise ConfigError(f"at most {BLOCK - HELDOUT_OFFSET} identities per seed, asked for {n}")
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


def _face_coords(var: Variant, size: int):
    """Face coordinates (u, v) of every pixel (the variant's shift, scale and rotation undone) and
    the width of one pixel in face units."""
    x, y = _grid(size)
    ca, sa = np.cos(var.angle), np.sin(var.angle)
    px, py = (x - var.dx) / var.scale, (y - var.dy) / var.scale
    return ca * px + sa * py, -sa * px + ca * py, 2.0 / size / var.scale


def _draw_person(img, ident: Identity, var: Variant, size: int, features: bool = True, tex=None):
    """Paint the person over ``img`` (float32 HxWx3 in [0, 1]) in place. ``tex``: None for the flat
    v1 look; a ``np.random.Generator`` for v2, whose draws (with ``_look(ident)``) texture the same
    shapes and add shading and eye detail."""
    u, v, aa = _face_coords(var, size)                    # face coordinates (rotated, scaled)
    if tex is not None:  # float32 is plenty for v2's geometry and halves its time (v1 keeps its float64)
        u, v = u.astype(np.float32), v.astype(np.float32)
    skin, hair = np.asarray(ident.skin, np.float32), np.asarray(HAIR_COLOURS[ident.hair_colour], np.float32)
    fw, fh = ident.face_w, ident.face_h
    style, hat = ident.hair_style, ident.accessory == "hat"
    m = None if tex is None else _materials(ident, var, u, v, aa, tex)
    # v1 paints flat colours; v2 paints the same shapes with textured colour fields (HxWx3)
    skin_c, hair_c, shirt_c = (skin, hair, ident.shirt) if m is None else (m.skin, m.hair, m.shirt)

    # long hair and buns behind the head; then neck and shoulders
    if style == "long":
        _paint(img, _cov(_box(u, v, 0, 0.18, fw + 0.09, 0.52, 0.15), aa), hair_c * 0.92)
    if style == "bun" and not hat:
        _paint(img, _cov(_circle(u, v, 0, -fh - 0.12, 0.14), aa), hair_c)
    neck = skin_c * 0.85 if m is None else skin_c * (0.85 * m.neck_shade)[..., None]
    _paint(img, _cov(_box(u, v, 0, fh + 0.05, 0.11, 0.2, 0.03), aa), neck)
    _paint(img, _cov(_ellipse(u, v, 0, fh + 0.55, fw + 0.35, 0.4), aa), shirt_c)
    if style == "long":  # locks over the shoulders
        for s in (-1, 1):
            _paint(img, _cov(_box(u, v, s * (fw + 0.02), 0.35, 0.07, 0.3, 0.06), aa), hair_c * 0.95)
    # ears, head (narrower towards the chin with ``jaw``)
    for s in (-1, 1):
        _paint(img, _cov(_ellipse(u, v, s * fw * 0.98, 0.02, 0.05, 0.085), aa), skin_c * 0.93)
    taper = 1.0 - 0.38 * ident.jaw * np.clip(v / fh, 0, 1) ** 2
    head_d = (np.sqrt((u / (fw * taper)) ** 2 + (v / fh) ** 2) - 1.0) * fw
    head = _cov(head_d, aa)
    if m is None:
        shade = 1.0 - 0.18 * np.clip(1.0 + head_d / 0.12, 0, 1)[..., None]  # darker towards the rim
    else:
        shade = _face_shading(ident, var, u, v, head_d, features)
    img[:] = img * (1 - head[..., None]) + head[..., None] * skin_c * shade
    if "beard" in ident.marks:
        beard = _cov(np.maximum(head_d - 0.012, 0.16 - v), aa) * (0.8 if features else 0.0)
        _paint(img, beard, hair_c * 0.9)
    # hair on top of the head
    if style in ("short", "long", "bun"):
        wig = np.maximum(_ellipse(u, v, 0, -0.02, fw + 0.035, fh + 0.05), v - (ident.hairline - 0.2
                         + 0.04 * np.cos(u * 14.0 + ident.seed)))
        if style == "long":
            wig = np.minimum(wig, np.maximum(_box(u, v, 0, -0.05, fw + 0.05, 0.3, 0.05),
                                             np.abs(u) - fw + 0.06 - 0.25 * np.clip(v + 0.1, 0, 1)))
            wig = np.maximum(wig, -np.maximum(np.abs(u) - fw + 0.08, ident.hairline - 0.15 - v))
        _paint(img, _cov(wig, aa), hair_c)
    elif style == "curly":
        n = 11
        for k in range(n):
            t = np.pi * (0.05 + 0.9 * k / (n - 1))
            cx, cy = -np.cos(t) * (fw + 0.02), -np.sin(t) * (fh * 0.95) + 0.02
            _paint(img, _cov(_circle(u, v, cx, cy, 0.085), aa), hair_c * (0.9 + 0.1 * (k % 2)))
    if not features:
        return
    skin_dark = skin_c * 0.72
    ey, es, sp = ident.eye_height, ident.eye_size, ident.eye_spacing
    # brows
    by = ey - es * 1.3 - 0.035 - var.brow_raise
    thick = {"thin": 0.008, "thick": 0.018, "arched": 0.011}[ident.brows]
    bend = 0.025 if ident.brows == "arched" else 0.008
    brow_col = hair * 0.8 if style != "bald" else skin * 0.45
    for s in (-1, 1):
        brow = _curve(u, v, s * sp, by, es * 1.25, bend, thick)
        _paint(img, _cov(brow, aa), brow_col if m is None else _brow_colour(brow_col, u, v, s, aa, m))
    # eyes: white, iris, pupil; the shape sets the opening
    ry = {"round": 1.0, "almond": 0.62, "narrow": 0.38}[ident.eye_shape] * es
    iris_col = EYE_COLOURS[ident.eye_colour]
    gx, gy = var.gaze
    for s in (-1, 1):
        white = _ellipse(u, v, s * sp, ey, es * 1.2, ry)
        if m is None:
            _paint(img, _cov(white - 0.008, aa), skin_dark * 0.5)  # lid outline
            _paint(img, _cov(white, aa), (0.96, 0.96, 0.94))
        else:
            _eye_socket_v2(img, u, v, s * sp, ey, es, ry, white, aa, skin_dark)
        ix, iy = s * sp + gx * es * 0.5, ey + gy * ry * 0.4
        iris = np.maximum(_circle(u, v, ix, iy, es * 0.62), white)
        if m is None:
            _paint(img, _cov(iris, aa), iris_col)
            _paint(img, _cov(np.maximum(_circle(u, v, ix, iy, es * 0.28), white), aa), (0.03, 0.03, 0.03))
        else:
            _iris_v2(img, u, v, ix, iy, es, white, iris, aa, iris_col, m)
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
    lip = ident.lip if m is None else _lip_colour(ident.lip, u, v, my, aa, m)
    if var.expression == "smile":
        _paint(img, _cov(_curve(u, v, 0, my + 0.02, mw * 1.1, -0.04, 0.013), aa), lip)
    elif var.expression == "open":
        _paint(img, _cov(_ellipse(u, v, 0, my + 0.01, mw * 0.75, 0.045), aa), lip)
        _paint(img, _cov(_ellipse(u, v, 0, my + 0.01, mw * 0.6, 0.03), aa), (0.25, 0.05, 0.06))
        _paint(img, _cov(_box(u, v, 0, my - 0.012, mw * 0.45, 0.008), aa), (0.95, 0.95, 0.92))
    else:
        _paint(img, _cov(_curve(u, v, 0, my, mw, -0.008, 0.011), aa), lip)
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
            lens = (0.04, 0.04, 0.06) if m is None else _lens_colour(u, v, s * sp, ey, es)
            _paint(img, _cov(_box(u, v, s * sp, ey + 0.005, es * 1.55, es * 1.1, 0.02), aa), lens)
        _paint(img, _cov(_segment(u, v, -sp, ey - 0.01, sp, ey - 0.01, 0.01), aa), (0.04, 0.04, 0.06))
    elif ident.accessory == "hat":
        hat_c = acc if m is None else acc * m.weave[..., None]
        top = -fh * 0.55
        _paint(img, _cov(_box(u, v, 0, top - 0.02, fw + 0.16, 0.035, 0.02), aa), hat_c * 0.8)
        _paint(img, _cov(_box(u, v, 0, top - 0.2, fw * 0.85, 0.19, 0.08), aa), hat_c)
    elif ident.accessory == "earrings":
        for s in (-1, 1):
            gold = (0.95, 0.78, 0.2) if m is None else _glint(u, v, s * fw * 0.99, 0.12, 0.025, (0.95, 0.78, 0.2))
            _paint(img, _cov(_circle(u, v, s * fw * 0.99, 0.12, 0.025), aa), gold)


def _light(img, var: Variant, vignette: float = 0.0):
    """The variant's light: a soft ramp across the picture, brightness and tint; ``vignette``
    darkens the corners by that fraction (v2)."""
    x, y = _grid(img.shape[0])
    ramp = 1.0 + var.light_strength * (np.cos(var.light_dir) * x + np.sin(var.light_dir) * y)
    if vignette:
        ramp = ramp * (1.0 - vignette * (x * x + y * y) / 2.0)
    return img * (ramp[..., None] * var.brightness) * np.asarray(var.tint, np.float32)


# -------------------------------------------------------------------------------- v2: texture
# On flat v1 shapes an imperceptible-on-photos perturbation shows as blotches; v2 paints the same
# shapes with the fine structure of real portraits. Its extra draws come from streams of their own
# (``_look``: per identity; the ``tex`` generator: per photo), never from v1's.

def _check_style(style: str):
    if style not in STYLES:
        raise ConfigError(f"unknown style {style!r}; expected one of {STYLES}")


def _value_noise(rng, size, cells):
    """Smooth noise in [-1, 1] with features ``size / cells`` pixels wide: a random (cells+1)^2
    grid upsampled by separable bilinear interpolation with smoothstep weights (no grid creases)."""
    g = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1)).astype(np.float32)
    t = (np.arange(size, dtype=np.float32) + 0.5) * np.float32(cells / size)
    i = t.astype(np.int64)
    f = t - i
    f = f * f * (3.0 - 2.0 * f)
    rows = g[i] * (1.0 - f)[:, None] + g[i + 1] * f[:, None]
    return rows[:, i] * (1.0 - f) + rows[:, i + 1] * f


def _fbm(rng, size, cells, gain=0.6):
    """Octaves of ``_value_noise`` at each of ``cells`` (coarsest first), each ``gain`` x the last."""
    return sum(np.float32(gain ** k) * _value_noise(rng, size, c) for k, c in enumerate(cells))


def _lookup(table, x):
    """A periodic 1-D ``table`` at fractional positions ``x`` (in entries), linearly interpolated."""
    i = np.floor(x)
    f = (x - i).astype(np.float32)
    i = i.astype(np.int64) % len(table)
    return table[i] * (1.0 - f) + table[(i + 1) % len(table)] * f


def _bump(u, v, cx, cy, su, sv):
    """A soft Gaussian spot (peak 1) for shading."""
    return np.exp(-((u - cx) / su) ** 2 - ((v - cy) / sv) ** 2)


@dataclasses.dataclass(frozen=True, eq=False)
class _Look:
    """v2's per-identity texture parameters."""
    roughness: float         # skin texture amplitude (x the base)
    blush: float             # cheek colour
    curliness: float         # curl frequency of curly hair
    sheen: float             # the hair highlight's distance from the crown (face units)
    strands: np.ndarray      # 1-D table: brightness of the fine strands fanning from the crown
    locks: np.ndarray        # 1-D table: the same for coarser locks
    fabric: str              # shirt and hat: "weave", "knit" or "rib"
    fabric_period: float     # in pixels
    fibres: np.ndarray       # 1-D table: iris fibres and lip creases


def _look(ident: Identity) -> _Look:
    r = np.random.default_rng([0x7E, ident.seed])
    return _Look(roughness=float(r.uniform(0.6, 1.5)), blush=float(r.uniform(0.0, 1.0)),
                 curliness=float(r.uniform(0.7, 1.4)), sheen=float(r.uniform(0.1, 0.2)),
                 strands=r.uniform(-1, 1, 96).astype(np.float32), locks=r.uniform(-1, 1, 20).astype(np.float32),
                 fabric=str(r.choice(("weave", "knit", "rib"))), fabric_period=float(r.uniform(2.5, 4.0)),
                 fibres=r.uniform(-1, 1, 24).astype(np.float32))


@dataclasses.dataclass(frozen=True, eq=False)
class _Materials:
    """v2's colour fields of one photo (HxWx3, or HxW brightness) for ``_draw_person``."""
    look: _Look
    skin: np.ndarray
    hair: np.ndarray
    shirt: np.ndarray
    weave: np.ndarray        # fabric brightness, also the hat's
    neck_shade: np.ndarray   # the chin's shadow on the neck
    grain: np.ndarray        # unit white noise: the fine texture of small parts


def _materials(ident: Identity, var: Variant, u, v, aa, rng) -> _Materials:
    """The textured colours of skin, hair and clothes over the whole canvas (shapes cut them out)."""
    look, size = _look(ident), u.shape[0]
    grain = rng.standard_normal((size, size), dtype=np.float32)
    # skin: pores (pixel grain and 2 px bumps) over soft blotches of tone, redder where darker
    pores = 0.5 * grain + 1.2 * _value_noise(rng, size, max(size // 2, 1))
    mottle = _fbm(rng, size, (6, 12, 24))
    tone = 1.0 + 0.035 * look.roughness * pores + 0.035 * mottle
    skin = np.asarray(ident.skin, np.float32) * tone[..., None] \
        - (0.015 * mottle)[..., None] * np.array([-0.3, 0.4, 0.5], np.float32)
    # fabric, in face coordinates so it turns with the body
    k = 2 * np.pi / (look.fabric_period * aa)
    if look.fabric == "weave":
        w = np.sin(k * u) * np.sin(k * v)
    elif look.fabric == "knit":   # rows of chevrons
        w = np.sin(k * v + 2.5 * np.abs(np.sin(0.5 * k * u)))
    else:
        w = 0.8 * np.sin(k * u) + 0.2 * np.sin(0.5 * k * v)
    weave = 1.0 + 0.2 * w + 0.08 * _value_noise(rng, size, 4) + 0.05 * grain   # + folds
    shirt = np.asarray(ident.shirt, np.float32) * weave[..., None] + (0.06 * w)[..., None]
    neck_shade = 1.0 - 0.35 * _bump(u, v, 0, ident.face_h + 0.02, 0.15, 0.07)
    return _Materials(look, skin, _hair_colour(ident, look, u, v, aa, rng, grain), shirt, weave, neck_shade, grain)


def _hair_colour(ident: Identity, look: _Look, u, v, aa, rng, grain):
    """Hair: strands fanning out from the crown (curly: small loops) and a highlight band."""
    hair, size, fh = np.asarray(HAIR_COLOURS[ident.hair_colour], np.float32), u.shape[0], ident.face_h
    if ident.hair_style == "curly":
        # the contour lines of smooth noise are small closed loops: curls
        n = _fbm(rng, size, (max(size // 10, 1), max(size // 5, 1)), gain=0.5)
        c = np.sin(2 * np.pi * 2.5 * look.curliness * n)
        s = 0.6 * c + 0.25 * grain
        sheen = 0.3 * np.clip(c, 0, 1) ** 6 * np.clip(0.5 - v / fh, 0, 1)
    else:
        du, dv = u, v + 0.6 * fh                                   # from the crown
        phi = np.arctan2(du, dv) / np.float32(2 * np.pi) + 0.012 * _value_noise(rng, size, 6)  # wavy
        s = (0.65 * _lookup(look.strands, phi * len(look.strands))
             + 0.35 * _lookup(look.locks, phi * len(look.locks)) + 0.25 * grain)
        if ident.hair_style == "bun":  # hair wound round the bun, in a loose spiral
            bu, bv = u, v + fh + 0.12
            rb = np.sqrt(bu * bu + bv * bv)
            wound = 0.9 * _lookup(look.strands, (rb + 0.015 * np.arctan2(bv, bu)) / (1.5 * aa)) + 0.25 * grain
            s = np.where(rb < 0.16, wound, s)
        r = np.sqrt(du * du + dv * dv)
        sheen = 0.4 * np.exp(-((r - look.sheen) / 0.04) ** 2) * np.clip(0.6 + 0.8 * s, 0, 1)
    return hair + s[..., None] * (0.1 + 0.2 * hair) + sheen[..., None] * (0.3 * (1.0 - hair) + 0.06)


def _face_shading(ident: Identity, var: Variant, u, v, head_d, features: bool = True):
    """v2's skin brightness and colour on the head (HxWx3 or HxWx1): darker towards the outline, lit
    from the variant's light side; with ``features`` (a featureless head must not hint at a face)
    shadows beside and under the nose and in the eye sockets, and cheek colour."""
    fw, fh, ey, sp = ident.face_w, ident.face_h, ident.eye_height, ident.eye_spacing
    a = var.light_dir - var.angle                     # the light's direction in face coordinates
    lx, ly = np.float32(np.cos(a)), np.float32(np.sin(a))
    rho = np.clip(1.0 + head_d / fw, 0, 1)            # 0 at the centre, 1 on the outline
    shade = 1.02 - 0.26 * rho ** 3 + 0.07 * (u / fw * lx + v / fh * ly)
    if not features:
        return shade[..., None]
    side = -1.0 if lx > 0 else 1.0                    # the nose's shadow falls away from the light
    ny = ey + 0.13
    shade -= 0.12 * _bump(u, v, side * 0.03, ey + 0.08, 0.016, 0.05)
    shade -= 0.1 * _bump(u, v, 0, ny + 0.03, 0.035, 0.012)
    shade += 0.06 * _bump(u, v, -side * 0.006, ey + 0.07, 0.01, 0.045)     # bridge highlight
    shade -= 0.06 * (_bump(u, v, sp, ey - 0.02, 0.07, 0.04) + _bump(u, v, -sp, ey - 0.02, 0.07, 0.04))
    blush = _look(ident).blush * (_bump(u, v, sp + 0.03, ey + 0.13, 0.05, 0.035)
                                  + _bump(u, v, -sp - 0.03, ey + 0.13, 0.05, 0.035))
    return shade[..., None] * (1.0 + blush[..., None] * np.array([0.06, -0.04, -0.03], np.float32))


def _brow_colour(brow_col, u, v, s, aa, m: _Materials):
    """Brows of slanted hairs: strand stripes across the brow leaning outwards, plus grain."""
    a = 0.6 * s
    h = 0.7 * _lookup(m.look.strands, (u * np.cos(a) + v * np.sin(a)) / (1.5 * aa)) + 0.3 * m.grain
    return brow_col + h[..., None] * (0.06 + 0.2 * np.asarray(brow_col, np.float32))


def _eye_socket_v2(img, u, v, ex, ey, es, ry, white, aa, skin_dark):
    """v2's lids: the v1 outline, a lid crease, a dark upper lash line with spikes, and a white that
    darkens into the lids."""
    _paint(img, _cov(white - 0.008, aa), skin_dark * 0.5)
    crease = np.maximum(np.abs(white - 0.022) - 0.004, v - ey + 0.3 * ry)
    _paint(img, _cov(crease, aa) * 0.5, skin_dark * 0.8)
    ang = np.arctan2(v - ey, (u - ex) * 0.5)
    lashes = 0.007 + 0.006 * (0.5 + 0.5 * np.sin(ang * 14.0))
    _paint(img, _cov(np.maximum(white - lashes, v - ey + 0.2 * ry), aa), (0.06, 0.04, 0.04))
    t = np.clip(1.0 + white / (0.8 * ry), 0, 1)        # 0 in the middle, 1 on the rim
    _paint(img, _cov(white, aa), np.array([0.96, 0.96, 0.94], np.float32) * (1.0 - 0.28 * t * t)[..., None])


def _iris_v2(img, u, v, ix, iy, es, white, iris, aa, iris_col, m: _Materials):
    """v2's iris: radial fibres, a dark limbal rim, the pupil and a catch-light."""
    ri = es * 0.62
    du, dv = u - ix, v - iy
    t = np.clip(np.sqrt(du * du + dv * dv) / ri, 0, 1)
    fib = _lookup(m.look.fibres, np.arctan2(dv, du) * (len(m.look.fibres) / (2 * np.pi)))
    tone = (1.2 - 0.35 * t) * (1.0 + 0.2 * fib) * (1.0 - 0.55 * np.clip((t - 0.7) / 0.3, 0, 1))
    _paint(img, _cov(iris, aa), np.asarray(iris_col, np.float32) * tone[..., None])
    _paint(img, _cov(np.maximum(_circle(u, v, ix, iy, es * 0.28), white), aa), (0.03, 0.03, 0.03))
    spot = np.maximum(_circle(u, v, ix - 0.35 * ri, iy - 0.4 * ri, max(0.25 * ri, 0.35 * aa)), white)
    _paint(img, _cov(spot, aa) * 0.9, (1.0, 1.0, 1.0))


def _lip_colour(lip, u, v, my, aa, m: _Materials):
    """Lips: the upper one in shade, the lower one catching light, fine vertical creases."""
    t = np.clip((v - my) / 0.03 + 0.5, 0, 1)
    creases = _lookup(m.look.fibres, u / (1.3 * aa))
    tone = 0.8 + 0.3 * t + 0.07 * creases + 0.15 * _bump(u, v, 0, my + 0.014, 0.03, 0.008)
    return np.asarray(lip, np.float32) * tone[..., None]


def _lens_colour(u, v, ex, ey, es):
    """Sunglass lenses: near black with a diagonal reflection."""
    streak = 0.18 * np.exp(-(((u - ex) + 0.8 * (v - ey) + 0.3 * es) / (0.25 * es)) ** 2)
    return np.array([0.04, 0.04, 0.06], np.float32) + streak[..., None]


def _glint(u, v, cx, cy, r, colour):
    """A metallic disc: darker rim, a bright spot up-left."""
    d = np.sqrt((u - cx) ** 2 + (v - cy) ** 2) / r
    tone = 1.0 - 0.35 * np.clip(d, 0, 1) ** 2 + 0.5 * _bump(u, v, cx - 0.35 * r, cy - 0.35 * r, 0.3 * r, 0.3 * r)
    return np.asarray(colour, np.float32) * tone[..., None]


def _bg_texture(img, rng):
    """v2's background texture, keeping the colours and layout: soft low-contrast variation (plaster
    wall, out-of-focus lights or woven cloth) and fine grain, so that even 'flat' is not flat."""
    size = img.shape[0]
    x, y = _grid(size)
    kind = str(rng.choice(("wall", "bokeh", "fabric")))
    soft = 0.05 * _fbm(rng, size, (3, 6, 12))
    if kind == "wall":
        soft += 0.07 * _fbm(rng, size, (max(size // 6, 1), max(size // 3, 1), max(size // 2, 1)), gain=0.9)
    elif kind == "bokeh":
        for _ in range(int(rng.integers(6, 14))):
            cx, cy, rad = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.05, 0.2)
            disc = np.clip(0.5 - (np.sqrt((x - cx) ** 2 + (y - cy) ** 2) - rad) / 0.04, 0, 1)
            soft += rng.uniform(0.03, 0.09) * disc
        soft += 0.05 * _value_noise(rng, size, max(size // 2, 1))
    else:
        k, a = 2 * np.pi / (rng.uniform(2.5, 4.5) * 2.0 / size), rng.uniform(0, np.pi)
        ca, sa = np.float32(np.cos(a)), np.float32(np.sin(a))
        soft += 0.08 * np.sin(k * (ca * x + sa * y)) * np.sin(k * (-sa * x + ca * y))
    lum = soft + rng.uniform(0.02, 0.035) * rng.standard_normal((size, size), dtype=np.float32)
    # mostly multiplicative (keeps the colour), partly additive (so dark colours show it too)
    return (img * (1.0 + lum[..., None]) + 0.35 * lum[..., None]).astype(np.float32)


def _sharpen(img, amount):
    """An in-camera unsharp mask: ``img + amount * (img - blur(img))`` with a 5-tap binomial blur."""
    k = np.array([1, 4, 6, 4, 1], np.float32) / 16
    p = np.pad(img, ((2, 2), (0, 0), (0, 0)), mode="edge")
    b = sum(k[i] * p[i:i + img.shape[0]] for i in range(5))
    p = np.pad(b, ((0, 0), (2, 2), (0, 0)), mode="edge")
    b = sum(k[i] * p[:, i:i + img.shape[1]] for i in range(5))
    return img + np.float32(amount) * (img - b)


def _skin_like(colour, rng, size):
    """A colour with v2's skin-like fine texture (for skin-coloured blobs among the non-faces)."""
    n = 0.6 * rng.standard_normal((size, size), dtype=np.float32) + _fbm(rng, size, (8, max(size // 2, 1)))
    return np.asarray(colour, np.float32) * (1.0 + 0.035 * n)[..., None]


# -------------------------------------------------------------------------------- rendering

def render(identity: Identity, variant: int, size: int = 64, dtype=np.float32, style: str = "v1",
           sensor_noise: float = 1.0, grain: float = 1.0) -> np.ndarray:
    """One photo of ``identity``: float32 HxWx3 in [-1, 1] (``dtype=np.uint8``: uint8 pixels).
    ``style``: "v1" flat shapes, or "v2" the same shapes and scene with fine texture (module doc).
    The calibration's knobs: ``sensor_noise`` scales the variant's sensor noise, ``grain`` v2's
    per-pixel white grain in skin, hair, cloth and backgrounds (0: none; the rest is unchanged)."""
    _check_style(style)
    var = make_variant(identity, variant)
    rng = np.random.default_rng([0xB6, identity.seed, int(variant)])
    img = _background(size, var.background, var.bg_colours, rng)
    tex = None if style == "v1" else _Texture(np.random.default_rng([0x7F, identity.seed, int(variant)]), grain)
    if tex is not None:
        img = _bg_texture(img, tex)
    _draw_person(img, identity, var, size, tex=tex)
    out = _camera(img, var, rng, tex, sensor_noise)
    return data_lib.to_uint8(out) if dtype == np.uint8 else out


class _Texture:
    """v2's texture stream: a numpy Generator whose white-noise draws (``standard_normal``, the
    grain) are scaled by ``grain``; every other draw, and so every other texture, is unchanged."""

    def __init__(self, rng: np.random.Generator, grain: float = 1.0):
        self.rng, self.grain = rng, np.float32(grain)

    def __getattr__(self, name):
        return getattr(self.rng, name)

    def standard_normal(self, *args, **kwargs):
        return self.grain * self.rng.standard_normal(*args, **kwargs)


def _camera(img, var: Variant, rng, tex, sensor_noise: float = 1.0):
    """The scene in [0, 1] to a photo in [-1, 1]: v2's sharpening and vignetting (drawn from
    ``tex``; None: v1), the variant's light, and sensor noise drawn from ``rng``."""
    if tex is not None:
        img = _sharpen(img, tex.uniform(0.3, 0.6))
    img = _light(img, var, 0.0 if tex is None else tex.uniform(0.1, 0.3)) \
        + rng.normal(0.0, var.noise * sensor_noise, img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)


def render_batch(identities, variants, size: int = 64, style: str = "v1", sensor_noise: float = 1.0,
                 grain: float = 1.0) -> np.ndarray:
    """[N, size, size, 3] float32 in [-1, 1]."""
    _check_style(style)
    return np.stack([render(i, v, size, style=style, sensor_noise=sensor_noise, grain=grain)
                     for i, v in zip(identities, variants)])


# -------------------------------------------------------------------------------- non-faces

NONFACE_KINDS = ("background", "scrambled", "noise", "faceless", "blobs")
_NONFACE_P = (0.15, 0.2, 0.1, 0.35, 0.2)   # featureless heads are the hard case: drawn most


def render_nonface(index: int, seed: int = 0, size: int = 64, kind: str | None = None,
                   style: str = "v1") -> np.ndarray:
    """A non-face image in [-1, 1] for the face detector: an empty background, a portrait cut into
    shuffled tiles, smooth noise, a head with no features, or random skin-coloured blobs (``style``
    as ``render``'s: v2 textures all of them, so texture alone does not tell a face)."""
    _check_style(style)
    r = np.random.default_rng([0xDE7, int(seed), int(index)])
    tex = None if style == "v1" else np.random.default_rng([0x7F, 0xDE7, int(seed), int(index)])
    kind = kind or str(r.choice(NONFACE_KINDS, p=_NONFACE_P))
    ident = make_identity(int(r.integers(2 ** 40)) + BLOCK * 1024)
    var = make_variant(ident, int(r.integers(2 ** 31)))
    img = _background(size, var.background, var.bg_colours, r)
    if tex is not None and kind != "noise":   # "noise" replaces the background (and textures its own)
        img = _bg_texture(img, tex)
    if kind == "scrambled":
        _draw_person(img, ident, var, size, tex=tex)
        t = int(r.choice((8, 16)))
        n = size // t
        tiles = img.reshape(n, t, n, t, 3).transpose(0, 2, 1, 3, 4).reshape(n * n, t, t, 3)[r.permutation(n * n)]
        img = tiles.reshape(n, n, t, t, 3).transpose(0, 2, 1, 3, 4).reshape(size, size, 3).copy()
    elif kind == "noise":
        coarse = r.uniform(0, 1, (int(r.integers(2, 9)),) * 2 + (3,)).astype(np.float32)
        k = size // coarse.shape[0] + 1
        img = np.kron(coarse, np.ones((k, k, 1), np.float32))[:size, :size]
        img = 0.5 * img + 0.5 * _background(size, "blotches", var.bg_colours, r)
        if tex is not None:
            img = _bg_texture(img, tex)
    elif kind == "faceless":
        _draw_person(img, ident, var, size, features=False, tex=tex)
    elif kind == "blobs":
        x, y = _grid(size)
        for _ in range(int(r.integers(2, 6))):
            d = _ellipse(x, y, r.uniform(-0.7, 0.7), r.uniform(-0.7, 0.7), r.uniform(0.1, 0.5), r.uniform(0.1, 0.5))
            col = SKIN_TONES[r.integers(len(SKIN_TONES))] if r.uniform() < 0.6 else r.uniform(0, 1, 3)
            _paint(img, _cov(d, 2.0 / size), col if tex is None else _skin_like(col, tex, size))
    return _camera(img, var, r, tex)


def random_backgrounds(n: int, seed: int = 0, size: int = 64, style: str = "v1") -> np.ndarray:
    """[n, size, size, 3] non-face images in [-1, 1] (every kind of ``NONFACE_KINDS``)."""
    _check_style(style)
    return np.stack([render_nonface(i, seed, size, style=style) for i in range(n)])


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

def _write_text(path: str, text: str):
    with files.atomic_write(path, "w") as f:
        f.write(text)


def write_training_set(root: str, n_identities: int, per_identity: int, seed: int = 0, size: int = 64,
                       progress: bool = False, style: str = "v1") -> int:
    """Write ``images/<label>_<variant>.png`` for ``n_identities`` training identities (labels
    0..n-1), ``captions.jsonl`` ({file, caption, label, identity_seed, variant} per image) and
    ``identities.json``. Existing images are kept (resume). Returns the number of images rendered.
    ``style``: ``render``'s (a resumed folder keeps the style its existing images were written in)."""
    _check_style(style)
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
            data_lib.save_image_atomic(path, render(ident, v, size, style=style))
            written += 1
        rows.append({"file": rel, "caption": caption(ident, v), "label": label, "identity_seed": ident.seed,
                     "variant": v})
    _write_text(os.path.join(root, "captions.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    _write_text(os.path.join(root, "identities.json"), json.dumps([i.to_dict() for i in idents], indent=1))
    return written


def write_heldout_subjects(root: str, n: int, seed: int = 0, per_set: int = 4, size: int = 64,
                           style: str = "v1") -> list[str]:
    """Held-out identities in the Anti-DreamBooth layout: ``<root>/subject_<i>/set_A|set_B|set_C``
    with ``per_set`` PNGs each (variants 0.. in order) and ``subject.json`` (attributes, captions).
    Existing images are kept. Returns the subject folder names. ``style``: ``render``'s."""
    _check_style(style)
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
                    data_lib.save_image_atomic(path, render(ident, v, size, style=style))
                caps[rel] = caption(ident, v)
        _write_text(os.path.join(root, name, "subject.json"),
                    json.dumps({"identity": ident.to_dict(), "captions": caps}, indent=1))
    return names
