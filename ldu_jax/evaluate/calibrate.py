"""Is a mini-world as vulnerable as Stable Diffusion? Measurements, and the calibration gates.

    python -m ldu_jax.cli.calibrate --workdir=runs/calibrate [--models=DIR] [--parts=...]

A protection comparison means something only in a world where the published protections work at
their published budgets. Each part measures one reason a world could be more robust than SD:

  content   how much fine structure a portrait has to hide a change in: RMS of (image - its
            Gaussian blur, sigma 1 px) against the RMS of a 36 dB change (0.0158 on [0, 1])
  encoder   PhotoGuard's encoder attack at its published budget (eps 0.06, step 0.02 in [-1, 1]
            units): PSNR(D(E(x')), x) against PSNR(D(E(x)), x), and how far the latent moved per
            unit of pixel change (SD's KL-f8 encoder is fragile: D(E(x')) collapses)
  identity  what the identity model sees through artefacts: ISM against the subject's clean photos
            and the face rate of clean photos with noise, blur or a texture added
  imprint   whether DreamBooth reproduces a pattern shared by its training photos: the same seeds
            trained on clean photos and on photos + a fixed pattern p; the fraction of p in the
            samples' difference, <s_p - s_clean, p> / <p, p>
  gates     the calibration gates, through the evaluation's cached cells: clean DreamBooth learns the
            person (own ISM >= 5x others); AdvDM 8/255 and ASPL eps 0.05 ([-1, 1]) each cut ISM by
            >= 40% of the clean own-vs-others gap and raise FDFR; JPEG 75 and blur weaken them;
            plus the encoder gate (>= 10 dB drop)

Results go to ``<workdir>/calibrate.json`` (each part cached; ``--redo`` recomputes) and a table on
stdout. The world's models come from ``--models`` (sd/ and identity/, as the package ships them).
"""
from __future__ import annotations

import os
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import ndimage

from ldu_jax import checkpoint as ckpt
from ldu_jax import config_file, files, purify
from ldu_jax import data as data_lib
from ldu_jax.errors import ConfigError
from ldu_jax.evaluate import runner
from ldu_jax.jobs import attack as attack_lib
from ldu_jax.miniworld import MODELS, identity, train_vae, world
from ldu_jax.protect import baselines
from ldu_jax.sd import models as sdm
from ldu_jax.sd import vae as vae_lib

PARTS = ("content", "encoder", "identity", "imprint", "gates")
BUDGET_36DB_RMS = 10 ** (-36 / 20)      # RMS on [0, 1] of a change at PSNR 36 dB
# the published budgets, converted to [0, 1] units (the baselines' configs use those)
PHOTOGUARD = {"eps": 0.06 / 2, "step_size": 0.02 / 2}
PURIFICATIONS = {"jpeg:quality=75": "JPEG 75", "blur:sigma=1.0": "blur σ=1"}   # the gates' settings: labels
GATE_SETTINGS = ("none", *PURIFICATIONS)


# ------------------------------------------------------------------------------------ helpers

def to_unit(images) -> np.ndarray:
    """uint8 images (or [-1, 1] floats) -> float64 [N, H, W, 3] on [0, 1]."""
    x = np.asarray(images)
    return x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else (x.astype(np.float64) + 1.0) / 2.0


def psnr01(a, b) -> np.ndarray:
    """PSNR (dB) per image of [0, 1] images."""
    mse = np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64)), axis=(1, 2, 3))
    return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-12))


def fine_rms(images, sigma: float = 1.0) -> np.ndarray:
    """RMS per image of (x - Gaussian blur of x) on [0, 1]: the structure a change can hide in."""
    x = to_unit(images)
    low = ndimage.gaussian_filter(x, (0, sigma, sigma, 0))
    return np.sqrt(np.mean(np.square(x - low), axis=(1, 2, 3)))


def imprint_fraction(with_pattern, clean, pattern) -> np.ndarray:
    """Per sample: the least-squares coefficient of ``pattern`` in (with_pattern - clean), all on the
    same scale; 1 = the pattern reproduced in full, 0 = not at all."""
    d = np.asarray(with_pattern, np.float64) - np.asarray(clean, np.float64)
    p = np.asarray(pattern, np.float64)
    return np.sum(d * p, axis=(1, 2, 3)) / np.sum(p * p)


def sign_pattern(size: int, seed: int = 0) -> np.ndarray:
    """A fixed pixel-level +-1 pattern [size, size, 3] (the highest-frequency texture there is)."""
    return np.random.default_rng([0xCA1, seed]).choice([-1.0, 1.0], (size, size, 3))


def texture_pattern(size: int) -> np.ndarray:
    """The baselines' built-in target texture (checkers, rings, stripes), scaled to [-1, 1] L-inf."""
    p = baselines.pattern_image(size).astype(np.float64)
    return p / np.max(np.abs(p))


def add_pattern(images_u8, pattern, amplitude: float) -> np.ndarray:
    """uint8 images plus ``amplitude`` (on [0, 1]) x pattern, rounded and clipped."""
    x = np.asarray(images_u8, np.float64) + 255.0 * amplitude * pattern
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------ world

class World:
    """The models and held-out subjects a calibration measures."""

    def __init__(self, models: str, workdir: str, n_subjects: int, log=print):
        self.models, self.log = models, log
        self.sd, self.params = sdm.load_sd(os.path.join(models, "sd"))
        self.resolution = int(self.sd.resolution)
        self.subjects_dir = os.path.join(workdir, "subjects")
        self.subjects = world.write_heldout_subjects(self.subjects_dir, n_subjects, size=self.resolution)
        self._identity = None

    @property
    def identity(self):
        if self._identity is None:
            self._identity = identity.load(os.path.join(self.models, "identity"))
        return self._identity

    def photos(self, subject: str, sets=("set_B",)) -> np.ndarray:
        imgs = []
        for s in sets:
            imgs += data_lib.read_rgb_folder(os.path.join(self.subjects_dir, subject, s), log=lambda *_: None)[1]
        return np.stack(imgs)

    def references(self, subject: str) -> np.ndarray:
        return self.photos(subject, ("set_A", "set_C"))


# ------------------------------------------------------------------------------------ parts

def measure_content(w: World) -> dict:
    """Fine structure of the portraits against a 36 dB change, and what JPEG 75 / blur remove."""
    x = np.concatenate([w.photos(s) for s in w.subjects])
    rms = fine_rms(x)
    return {"resolution": w.resolution, "fine_rms": float(rms.mean()), "budget_36db_rms": BUDGET_36DB_RMS,
            "fine_rms_over_budget": float(rms.mean() / BUDGET_36DB_RMS),
            "jpeg75_psnr": float(psnr01(to_unit(purify.jpeg(x, 75)), to_unit(x)).mean()),
            "blur1_psnr": float(psnr01(to_unit(purify.blur(x, 1.0)), to_unit(x)).mean())}


def encoder_attack(vae, vae_params, images_u8, steps: int = 200, target: str = "pattern") -> dict:
    """PhotoGuard's encoder attack at its published budget against a VAE (``ldu_jax.sd.vae.VAE``
    module, params) on uint8 photos: what it does to the round trip D(E(x')), and how much of a
    fixed 8/255 pattern on the photos the round trip passes on (what an attack could learn)."""


    res = images_u8.shape[1]
    cfg = baselines.base_config("photoguard")
    cfg.update(dict(PHOTOGUARD, steps=int(steps), target=target))
    params = {"vae": vae_params}
    t = baselines.target_image(target, res)
    if t is not None:
        params["target"] = jnp.asarray(t)
    sd = types.SimpleNamespace(vae=vae.module)        # the attack touches only the VAE
    attack = jax.jit(lambda p, x, k: baselines.photoguard(sd, p, x, k, cfg)[0])
    roundtrip = jax.jit(lambda p, x: vae_lib.decode(vae, p, vae_lib.encode(vae, p, x)))
    latent = jax.jit(lambda p, x: vae_lib.encode(vae, p, x))
    x = np.asarray(images_u8)
    xf = jnp.asarray(x, jnp.float32) / 127.5 - 1.0
    xa = attack(params, xf, jax.random.PRNGKey(0))
    xa = jnp.asarray(data_lib.to_uint8(np.asarray(xa)), jnp.float32) / 127.5 - 1.0   # as written to disk
    rec, rec_a = roundtrip(vae_params, xf), roundtrip(vae_params, xa)
    z, za = latent(vae_params, xf), latent(vae_params, xa)
    u = lambda a: (np.clip(np.asarray(a, np.float64), -1, 1) + 1) / 2  # noqa: E731
    out = {"steps": int(steps), "target": target, "eps_m11": 0.06,
           "psnr_protected": float(psnr01(u(xa), u(xf)).mean()),
           "psnr_rec_clean": float(psnr01(u(rec), u(xf)).mean()),
           "psnr_rec_protected": float(psnr01(u(rec_a), u(xf)).mean())}
    out["psnr_drop"] = out["psnr_rec_clean"] - out["psnr_rec_protected"]
    rel = lambda a, b: np.linalg.norm(np.asarray(a - b).reshape(len(x), -1), axis=1) / \
        np.linalg.norm(np.asarray(b).reshape(len(x), -1), axis=1)  # noqa: E731
    dz, dx = rel(za, z), rel(xa, xf)
    out["latent_rel_change"] = float(dz.mean())
    out["latent_amplification"] = float((dz / dx).mean())   # relative latent move / relative pixel move
    for name, pat in (("sign", sign_pattern(res)), ("texture", texture_pattern(res))):
        xp = jnp.asarray(add_pattern(x, pat, 8 / 255), jnp.float32) / 127.5 - 1.0
        f = imprint_fraction(u(roundtrip(vae_params, xp)), u(rec), (pat * 8 / 255)[None])
        out[f"vae_passes_{name}_pattern"] = float(f.mean())
    if t is not None:
        tt = np.broadcast_to(u(t), u(xf).shape)
        out["psnr_rec_protected_vs_target"] = float(psnr01(u(rec_a), tt).mean())
        out["psnr_rec_clean_vs_target"] = float(psnr01(u(rec), tt).mean())
    return out


def measure_encoder(w: World, steps: int = 200, batch: int = 8) -> dict:
    """``encoder_attack`` on the world's VAE and the first ``batch`` held-out photos."""
    x = np.concatenate([w.photos(s) for s in w.subjects])[:batch]
    return encoder_attack(vae_lib.VAE(w.sd.vae, None), w.params["vae"], x, steps)


def encoder_along_run(vae_workdir: str, style: str = "v2", n_images: int = 8, steps: int = 200,
                      log=print, sensor_noise: float = 1.0) -> list[dict]:
    """``encoder_attack`` at every kept checkpoint of a ``train_vae`` run (does the encoder grow
    fragile as it learns?), on held-out portraits of ``style`` at the run's resolution."""

    manager = ckpt.make_manager(vae_workdir)
    out = []
    for step in sorted(manager.all_steps()):
        state, meta = ckpt.restore_state(vae_workdir, step)
        if meta.get("kind") != "vae":
            raise ckpt.CheckpointMismatchError(f"{vae_workdir} is not a VAE run (its checkpoint says "
                                               f"kind={meta.get('kind')!r})")
        size = int(meta["data_shape"][0])
        vae = vae_lib.VAE(train_vae.make_vae_module(ml_collections.ConfigDict(meta["model"])), None)
        x = np.stack([world.render(h, 0, size, np.uint8, style=style, sensor_noise=sensor_noise)
                      for h in world.heldout_identities(n_images)])
        r = {"step": int(step), **encoder_attack(vae, jax.tree_util.tree_map(np.asarray, state["params"]), x, steps)}
        log(f"step {step}: reconstruction {r['psnr_rec_clean']:.1f} dB, attacked {r['psnr_rec_protected']:.1f} dB "
            f"(drop {r['psnr_drop']:.2f}), latent moved {100 * r['latent_rel_change']:.0f}%")
        out.append(r)
    return out


CORRUPTIONS = (("noise", (4, 8, 16, 32, 64)), ("blur", (1.0, 2.0, 4.0)), ("sign pattern", (4, 8, 16, 32)),
               ("texture pattern", (8, 16, 32, 64)))


def corrupt(images_u8, kind: str, strength):
    """uint8 images with one artefact: Gaussian noise of std strength/255, a Gaussian blur of
    sigma strength px, or a fixed pattern of L-inf amplitude strength/255."""
    x = np.asarray(images_u8)
    if kind == "noise":
        return np.stack(purify.noise(x, strength / 255, seed=1))
    if kind == "blur":
        return np.stack(purify.blur(x, strength))
    pattern = sign_pattern(x.shape[1]) if kind == "sign pattern" else texture_pattern(x.shape[1])
    return add_pattern(x, pattern, strength / 255)


def measure_identity(w: World) -> dict:
    """ISM (own / others) and face rate of clean photos under artefacts of growing strength."""
    model = w.identity
    refs = {s: model.embed(list(w.references(s))) for s in w.subjects}
    photos = {s: w.photos(s) for s in w.subjects}

    def score(images_of):
        own, others, faces = [], [], []
        for s in w.subjects:
            e, p = model.run(list(images_of(photos[s])))
            e = e / np.linalg.norm(e, axis=1, keepdims=True)
            mean = lambda r: r.mean(0) / np.linalg.norm(r.mean(0))  # noqa: E731
            own.append(float(np.mean(e @ mean(refs[s]))))
            others.append(float(np.mean([np.mean(e @ mean(refs[o])) for o in w.subjects if o != s])))
            faces.append(float(np.mean(p > model.threshold)))
        return {"ism": float(np.mean(own)), "ism_others": float(np.mean(others)), "face_rate": float(np.mean(faces))}

    out = {"clean": score(lambda x: x)}
    for kind, strengths in CORRUPTIONS:
        for s in strengths:
            out[f"{kind} {s:g}"] = {**score(lambda x: corrupt(x, kind, s)),
                                    "psnr": float(psnr01(to_unit(corrupt(photos[w.subjects[0]], kind, s)),
                                                         to_unit(photos[w.subjects[0]])).mean())}
    return out


def measure_imprint(w: World, workdir: str, subjects=2, amplitudes=(8, 16), max_steps: int = 200,
                    attack_config: str = "configs/attack_db_miniworld.py", overrides=None, kinds=("sign", "texture"),
                    name: str = "imprint") -> dict:
    """DreamBooth on photos + a fixed pattern against DreamBooth on the clean photos, same seeds;
    ``overrides`` of the attack config; runs cached under ``<workdir>/<name>``."""
    cfg = config_file.load(attack_config, {"max_steps": int(max_steps), **(overrides or {})})
    cfg.model = os.path.join(w.models, "sd")
    cfg.class_images_dir = os.path.join(workdir, "imprint", "class_images")
    model = w.identity
    out = {}
    for subject in w.subjects[:subjects]:
        x = w.photos(subject)
        ref = model.embed(list(w.references(subject)))
        ref = ref.mean(0) / np.linalg.norm(ref.mean(0))
        runs = {"clean": (x, None)}
        for kind in kinds:
            pat = sign_pattern(w.resolution) if kind == "sign" else texture_pattern(w.resolution)
            for a in amplitudes:
                runs[f"{kind} {a}/255"] = (add_pattern(x, pat, a / 255), pat * a / 255)
        samples = {}
        for run_name, (images, _pat) in runs.items():
            base = os.path.join(workdir, name, subject, run_name.replace(" ", "_").replace("/", "_"))
            cached = os.path.join(base, "samples.npy")
            if not os.path.isfile(cached):
                img_dir = os.path.join(base, "images")
                for i, img in enumerate(images):
                    data_lib.save_image_atomic(os.path.join(img_dir, f"{i:02d}.png"), img)
                gen = attack_lib.run("dreambooth", cfg, img_dir, os.path.join(base, "attack"), log=w.log)
                arr = np.stack([g for imgs in gen.values() for g in imgs])
                with files.atomic_write(cached) as f:
                    np.save(f, arr)
            samples[run_name] = np.load(cached)
        clean = to_unit(samples["clean"])
        for run_name, (_images, pat) in runs.items():
            e = model.embed(list(samples[run_name]))
            row = {"ism": float(np.mean(e @ ref)),
                   "face_rate": float(np.mean(model.face_prob(list(samples[run_name])) > model.threshold))}
            if pat is not None:
                f = imprint_fraction(to_unit(samples[run_name]), clean, pat[None])
                row.update(imprint=float(f.mean()), imprint_std=float(f.std()),
                           sample_change_rms=float(np.sqrt(np.mean(np.square(to_unit(samples[run_name]) - clean)))))
            out.setdefault(run_name, []).append(row)
    return {k: {m: float(np.mean([r[m] for r in v])) for m in v[0]} for k, v in out.items()}


def gate_config(models: str, subjects: int, max_steps: int, eval_config: str = "configs/eval_miniworld.py",
                settings=GATE_SETTINGS):
    """The evaluation config of the gates: clean, AdvDM 8/255 and ASPL eps 0.05 x ``settings`` (no
    purification, JPEG 75 and blur) x DreamBooth."""
    c = config_file.load(eval_config)
    c.data = f"miniworld:{int(subjects)}"
    c.subjects = ()
    c.sd, c.face_backend = os.path.join(models, "sd"), "miniworld:" + os.path.join(models, "identity")
    c.methods = ("none", "advdm", "aspl")
    # at their published budgets (the config's '@published' variants), in cells named advdm and aspl
    c.method_overrides = {**c.method_overrides, **{m: dict(c.method_overrides[f"{m}@published"])
                                                   for m in ("advdm", "aspl")}}
    c.settings = tuple(settings)
    c.attacks = ("dreambooth",)
    c.attack_overrides = {**c.attack_overrides, "dreambooth": {"max_steps": int(max_steps)}}
    return c


def gates(rows, encoder: dict | None = None, identity: dict | None = None) -> list[dict]:
    """The calibration gates from evaluation rows (``evaluate.run``'s) and the encoder part:
    [{gate, value, threshold, passed}], values averaged over subjects. With the identity part, two
    rows more, for reading the clean gate (threshold None: no gate): the real photos' own / others
    ratio (the most the identity model lets any generator reach: its ISM between different people
    is not ~0 as ArcFace's is) and the share of the real photos' own-minus-others gap that clean
    DreamBooth recovers."""
    def cell(method, setting, key):
        v = [r.get(key) for r in rows if r.get("status") == "done" and r["method"] == method
             and r["setting"] == setting and r["attack"] == "dreambooth"]
        v = [float(x) for x in v if x is not None and np.isfinite(float(x))]
        return float(np.mean(v)) if v else float("nan")

    out = []
    if encoder:
        out.append({"gate": "PhotoGuard eps 0.06: PSNR(D(E(x'))) drop, dB", "value": encoder["psnr_drop"],
                    "threshold": 10.0, "passed": encoder["psnr_drop"] >= 10.0})
    own, others = cell("none", "none", "ism"), cell("none", "none", "ism_others")
    gap = own - others
    out.append({"gate": "clean DreamBooth: own ISM / others", "value": own / others if others > 0 else float("inf"),
                "threshold": 5.0, "passed": own >= 5 * others})
    if identity and "clean" in identity:
        real_own, real_others = identity["clean"]["ism"], identity["clean"]["ism_others"]
        out.append({"gate": "(real photos: own ISM / others, the ratio's ceiling)", "value": real_own / real_others,
                    "threshold": None, "passed": None})
        out.append({"gate": "(clean DreamBooth: own - others, share of the real photos')",
                    "value": gap / (real_own - real_others), "threshold": None, "passed": None})
    for method, label in (("advdm", "AdvDM 8/255"), ("aspl", "ASPL eps 0.05")):
        # rows name a setting as the evaluation parses it
        cut = {s: cell("none", str(purify.parse(s)), "ism") - cell(method, str(purify.parse(s)), "ism")
               for s in GATE_SETTINGS}
        out.append({"gate": f"{label}: ISM cut / clean gap", "value": cut["none"] / gap, "threshold": 0.4,
                    "passed": cut["none"] >= 0.4 * gap})
        d_fdfr = cell(method, "none", "fdfr") - cell("none", "none", "fdfr")
        out.append({"gate": f"{label}: FDFR rise", "value": d_fdfr, "threshold": 0.0, "passed": d_fdfr > 0})
        for s, name in PURIFICATIONS.items():
            if not np.isfinite(cut[s]):
                continue            # that purification was not run (--gate_settings)
            out.append({"gate": f"{label}: cut after {name} < cut without", "value": cut[s],
                        "threshold": cut["none"], "passed": cut[s] < cut["none"]})
    return out


# ------------------------------------------------------------------------------------ command

def calibrate(workdir: str, models: str = MODELS, parts=PARTS, n_subjects: int = 4, attack_steps: int = 200,
              encoder_steps: int = 200, redo: bool = False, gate_settings=GATE_SETTINGS, log=print) -> dict:
    """Run the parts (each cached in ``<workdir>/calibrate.json``); returns every result."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ConfigError(f"unknown part(s) {', '.join(unknown)}; parts: {', '.join(PARTS)}")
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "calibrate.json")
    res = files.read_json(path) or {}
    w = World(models, workdir, n_subjects, log)
    for part in parts:
        if part in res and not redo:
            continue
        log(f"[{part}] measuring ...")
        if part == "content":
            res[part] = measure_content(w)
        elif part == "encoder":
            res[part] = measure_encoder(w, encoder_steps)
        elif part == "identity":
            res[part] = measure_identity(w)
        elif part == "imprint":
            res[part] = measure_imprint(w, workdir, max_steps=attack_steps)
        else:
            cfg = gate_config(models, n_subjects, attack_steps, settings=gate_settings)
            rows = runner.run(cfg, os.path.join(workdir, "gates"), log=log)
            res[part] = gates(rows, res.get("encoder"), res.get("identity"))
            res["gates_setup"] = {"subjects": int(n_subjects), "dreambooth_steps": int(attack_steps)}
        files.write_json(path, res)
    return res


def report(res: dict) -> str:
    """The results as markdown."""
    lines = []
    if "content" in res:
        c = res["content"]
        lines += [f"content ({c['resolution']} px): fine-structure RMS {c['fine_rms']:.4f} = "
                  f"{c['fine_rms_over_budget']:.2f}x a 36 dB change's RMS; JPEG 75 {c['jpeg75_psnr']:.1f} dB, "
                  f"blur sigma 1 {c['blur1_psnr']:.1f} dB on clean photos", ""]
    if "encoder" in res:
        e = res["encoder"]
        lines += [f"encoder (PhotoGuard eps 0.06, {e['steps']} steps, target {e['target']}): protected photo "
                  f"{e['psnr_protected']:.1f} dB; PSNR(D(E(x)), x) {e['psnr_rec_clean']:.1f} dB -> "
                  f"PSNR(D(E(x')), x) {e['psnr_rec_protected']:.1f} dB (drop {e['psnr_drop']:.1f} dB); latent moved "
                  f"{100 * e['latent_rel_change']:.1f}% ({e['latent_amplification']:.1f}x the relative pixel change); "
                  f"the VAE round trip passes {e.get('vae_passes_sign_pattern', float('nan')):.3f} of an 8/255 pixel "
                  f"sign pattern and {e.get('vae_passes_texture_pattern', float('nan')):.3f} of a texture", ""]
    if "identity" in res:
        lines += ["| artefact | PSNR | ISM own | ISM others | face rate |", "|---|---|---|---|---|"]
        for k, v in res["identity"].items():
            ps = f"{v['psnr']:.1f}" if "psnr" in v else "∞"
            lines.append(f"| {k} | {ps} | {v['ism']:.3f} | {v['ism_others']:.3f} | {v['face_rate']:.2f} |")
        lines.append("")
    if "imprint" in res:
        lines += ["| DreamBooth photos | ISM | face rate | pattern reproduced | sample change RMS |",
                  "|---|---|---|---|---|"]
        for k, v in res["imprint"].items():
            imp = f"{v['imprint']:.3f} ± {v['imprint_std']:.3f}" if "imprint" in v else "–"
            ch = f"{v['sample_change_rms']:.4f}" if "sample_change_rms" in v else "–"
            lines.append(f"| {k} | {v['ism']:.3f} | {v['face_rate']:.2f} | {imp} | {ch} |")
        lines.append("")
    if "gates" in res:
        g = res.get("gates_setup")
        if g:
            lines += [f"gates: {g['subjects']} held-out subjects, DreamBooth {g['dreambooth_steps']} steps", ""]
        lines += ["| gate | value | threshold | passed |", "|---|---|---|---|"]
        lines += [f"| {g['gate']} | {g['value']:.3f} | "
                  + ("– | – |" if g["threshold"] is None else
                     f"{g['threshold']:.3f} | {'yes' if g['passed'] else 'NO'} |") for g in res["gates"]]
    return "\n".join(lines)
