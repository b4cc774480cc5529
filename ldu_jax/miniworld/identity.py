"""The mini-world's face recognition: an identity embedder and a face / no-face detector.

One small residual CNN trunk (``IdentityNet``) with two heads: a ``embed_dim`` embedding (L2
normalised; trained with a cosine softmax with an additive margin, CosFace-style, over the training
identities) and a face logit (binary cross-entropy, world portraits vs ``world.render_nonface``
images). Training data are rendered on the fly: batch k is a function of (config.seed, k), so a
resumed run sees the batches an unbroken one would.

``train(config, workdir)`` trains (or resumes; the mini-world build's ``identity`` stage:
``python -m ldu_jax.cli.build_world --stages=data,identity``) and ``measure`` scores held-out
identities (ISM of an identity's own photos vs other identities' photos, detector accuracy).
``load(workdir)`` gives an ``IdentityModel`` with batched
``detect`` / ``embed`` / ``face_metrics`` (the semantics of ``ldu_jax.metrics.face``);
``IdentityModel.as_face_model()`` plugs it into ``ldu_jax.metrics.face.face_metrics(model=...)``.
"""
from __future__ import annotations

import math
import os
import queue
import threading
from typing import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from ldu_jax import checkpoint as ckpt
from ldu_jax import data as data_lib
from ldu_jax import loop, parallel
from ldu_jax.metrics import face as face_lib
from ldu_jax.miniworld import world

KIND = "miniworld_identity"


# -------------------------------------------------------------------------------- model

class IdentityNet(nn.Module):
    """Images [-1, 1] NHWC -> (embedding [N, embed_dim] (not normalised), face logit [N])."""
    widths: Sequence[int] = (16, 32, 64, 128)
    embed_dim: int = 64
    groups: int = 8
    blocks: int = 1         # residual blocks (two 3x3 convs each) per stage

    @nn.compact
    def __call__(self, x):
        def norm(h):
            return nn.GroupNorm(num_groups=math.gcd(self.groups, h.shape[-1]))(h)

        h = nn.Conv(self.widths[0], (3, 3), strides=2, name="stem")(x)
        for i, w in enumerate(self.widths):
            if i > 0:
                h = nn.Conv(w, (3, 3), strides=2, name=f"down{i}")(nn.gelu(norm(h)))
            for j in range(self.blocks):
                r = h
                h = nn.Conv(w, (3, 3), name=f"conv{i}_{j}a")(nn.gelu(norm(h)))
                h = nn.Conv(w, (3, 3), name=f"conv{i}_{j}b")(nn.gelu(norm(h)))
                h = h + r
        h = nn.gelu(norm(h))
        pooled = jnp.concatenate([h.mean(axis=(1, 2)), h.max(axis=(1, 2))], axis=-1)
        emb = nn.Dense(self.embed_dim, name="embed")(pooled)
        logit = nn.Dense(1, name="face")(nn.gelu(nn.Dense(64, name="face_hidden")(pooled)))[..., 0]
        return emb, logit


def make_net(model_cfg) -> IdentityNet:
    m = dict(model_cfg)
    return IdentityNet(widths=tuple(int(w) for w in m["widths"]), embed_dim=int(m["embed_dim"]),
                       groups=int(m["groups"]), blocks=int(m.get("blocks", 1)))


def _unit(x, axis=-1):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


# -------------------------------------------------------------------------------- training

@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict            # {'net': IdentityNet params, 'classes': [embed_dim, n_identities]}
    opt_state: object


def make_optimizer(config):
    o = config.optim
    schedule = optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup, max(config.max_steps, o.warmup + 1))
    tx = optax.adamw(schedule, weight_decay=o.weight_decay)
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), tx) if o.grad_clip > 0 else tx


def init_state(net, tx, config, key) -> TrainState:
    k_net, k_cls = jax.random.split(key)
    s = config.image_size
    params = {"net": net.init(k_net, jnp.zeros((1, s, s, 3)))["params"],
              "classes": jax.random.normal(k_cls, (config.model.embed_dim, config.n_identities)) * 0.1}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def make_train_step(net, tx, config):
    """``step(state, images, labels) -> (state, info)``; label -1 marks a non-face image."""
    scale, margin, fw = float(config.loss.scale), float(config.loss.margin), float(config.loss.face_weight)
    n_cls = int(config.n_identities)

    def loss_fn(params, images, labels):
        emb, logit = net.apply({"params": params["net"]}, images)
        is_face = labels >= 0
        cos = _unit(emb) @ _unit(params["classes"], axis=0)
        onehot = jax.nn.one_hot(jnp.maximum(labels, 0), n_cls)
        ce = optax.softmax_cross_entropy(scale * (cos - margin * onehot), onehot)
        w = is_face.astype(jnp.float32)
        id_loss = jnp.sum(ce * w) / jnp.maximum(w.sum(), 1.0)
        face_loss = optax.sigmoid_binary_cross_entropy(logit, w).mean()
        id_acc = jnp.sum((jnp.argmax(cos, -1) == labels) * w) / jnp.maximum(w.sum(), 1.0)
        face_acc = jnp.mean((logit > 0) == is_face)
        return id_loss + fw * face_loss, dict(id_loss=id_loss, face_loss=face_loss, id_acc=id_acc,
                                              face_acc=face_acc)

    def step(state: TrainState, images, labels):
        (loss, info), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, images, labels)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), dict(loss=loss, **info)

    return step


def make_batch(config, identities, step: int, rows: slice = slice(None)):
    """(images [B + B_neg, S, S, 3] float32, labels int32 with -1 for non-faces) of step ``step``.

    A ``config.blur_prob`` share of the images (faces and non-faces) is Gaussian-blurred with sigma
    in [0.3, ``config.blur_max``] px, so that blurred faces (purified or generated) still count.
    ``rows``: only these rows of that batch (a host's share across hosts; every random draw is made
    for the whole batch, so the rows are those of the whole batch whatever the split)."""
    r = np.random.default_rng([int(config.seed), 0xBA7C, int(step)])
    labels = r.integers(len(identities), size=config.batch_size)
    variants = r.integers(2 ** 31, size=config.batch_size)
    total = config.batch_size + config.neg_batch
    keep = range(total)[rows]
    faces = [world.render(identities[labels[k]], variants[k], config.image_size) for k in keep
             if k < config.batch_size]
    negs = [world.render_nonface(int(step) * config.neg_batch + k - config.batch_size, seed=int(config.seed) * 7 + 1,
                                 size=config.image_size) for k in keep if k >= config.batch_size]
    images = np.stack(faces + negs).astype(np.float32)
    blur_p, blur_max = float(config.get("blur_prob", 0.0)), float(config.get("blur_max", 1.5))
    if blur_p > 0:  # faces and non-faces alike, so sharpness is no cue for the detector
        from scipy.ndimage import gaussian_filter
        for k in np.flatnonzero(r.uniform(size=total) < blur_p):
            sigma = r.uniform(0.3, blur_max)   # drawn for every blurred row, kept or not
            if k in keep:
                i = keep.index(k)
                images[i] = gaussian_filter(images[i], sigma=(sigma, sigma, 0), mode="reflect")
    all_labels = np.concatenate([labels, -np.ones(config.neg_batch, np.int64)]).astype(np.int32)
    return images, all_labels[rows]


def _prefetch(make, start: int, depth: int):
    """Yield make(start), make(start + 1), ... computed ``depth`` ahead in a daemon thread."""
    if depth <= 0:
        step = start
        while True:
            yield make(step)
            step += 1
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        step = start
        while not stop.is_set():
            try:
                item = make(step)
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                item = e
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            step += 1

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def make_meta(config, params) -> dict:
    return {"kind": KIND, "model": config.model.to_dict(), "param_shapes": ckpt.param_shapes(params),
            "data_shape": [config.image_size, config.image_size, 3], "vae": "none",
            "n_identities": int(config.n_identities), "world_seed": int(config.world_seed),
            "image_size": int(config.image_size)}


def train(config, workdir: str, log=print) -> TrainState:
    """Train (or resume) the identity model in ``workdir``; returns the final train state. Across
    n hosts each renders its rows of every global batch of ``batch_size + neg_batch`` images
    (``make_batch``'s ``rows``), the parameters are replicated, every host takes part in the
    checkpoints and process 0 writes ``metrics.jsonl``."""
    total = config.batch_size + config.neg_batch
    mesh = parallel.batch_mesh(total)
    dsh, rep = parallel.data_sharding(mesh), parallel.replicated(mesh)
    os.makedirs(workdir, exist_ok=True)
    net, tx = make_net(config.model), make_optimizer(config)
    init_fn = lambda key: init_state(net, tx, config, key)  # noqa: E731
    key = jax.random.PRNGKey(config.seed)
    abstract = jax.eval_shape(init_fn, key)
    shardings = jax.tree_util.tree_map(lambda _: rep, abstract)
    meta = make_meta(config, abstract.params)
    manager = ckpt.make_manager(workdir, config.keep)
    state = loop.init_or_restore(init_fn, key, shardings, manager, meta, workdir, log)
    start = int(state.step)
    update = jax.jit(make_train_step(net, tx, config), in_shardings=(shardings, dsh, dsh),
                     out_shardings=(shardings, rep), donate_argnums=(0,))
    identities = world.train_identities(config.n_identities, config.world_seed)
    local = data_lib.local_rows(total, jax.process_count())   # this host's rows of each global batch
    rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    host = _prefetch(lambda k: make_batch(config, identities, k, rows), start, config.prefetch)

    def batches():
        for images, labels in host:
            yield parallel.global_batch(mesh, images), parallel.global_batch(mesh, labels)

    try:
        if start >= config.max_steps:
            return state
        update, steps = loop.compile_first(update, state, batches(), "identity")
        return loop.train_loop(state, update, steps, manager=manager, meta=meta, workdir=workdir,
                               max_steps=config.max_steps, log_every=config.log_every,
                               save_every=config.save_every, batch_size=total, desc="identity")
    finally:
        host.close()  # stops the rendering thread


# -------------------------------------------------------------------------------- inference

def prepare(images, size: int) -> np.ndarray:
    """uint8 images (list or NxHxWxC; any size: centre-cropped and resized) -> float32 [-1, 1]."""
    out = []
    for img in face_lib.as_images(images):
        h, w = img.shape[:2]
        if (h, w) != (size, size):
            s = min(h, w)
            top, left = (h - s) // 2, (w - s) // 2
            img = np.asarray(Image.fromarray(img[top:top + s, left:left + s]).resize((size, size), Image.BICUBIC))
        out.append(img)
    if not out:
        return np.zeros((0, size, size, 3), np.float32)
    return np.stack(out).astype(np.float32) / 127.5 - 1.0


class IdentityModel:
    """The trained embedder + detector. Images are uint8 HxWx3 (a list or an NxHxWx3 array)."""

    name = "miniworld"

    def __init__(self, params, model_cfg, image_size: int = 64, batch_size: int = 32, threshold: float = 0.5):
        self.params, self.image_size, self.batch_size = params, int(image_size), int(batch_size)
        self.threshold = float(threshold)
        net = make_net(model_cfg)

        def apply(p, x):
            emb, logit = net.apply({"params": p}, x)
            return _unit(emb), jax.nn.sigmoid(logit)

        self._apply = jax.jit(apply)

    def run(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(unit embeddings [N, D] float32, face probabilities [N]) in fixed-size batches."""
        x = prepare(images, self.image_size)
        n, b = len(x), self.batch_size
        embs, probs = [], []
        for i in range(0, n, b):
            chunk = x[i:i + b]
            pad = b - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.float32)])
            e, p = self._apply(self.params, chunk)
            embs.append(np.asarray(e)[:b - pad])
            probs.append(np.asarray(p)[:b - pad])
        if not embs:
            d = int(np.shape(self.params["embed"]["kernel"])[-1])
            return np.zeros((0, d), np.float32), np.zeros((0,), np.float32)
        return np.concatenate(embs), np.concatenate(probs)

    def face_prob(self, images) -> np.ndarray:
        return self.run(images)[1]

    def detect(self, images) -> np.ndarray:
        """bool [N]: whether each image shows a face of the world."""
        return self.run(images)[1] > self.threshold

    def embed(self, images) -> np.ndarray:
        """[N, D] unit identity embeddings (computed whether or not a face is detected)."""
        return self.run(images)[0]

    def face_metrics(self, images, reference_images) -> dict:
        """``ldu_jax.metrics.face.face_metrics`` (fdfr, ism, fd, n, n_faces), each batch embedded in
        one pass. Raises ValueError when no reference image is detected as a face."""
        return face_lib.face_metrics(images, reference_images, model=self.as_face_model())

    def as_face_model(self) -> face_lib.FaceModel:
        """This model as an ``ldu_jax.metrics.face.FaceModel`` (one 'face' box = the whole image)."""
        return _FaceModelAdapter(self)


class _FaceModelAdapter(face_lib.FaceModel):
    name = "miniworld"

    def __init__(self, model: IdentityModel):
        self.model = model

    def faces(self, img):
        e, p = self.model.run([img])
        if p[0] <= self.model.threshold:
            return []
        h, w = img.shape[:2]
        return [(np.array([0, 0, w, h]), e[0])]

    def _embed_face(self, img, embedding):
        return embedding

    def embed_batch(self, images):
        e, p = self.model.run(list(images))
        return [x.astype(np.float64) if ok else None for x, ok in zip(e, p > self.model.threshold)]


def load(workdir: str, step: int | None = None, batch_size: int = 32, threshold: float = 0.5) -> IdentityModel:
    """The ``IdentityModel`` of a work dir's latest (or given) checkpoint."""
    state, meta = ckpt.restore_state(workdir, step)
    if meta.get("kind") != KIND:
        raise ckpt.CheckpointMismatchError(f"{workdir} does not hold a mini-world identity model "
                                           f"(its checkpoint says kind={meta.get('kind')!r})")
    params = jax.tree_util.tree_map(jnp.asarray, state["params"]["net"])
    return IdentityModel(params, meta["model"], meta["image_size"], batch_size, threshold)


# -------------------------------------------------------------------------------- measurement

def measure(model: IdentityModel, n_identities: int = 24, n_refs: int = 4, n_tests: int = 8, seed: int = 0,
            n_nonfaces: int = 0) -> dict:
    """How well the model tells held-out identities apart and faces from non-faces.

    For each of ``n_identities`` held-out identities: references = variants 0..n_refs-1, tests =
    ``n_tests`` later variants. ``ism_same``: mean cosine of an identity's tests to its own reference
    centre; ``ism_other``: of other identities' tests to it; ``rank1``: share of tests whose nearest
    reference centre is their own. Detector: accuracy on all test portraits and on ``n_nonfaces``
    (default as many) ``world.random_backgrounds`` images. All images count (detected or not).
    """
    idents = world.heldout_identities(n_identities, seed)
    refs = np.stack([world.render(i, v, model.image_size, np.uint8) for i in idents for v in range(n_refs)])
    tests = np.stack([world.render(i, 1000 + v, model.image_size, np.uint8) for i in idents for v in range(n_tests)])
    ref_e, ref_p = model.run(refs)
    test_e, test_p = model.run(tests)
    centres = ref_e.reshape(n_identities, n_refs, -1).mean(1)
    centres /= np.linalg.norm(centres, axis=-1, keepdims=True)
    sims = test_e.reshape(n_identities, n_tests, -1) @ centres.T        # [id, test, centre]
    own = np.eye(n_identities, dtype=bool)[:, None, :].repeat(n_tests, 1)
    n_neg = n_nonfaces or len(tests)
    neg = world.random_backgrounds(n_neg, seed=10_000 + seed, size=model.image_size)
    neg_p = model.face_prob(data_lib.to_uint8(neg))
    thr = model.threshold
    faces_ok = np.concatenate([ref_p, test_p]) > thr
    return {"ism_same": float(sims[own].mean()), "ism_other": float(sims[~own].mean()),
            "ism_same_std": float(sims[own].reshape(n_identities, -1).mean(1).std()),
            "rank1": float(np.mean(sims.argmax(-1) == np.arange(n_identities)[:, None])),
            "det_acc_faces": float(faces_ok.mean()), "det_acc_nonfaces": float(np.mean(neg_p <= thr)),
            "det_acc": float((faces_ok.sum() + np.sum(neg_p <= thr)) / (len(faces_ok) + len(neg_p)))}
