"""From clean photos to the papers' results table: protect -> purify -> personalize -> generate -> measure.

    python -m ldu_jax.evaluate --config=configs/eval_tiny.py --workdir=runs/eval

Subjects follow the Anti-DreamBooth layout ``<root>/<subject>/{set_A,set_B,set_C}``: set_B is
protected and given to the attack; the person's clean photos (``reference_sets``) are the identity
reference. For every subject x method x setting x attack the runner protects set_B (once per
subject and method), purifies it, runs Textual Inversion or DreamBooth on it, generates images and
measures them. Work dir::

    cells/<subject>/<method>/protected/          protected set_B (+ report.csv, protect.json)
    cells/<subject>/<method>/<setting>/images/   purified images given to the attack
    cells/<subject>/<method>/<setting>/<attack>/ the attack's run, samples/ and cell.json
    results.csv  results.md  plots/*.png

A finished cell (its cell.json) is served from cache on a rerun; a cell that failed or was skipped
is retried; ``cached_only=True`` tabulates the cached cells of the grid and runs nothing (a grid run
in parts). ISM drop: the clean photos' ISM (method and setting none, same subject and attack) minus
the cell's. Bad input (a subject without set_B, a missing metric model, photos without faces) marks
that cell or metric skipped with its reason and the rest goes on.
"""
from __future__ import annotations

import csv
import importlib.util
import math
import os
import re
import shutil
import time

import ml_collections
import numpy as np
from PIL import Image

from ldu_jax import data as data_lib
from ldu_jax import files

COLUMNS = ("subject", "method", "setting", "attack", "status", "reason", "n_protected", "psnr", "ssim",
           "linf", "fid_protected", "n_generated", "fdfr", "ism", "ism_others", "ism_drop", "fd_identity",
           "brisque", "clip_iqa", "fid_generated", "seconds", "notes")
# (column, label, higher is better for the protection?)
TABLE_METRICS = (("psnr", "PSNR↑", None), ("ssim", "SSIM↑", None), ("fid_protected", "FID(prot)↓", None),
                 ("fdfr", "FDFR↑", True), ("ism", "ISM↓", False), ("ism_others", "ISM(others)", None),
                 ("ism_drop", "ISM drop↑", True),
                 ("fd_identity", "FD(id)↑", True), ("brisque", "BRISQUE↑", True),
                 ("clip_iqa", "CLIP-IQA↓", False), ("fid_generated", "FID(gen)↑", True))
SETS = ("set_A", "set_B", "set_C")


class Skip(Exception):
    """A cell or metric that cannot be computed, with the reason recorded in results.csv."""


def slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9.=_-]+", "_", str(text)).strip("_") or "none"


def load_config_file(path: str, overrides=None) -> ml_collections.ConfigDict:
    """``get_config()`` of a configs/*.py file, with ``overrides`` (a dict) applied; unknown keys
    are errors naming the key and the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_cfg_{slug(path)}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    for key, value in dict(overrides or {}).items():
        if key not in cfg:
            raise ValueError(f"{path}: no config key {key!r} (override from the evaluation config)")
        with cfg.ignore_type():
            cfg[key] = value
    return cfg


# ---------------------------------------------------------------------------- subjects

def make_demo_subjects(root: str, n: int, per_set: int = 4, size: int = 64) -> str:
    """``n`` procedural subjects in the Anti-DreamBooth layout (for CPU smoke evaluations)."""
    for s in range(n):
        for k, name in enumerate(SETS):
            folder = os.path.join(root, f"subject_{s}", name)
            for i in range(per_set):
                path = os.path.join(folder, f"{i:02d}.png")
                if not os.path.exists(path):
                    img = data_lib.procedural_portrait(100 + s, 10 * k + i, size, size)
                    data_lib.save_image_atomic(path, img)
    return root


def find_subjects(root: str, names=()) -> list[str]:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"subjects root {root} does not exist")
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if names:
        missing = [n for n in names if n not in found]
        if missing:
            raise FileNotFoundError(f"{root}: no subject folder {', '.join(missing)}")
        found = list(names)
    if not found:
        raise FileNotFoundError(f"{root}: no subject folders (<root>/<subject>/set_B expected)")
    return found


def read_images(folder: str) -> tuple[list[str], list[np.ndarray]]:
    """(stems, uint8 RGB images) of a folder; unreadable files are skipped silently."""
    return data_lib.read_rgb_folder(folder, log=lambda s: None)


# ---------------------------------------------------------------------------- metrics

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
            from ldu_jax.metrics import fid
            return fid.load_weights(self.cfg.fid_weights)
        return self._get("fid", load)

    def fid(self, images_a, images_b):
        from ldu_jax.metrics import fid
        p = self.fid_params()
        return fid.fid(p, np.stack(_same_size(images_a)), np.stack(_same_size(images_b)),
                       batch_size=self.cfg.fid_batch)

    def face(self, images, reference, others=()):
        from ldu_jax.metrics import face
        backend = self.cfg.face_backend
        if backend.startswith("miniworld:"):  # the mini-world's identity model (a build's identity/ dir)
            from ldu_jax.miniworld import identity
            load = lambda: identity.load(backend.split(":", 1)[1]).as_face_model()  # noqa: E731
        else:
            load = lambda: face.load_face_model(backend)  # noqa: E731
        model = self._get("face", load)
        try:
            m = face.face_metrics(images, reference, model=model, others=others)
        except ValueError as e:  # e.g. no face in the reference photos
            raise Skip(str(e)) from None
        return {"fdfr": m["fdfr"], "ism": m["ism"], "fd_identity": m["fd"],
                **({"ism_others": m["ism_others"]} if others else {})}

    def brisque(self, images):
        from ldu_jax.metrics import quality
        return float(np.mean(quality.brisque(images)))

    def clip_iqa(self, images):
        if not self.cfg.clip_iqa:
            raise Skip("no CLIP weights (config clip_iqa)")
        from ldu_jax.metrics import quality
        return float(np.mean(quality.clip_iqa(images, self.cfg.clip_iqa)))


def _same_size(images):
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
    from ldu_jax.metrics import image as im
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


# ---------------------------------------------------------------------------- the cells

class Runner:
    def __init__(self, cfg, workdir: str, log=print):
        self.cfg, self.workdir, self.log = cfg, workdir, log
        self.metrics = Metrics(cfg, log)
        self._purify_models = None
        self._protectors = {}   # method -> (protect_batch, resolution): models loaded, programs compiled once
        self._attacker = None

    # -- protection
    def method_config(self, method: str):
        path = self.cfg.method_configs.get(method)
        if not path:
            raise Skip(f"no config for method {method!r} (config method_configs)")
        cfg = load_config_file(path, self.cfg.method_overrides.get(method, {}))
        if "sd" in cfg:
            cfg.sd = self.cfg.sd
        if "shortcut" in cfg and method.startswith("ldu"):
            cfg.shortcut = self.cfg.shortcut
        return cfg

    def rho_checkpoint(self, cfg) -> str:
        if self.cfg.rho_checkpoint:
            return self.cfg.rho_checkpoint
        from ldu_jax.protect.run import train_rho
        workdir = os.path.join(self.workdir, "rho")
        if self.cfg.rho_dataset:
            cfg.dataset = self.cfg.rho_dataset
        self.log(f"training ρ for the evaluation in {workdir} (resumes; set rho_checkpoint to reuse one)")
        train_rho(cfg, workdir, log=self.log)
        return workdir

    def protect(self, subject: str, method: str) -> tuple[str, dict]:
        """(folder of the images given to the attack before purification, imperceptibility)."""
        clean = os.path.join(self.cfg.data, subject, "set_B")
        if method == "none":
            return clean, {"n_protected": len(read_images(clean)[0]), "psnr": math.inf, "ssim": 1.0, "linf": 0.0}
        base = os.path.join(self.workdir, "cells", subject, method)
        out = os.path.join(base, "protected")
        done = files.read_json(os.path.join(base, "protect.json"))
        if done is not None:
            return out, done
        cfg = self.method_config(method)
        from ldu_jax.protect.run import make_protector, protect_dir
        if method not in self._protectors:
            ckpt = self.rho_checkpoint(cfg) if method == "ldu" else None
            self._protectors[method] = make_protector(method, cfg, ckpt, self.log)
        if os.path.isdir(out):
            shutil.rmtree(out)  # a partial earlier attempt
        rows = protect_dir(method, cfg, None, clean, out, log=self.log, protector=self._protectors[method])
        bad = [r["file"] for r in rows if r.get("error") or not r.get("budget_ok")]
        if bad:
            raise RuntimeError(f"{method} could not protect {', '.join(bad)} of {clean}")
        stats = imperceptibility(clean, out, self.metrics)
        files.write_json(os.path.join(base, "protect.json"), stats)
        return out, stats

    # -- purification
    def purify(self, src: str, subject: str, method: str, setting: str) -> str:
        from ldu_jax import purify
        s = purify.parse(setting)
        if s.name == "none":
            return src
        out = os.path.join(self.workdir, "cells", subject, method, slug(s), "images")
        if os.path.exists(os.path.join(out, ".done")):
            return out
        if s.name in purify.NEEDS_MODELS and self._purify_models is None:
            self._purify_models = purify.load_models(self.cfg.sd, self.cfg.shortcut or None, self.cfg.seed)
        purify.purify_folder(s, src, out, self._purify_models if s.name in purify.NEEDS_MODELS else None,
                             log=self.log)
        open(os.path.join(out, ".done"), "w").close()
        return out

    # -- attack + measurement
    def attack_config(self, attack: str):
        path = self.cfg.attack_configs.get(attack)
        if not path:
            raise Skip(f"no config for attack {attack!r} (config attack_configs)")
        cfg = load_config_file(path, self.cfg.attack_overrides.get(attack, {}))
        cfg.model = self.cfg.sd
        if "class_images_dir" in cfg and not cfg.class_images_dir:  # one prior set for every cell
            cfg.class_images_dir = os.path.join(self.workdir, "class_images", attack)
        cfg.num_samples = self.cfg.num_samples
        cfg.seed = self.cfg.seed
        return cfg

    def attack(self, images_dirs, cell_dirs, attack: str, group_dir: str) -> list[list[np.ndarray]]:
        """Each folder's generated images, the folders' attacks trained together (``run_many``)."""
        from ldu_jax import attack as attack_lib
        cfg = self.attack_config(attack)
        if self._attacker is None:
            self._attacker = attack_lib.Attacker(self.cfg.sd)
        keep = bool(self.cfg.keep_attack_models)
        outs = self._attacker.run_many(attack, cfg, images_dirs, cell_dirs, group_dir, log=self.log, save_model=keep)
        if not keep:  # DreamBooth's model/ is a full SD copy; the checkpoints hold the attack states
            for d in [os.path.join(c, "checkpoints") for c in cell_dirs] + [group_dir]:
                shutil.rmtree(d, ignore_errors=True)
        return [[img for imgs in out.values() for img in imgs] for out in outs]

    def cell(self, subject: str, method: str, setting: str, attack: str) -> dict:
        return self.cells([subject], method, setting, attack)[0]

    def cells(self, subjects, method: str, setting: str, attack: str) -> list[dict]:
        """The cells of ``subjects`` under one (method, setting, attack): each protected, purified,
        measured and cached on its own; their attacks trained as one program (``Attacker.run_many``).
        A cell's ``time`` splits its seconds into phases, the shared attack's evenly."""
        from ldu_jax import purify
        setting_name = str(purify.parse(setting))
        rows, todo = [], []
        for subject in subjects:
            row = {"subject": subject, "method": method, "setting": setting_name, "attack": attack}
            cell_dir = os.path.join(self.workdir, "cells", subject, method, slug(setting_name), attack)
            cached = files.read_json(os.path.join(cell_dir, "cell.json"))
            if cached is not None:
                rows.append({**cached, "cached": True})
                continue
            rows.append(row)
            if self.cfg.get("cached_only"):
                row.update(status="skipped", reason="not run (cached_only)")
                continue
            t0, clock = time.time(), {}
            try:
                if not os.path.isdir(os.path.join(self.cfg.data, subject, "set_B")):
                    raise Skip(f"{os.path.join(self.cfg.data, subject)} has no set_B")
                prot_dir, stats = self.protect(subject, method)
                row.update(stats)
                clock["protect"] = time.time() - t0
                images_dir = self.purify(prot_dir, subject, method, setting)
                clock["purify"] = time.time() - t0 - clock["protect"]
                todo.append((row, cell_dir, images_dir, time.time() - t0, clock))
            except Exception as e:  # noqa: BLE001 - recorded in the row (see _failed)
                self._failed(row, e)
        if not todo:
            return rows
        t1 = time.time()
        try:
            group = os.path.join(self.workdir, "groups", method, slug(setting_name), attack,
                                 "+".join(slug(r["subject"]) for r, *_ in todo))
            generated = self.attack([t[2] for t in todo], [t[1] for t in todo], attack, group)
        except Exception as e:  # noqa: BLE001
            for row, *_ in todo:
                self._failed(row, e)
            return rows
        share = (time.time() - t1) / len(todo)
        for (row, cell_dir, _, before, clock), gen_images in zip(todo, generated):
            t2 = time.time()
            clock.update({k: v / len(todo) for k, v in self._attacker.timing.items()})
            try:
                gen = generation_metrics(gen_images, self.reference(row["subject"]), self.metrics,
                                         self.other_references(row["subject"]))
            except Exception as e:  # noqa: BLE001
                self._failed(row, e)
                continue
            clock["metrics"] = time.time() - t2
            row["notes"] = "; ".join(n for n in (row.get("notes", ""), gen.pop("notes")) if n)
            row.update(gen)
            row.update(status="done", reason="", seconds=before + share + clock["metrics"], time=clock)
            files.write_json(os.path.join(cell_dir, "cell.json"), row)
        return rows

    def _failed(self, row: dict, e: Exception):
        """A skipped (``Skip``) or failed cell: recorded, logged, and the table goes on."""
        row.update(status="skipped" if isinstance(e, Skip) else "failed",
                   reason=str(e) if isinstance(e, Skip) else f"{type(e).__name__}: {e}")
        self.log(f"{row['subject']} / {row['method']} / {row['setting']} / {row['attack']}: {row['status']}: "
                 f"{row['reason']}")

    def reference(self, subject: str):
        """The subject's clean photos: the identity reference (ISM) and FID(gen)'s reference set."""
        ref = []
        for s in self.cfg.reference_sets:
            folder = os.path.join(self.cfg.data, subject, s)
            if os.path.isdir(folder):
                ref += read_images(folder)[1]
        if not ref:
            raise Skip(f"{subject}: no clean reference photos in {', '.join(self.cfg.reference_sets)}")
        return ref

    def other_references(self, subject: str) -> list:
        """The other subjects' clean photo sets (for ISM(others)) when ``cfg.ism_others`` is on."""
        out = []
        for other in find_subjects(self.cfg.data) if self.cfg.ism_others else ():
            if other != subject:
                try:
                    out.append(self.reference(other))
                except (Skip, data_lib.DataError):   # an incomplete subject is no one's reference
                    pass
        return out


def cells_of(cfg, workdir: str) -> list[tuple]:
    """The evaluation's (subject, method, setting, attack) cells; writes the 'demo:N' and
    'miniworld:N' subjects into ``workdir`` and points ``cfg.data`` at them."""
    os.makedirs(workdir, exist_ok=True)
    kind, _, n = str(cfg.data).partition(":")
    if kind == "demo":
        cfg.data = make_demo_subjects(os.path.join(workdir, "subjects"), int(n), size=cfg.demo_size)
    elif kind == "miniworld":  # the mini-world's held-out identities
        from ldu_jax.miniworld import world
        cfg.data = os.path.join(workdir, "subjects")
        world.write_heldout_subjects(cfg.data, int(n))
    subjects = find_subjects(cfg.data, tuple(cfg.subjects))
    return [(s, m, st, a) for s in subjects for m in cfg.methods for st in cfg.settings for a in cfg.attacks]


def subject_groups(cells, size: int):
    """(subjects, method, setting, attack): the cells of one (method, setting, attack), ``size``
    subjects at a time (their attacks train as one program), in the order the cells come."""
    if size < 1:
        raise ValueError(f"config subject_batch must be >= 1, got {size}")
    by = {}
    for subject, *rest in cells:
        by.setdefault(tuple(rest), []).append(subject)
    for rest, subjects in by.items():
        for i in range(0, len(subjects), size):
            yield (subjects[i:i + size], *rest)


def run(cfg, workdir: str, log=print) -> list[dict]:
    """Every cell of the evaluation; writes results.csv, results.md and plots/ into ``workdir``."""
    from tqdm import tqdm
    cells = cells_of(cfg, workdir)
    runner = Runner(cfg, workdir, log)
    done = {}
    bar = tqdm(total=len(cells), desc="evaluate", unit="cell")
    for subjects, *rest in subject_groups(cells, int(cfg.get("subject_batch", 1))):
        bar.set_postfix_str("/".join(rest)[:60])
        for s, row in zip(subjects, runner.cells(subjects, *rest)):
            done[(s, *rest)] = row
        bar.update(len(subjects))
    bar.close()
    rows = [done[c] for c in cells]
    rows = with_ism_drop(rows)
    write_results(workdir, rows, cfg)
    n_cached = sum(bool(r.get("cached")) for r in rows)
    counts = {k: sum(r["status"] == k for r in rows) for k in ("done", "skipped", "failed")}
    log(f"{len(rows)} cells: {counts['done']} done ({n_cached} from cache), {counts['skipped']} skipped, "
        f"{counts['failed']} failed -> {os.path.join(workdir, 'results.md')}")
    return rows


# ---------------------------------------------------------------------------- results

def _fmt(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def write_csv(path: str, rows):
    with files.atomic_write(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([_fmt(r.get(k)) for k in COLUMNS])


def with_ism_drop(rows) -> list[dict]:
    """``rows`` with ``ism_drop`` = the clean photos' ISM (method and setting 'none') of the same
    subject and attack minus the row's ISM, where both were measured."""
    clean = {(r["subject"], r["attack"]): _num(r, "ism") for r in rows
             if r.get("status") == "done" and r["method"] == "none" and r["setting"] == "none"}
    out = []
    for r in rows:
        ref, ism = clean.get((r["subject"], r["attack"])), _num(r, "ism")
        out.append({**r, "ism_drop": ref - ism} if r.get("status") == "done" and None not in (ref, ism) else r)
    return out


def _num(r, k):
    v = r.get(k)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if not math.isnan(v) else None


def mean_std(values) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    if any(math.isinf(v) for v in vals):
        return "∞"
    m = float(np.mean(vals))
    return f"{m:.3f} ± {float(np.std(vals)):.3f}" if len(vals) > 1 else f"{m:.3f}"


def summarize(rows):
    """{(method, setting, attack): {metric: [values over subjects]}} of the finished cells."""
    groups = {}
    for r in rows:
        if r.get("status") != "done":
            continue
        g = groups.setdefault((r["method"], r["setting"], r["attack"]), {k: [] for k, _, _ in TABLE_METRICS})
        for k, _, _ in TABLE_METRICS:
            g[k].append(_num(r, k))
    return groups


def results_markdown(rows, cfg=None) -> str:
    groups = summarize(rows)
    cols = [(k, label) for k, label, _ in TABLE_METRICS if any(v is not None for g in groups.values() for v in g[k])]
    lines = ["# Evaluation results", "",
             "Mean ± std over subjects. ↑/↓: the direction that means *better protection* "
             "(for PSNR/SSIM/FID(prot): better imperceptibility).", ""]
    lines.append("| method | setting | attack | n | " + " | ".join(label for _, label in cols) + " |")
    lines.append("|" + "---|" * (4 + len(cols)))
    for (m, s, a), g in groups.items():
        n = len(next(iter(g.values())))
        lines.append(f"| {m} | {s} | {a} | {n} | " + " | ".join(mean_std(g[k]) for k, _ in cols) + " |")
    other = [r for r in rows if r.get("status") != "done"]
    if other:
        lines += ["", "Cells not measured:", ""]
        lines += [f"- {r['subject']} / {r['method']} / {r['setting']} / {r['attack']}: {r['status']} — {r['reason']}"
                  for r in other]
    notes = sorted({n for r in rows for n in str(r.get("notes") or "").split("; ") if n})
    if notes:
        lines += ["", "Metric notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_results(workdir: str, rows, cfg=None):
    write_csv(os.path.join(workdir, "results.csv"), rows)
    with files.atomic_write(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
        f.write(results_markdown(rows, cfg))
    write_plots(workdir, rows)
    write_sample_grids(workdir, rows)


def write_plots(workdir: str, rows):
    """plots/<metric>.png: bars per method, grouped by setting, one panel per attack."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = summarize(rows)
    if not groups:
        return
    methods = list(dict.fromkeys(k[0] for k in groups))
    settings = list(dict.fromkeys(k[1] for k in groups))
    attacks = list(dict.fromkeys(k[2] for k in groups))
    os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
    for key, label, _ in TABLE_METRICS:
        if not any(v is not None and math.isfinite(v) for g in groups.values() for v in g[key]):
            continue
        fig, axes = plt.subplots(1, len(attacks), figsize=(4 + 2 * len(methods), 3.2), squeeze=False)
        width = 0.8 / len(settings)
        for ax, a in zip(axes[0], attacks):
            for j, s in enumerate(settings):
                means, stds = [], []
                for m in methods:
                    vals = [v for v in groups.get((m, s, a), {}).get(key, []) if v is not None and math.isfinite(v)]
                    means.append(np.mean(vals) if vals else np.nan)
                    stds.append(np.std(vals) if vals else 0.0)
                ax.bar(np.arange(len(methods)) + j * width, means, width, yerr=stds, label=s)
            ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2, methods, rotation=30)
            ax.set_title(f"{label} — {a}")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        with files.atomic_write(os.path.join(workdir, "plots", f"{key}.png")) as f:
            fig.savefig(f, dpi=80, format="png")
        plt.close(fig)


def write_sample_grids(workdir: str, rows, per_cell: int = 4):
    """plots/samples_<method>.png: for the first subject, one row of generated images per setting x attack."""
    done = [r for r in rows if r.get("status") == "done"]
    if not done:
        return
    subject = done[0]["subject"]
    for method in dict.fromkeys(r["method"] for r in done):
        tiles = []
        for r in done:
            if r["subject"] != subject or r["method"] != method:
                continue
            sample_dir = os.path.join(workdir, "cells", subject, method, slug(r["setting"]), r["attack"], "samples")
            imgs = []
            for root, _, names in sorted(os.walk(sample_dir)):
                imgs += [os.path.join(root, f) for f in sorted(names) if f.endswith(".png")]
            row = [np.asarray(Image.open(p).convert("RGB")) for p in imgs[:per_cell]]
            if row:
                row = _same_size(row)
                tiles += row + [np.full_like(row[0], 255)] * (per_cell - len(row))
        if tiles:
            tiles = _same_size(tiles)
            data_lib.save_image_atomic(os.path.join(workdir, "plots", f"samples_{slug(method)}.png"),
                                       data_lib.make_grid(np.stack(tiles), ncol=per_cell))


def _main(argv):
    from absl import flags
    f = flags.FLAGS
    run(f.config, f.workdir)


if __name__ == "__main__":
    from absl import flags
    from ldu_jax import cli
    flags.DEFINE_string("workdir", None, "evaluation work dir (cells, results.csv, results.md, plots/)",
                        required=True)
    cli.define_config("config", None, "a configs/eval_*.py file")
    cli.run(_main, user_errors=(ValueError,))
