"""From clean photos to the papers' results table: protect -> purify -> personalize -> generate -> measure.

    python -m ldu_jax.cli.evaluate --config=configs/eval_tiny.py --workdir=runs/eval

Subjects follow the Anti-DreamBooth layout ``<root>/<subject>/{set_A,set_B,set_C}``: set_B is
protected and given to the attack; the person's clean photos (``reference_sets``) are the identity
reference. For every subject x method x setting x attack the runner protects set_B (once per
subject and method), purifies it, runs Textual Inversion or DreamBooth on it, generates images and
measures them. A method entry 'name@variant' (e.g. 'advdm@published') is that method with the
variant's ``method_overrides`` over the method's, in cells of its own. Work dir::

    cells/<subject>/<method>/protected/          protected set_B (+ report.csv, protect.json)
    cells/<subject>/<method>/<setting>/images/   purified images given to the attack
    cells/<subject>/<method>/<setting>/<attack>/ the attack's run, samples/ and cell.json
    results.csv  results.md  plots/*.png

A finished cell (its cell.json) is served from cache on a rerun; a cell that failed or was skipped
is retried. protect.json and cell.json record the recipe they were made with (the method's and the
attack's resolved configs, the setting and the evaluation keys in ``CELL_KEYS``): a rerun whose
recipe for a cached cell differs stops with an error naming the cell and the keys, rather than
serving results of another config; an entry from before recipes were recorded cannot be checked
and stops a run too. ``cached_only=True`` tabulates the cached cells of the grid (those too) and
runs nothing (a grid run in parts). ISM drop: the clean photos' ISM (method and setting none, same
subject and attack) minus the cell's. Bad input (a subject without set_B, a missing metric model,
photos without faces) marks that cell or metric skipped with its reason and the rest goes on.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time

import jax
import numpy as np
from tqdm import tqdm

from ldu_jax import config_file, files, parallel, purify, sources
from ldu_jax import data as data_lib
from ldu_jax.errors import ConfigError
from ldu_jax.evaluate.measure import Metrics, Skip, generation_metrics, imperceptibility
from ldu_jax.evaluate.report import slug, with_ism_drop, write_results
from ldu_jax.evaluate.subjects import find_subjects, read_images
from ldu_jax.jobs import attack as attack_lib
from ldu_jax.jobs import protect as protect_job


# the evaluation's keys a cell's result depends on, besides its method's and attack's configs
CELL_KEYS = ("seed", "data", "sd", "shortcut", "reference_sets", "num_samples", "face_backend", "fid_weights",
             "clip_iqa")


def _plain(obj):
    """``obj`` as JSON reads it back (tuples as lists, keys sorted): recipes compare equal when they are."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _diff(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


METHOD_NAME = re.compile(r"[A-Za-z0-9._=-]+(@[A-Za-z0-9._=-]+)?")


def base_method(name: str) -> str:
    """The protection a ``methods`` entry runs: 'advdm@published' is AdvDM with the overrides of
    ``method_overrides['advdm@published']`` over those of 'advdm' (a variant: one method at another
    budget, in its own cells)."""
    return name.split("@", 1)[0]


class StaleCacheError(ConfigError):
    """A cached protection or cell made with another config: stops the evaluation (not one cell)."""


def check_recipe(path: str, cached: dict, recipe: dict, unrecorded_ok: bool = False):
    """Raise StaleCacheError if the cache entry ``path`` (its JSON ``cached``) was made with another
    recipe, or records none (written before recipes were) unless ``unrecorded_ok``."""
    if "recipe" not in cached:
        if unrecorded_ok:
            return
        raise StaleCacheError(f"{path} records no recipe (written before the evaluation recorded them), so "
                              f"its config cannot be checked: tabulate it with cached_only=True, or evaluate "
                              f"into a new work dir")
    diff = _diff(cached["recipe"], _plain(recipe))
    if diff:
        raise StaleCacheError(f"{path} was made with another config ({'; '.join(diff[:4])}"
                              f"{'; ...' if len(diff) > 4 else ''}): evaluate into a new work dir, or delete "
                              f"the cached cell to recompute it")


class Runner:
    """Runs and caches the cells of one evaluation config in one work dir; the models each cell
    needs are loaded (and their programs compiled) once."""

    def __init__(self, cfg, workdir: str, log=print):
        self.cfg, self.workdir, self.log = cfg, workdir, log
        self.metrics = Metrics(cfg, log)
        self._purify_models = None
        self._protectors = {}   # method -> (protect_batch, resolution): models loaded, programs compiled once
        self._attacker = None

    # -- protection
    def method_config(self, method: str):
        base = base_method(method)
        path = self.cfg.method_configs.get(method) or self.cfg.method_configs.get(base)
        if not path:
            raise Skip(f"no config for method {base!r} (config method_configs)")
        overrides = {**self.cfg.method_overrides.get(base, {}), **self.cfg.method_overrides.get(method, {})}
        cfg = config_file.load(path, overrides)
        if "sd" in cfg:
            cfg.sd = self.cfg.sd
        if "shortcut" in cfg and base.startswith("ldu"):
            cfg.shortcut = self.cfg.shortcut
        if "rho_checkpoint" in cfg:   # the evaluation's ρ (ldu-opt has none), not the method config's path
            cfg.rho_checkpoint = self.cfg.rho_checkpoint if base == "ldu" else ""
        return cfg

    def rho_checkpoint(self, cfg) -> str:
        if self.cfg.rho_checkpoint:
            return self.cfg.rho_checkpoint
        workdir = os.path.join(self.workdir, "rho")
        if self.cfg.rho_dataset:
            cfg.dataset = self.cfg.rho_dataset
        self.log(f"training ρ for the evaluation in {workdir} (resumes; set rho_checkpoint to reuse one)")
        protect_job.train_rho(cfg, workdir, log=self.log)
        return workdir

    def protect(self, subject: str, method: str) -> tuple[str, dict]:
        """(folder of the images given to the attack before purification, imperceptibility)."""
        clean = os.path.join(self.cfg.data, subject, "set_B")
        if method == "none":
            return clean, {"n_protected": len(read_images(clean)[0]), "psnr": math.inf, "ssim": 1.0, "linf": 0.0}
        base = os.path.join(self.workdir, "cells", subject, method)
        out = os.path.join(base, "protected")
        recipe = self.protect_recipe(method)
        done = files.read_json(os.path.join(base, "protect.json"))
        if done is not None:
            check_recipe(os.path.join(base, "protect.json"), done, recipe)
            return out, {k: v for k, v in done.items() if k != "recipe"}
        cfg = self.method_config(method)
        if method not in self._protectors:
            ckpt = self.rho_checkpoint(cfg) if base_method(method) == "ldu" else None
            self._protectors[method] = protect_job.make_protector(base_method(method), cfg, ckpt, self.log)
        # a partial earlier attempt: removed by process 0 before any host writes (a barrier either way)
        parallel.process0_first(lambda: shutil.rmtree(out, ignore_errors=True), "evaluate: partial protection removed",
                                others=False)
        t0 = time.time()
        rows = protect_job.protect_dir(base_method(method), cfg, None, clean, out, log=self.log,
                                       protector=self._protectors[method])
        seconds = time.time() - t0   # the method's first folder in this process includes compiling
        bad = [r["file"] for r in rows if r.get("error") or not r.get("budget_ok")]
        if bad:
            raise RuntimeError(f"{method} could not protect {', '.join(bad)} of {clean}")

        def measure():   # across hosts: process 0 measures and writes; every host returns its numbers
            stats = {**imperceptibility(clean, out, self.metrics), "protect_s_per_image": seconds / max(len(rows), 1)}
            files.write_json(os.path.join(base, "protect.json"), {**stats, "recipe": _plain(recipe)})
            return stats
        stats = parallel.process0_first(measure, "evaluate: protection measured", others=False)
        return out, parallel.share(stats, "evaluate: protection numbers")

    def protect_recipe(self, method: str) -> dict:
        if method == "none":
            return {"method": method}
        # the protection and its config (a variant's name is only the cells' label)
        return {"method": base_method(method), "config": self.method_config(method).to_dict(),
                **({"rho_checkpoint": self.cfg.rho_checkpoint} if base_method(method) == "ldu" else {})}

    def cell_recipe(self, method: str, setting: str, attack: str) -> dict:
        return {"protect": self.protect_recipe(method), "setting": setting,
                "attack": {"name": attack, "config": self.attack_config(attack).to_dict()},
                **{k: self.cfg.get(k) for k in CELL_KEYS}}

    # -- purification
    def purify(self, src: str, subject: str, method: str, setting: str) -> str:
        s = purify.parse(setting)
        if s.name == "none":
            return src
        out = os.path.join(self.workdir, "cells", subject, method, slug(s), "images")
        if os.path.exists(os.path.join(out, ".done")):
            return out

        def purify_folder():   # across hosts: process 0 alone (not split)
            if s.name in purify.NEEDS_MODELS and self._purify_models is None:
                self._purify_models = sources.diffusion_models(self.cfg.sd, self.cfg.shortcut or None, self.cfg.seed)
            purify.purify_folder(s, src, out, self._purify_models if s.name in purify.NEEDS_MODELS else None,
                                 log=self.log)
            open(os.path.join(out, ".done"), "w").close()
        parallel.process0_first(purify_folder, "evaluate: purified", others=False)
        return out

    # -- attack + measurement
    def attack_config(self, attack: str):
        path = self.cfg.attack_configs.get(attack)
        if not path:
            raise Skip(f"no config for attack {attack!r} (config attack_configs)")
        cfg = config_file.load(path, self.cfg.attack_overrides.get(attack, {}))
        cfg.model = self.cfg.sd
        if "class_images_dir" in cfg and not cfg.class_images_dir:  # one prior set for every cell
            cfg.class_images_dir = os.path.join(self.workdir, "class_images", attack)
        cfg.num_samples = self.cfg.num_samples
        cfg.seed = self.cfg.seed
        return cfg

    def attack(self, images_dirs, cell_dirs, attack: str, group_dir: str) -> list[list[np.ndarray]]:
        """Each folder's generated images, the folders' attacks trained together (``run_many``)."""
        cfg = self.attack_config(attack)
        if self._attacker is None:
            self._attacker = attack_lib.Attacker(self.cfg.sd)
        keep = bool(self.cfg.keep_attack_models)
        outs = self._attacker.run_many(attack, cfg, images_dirs, cell_dirs, group_dir, log=self.log, save_model=keep)
        # DreamBooth's model/ is a full SD copy; the checkpoints hold the attack states (process 0 deletes)
        if not keep and jax.process_index() == 0:
            for d in [os.path.join(c, "checkpoints") for c in cell_dirs] + [group_dir]:
                shutil.rmtree(d, ignore_errors=True)
        return [[img for imgs in out.values() for img in imgs] for out in outs]

    def cell(self, subject: str, method: str, setting: str, attack: str) -> dict:
        return self.cells([subject], method, setting, attack)[0]

    def cells(self, subjects, method: str, setting: str, attack: str) -> list[dict]:
        """The cells of ``subjects`` under one (method, setting, attack): each protected, purified,
        measured and cached on its own; their attacks trained as one program (``Attacker.run_many``).
        A cell's ``time`` splits its seconds into phases, the shared attack's evenly."""
        setting_name = str(purify.parse(setting))
        try:
            recipe = self.cell_recipe(method, setting_name, attack)
        except Exception:  # noqa: BLE001 - a missing or bad config: each cell below records it
            recipe = None
        rows, todo = [], []
        for subject in subjects:
            row = {"subject": subject, "method": method, "setting": setting_name, "attack": attack}
            cell_dir = os.path.join(self.workdir, "cells", subject, method, slug(setting_name), attack)
            cached = files.read_json(os.path.join(cell_dir, "cell.json"))
            if cached is not None:
                if recipe is not None:
                    check_recipe(os.path.join(cell_dir, "cell.json"), cached, recipe,
                                 unrecorded_ok=bool(self.cfg.get("cached_only")))
                # the cell's place names it (a cell.json copied from another work dir may say otherwise)
                rows.append({k: v for k, v in cached.items() if k != "recipe"} | row | {"cached": True})
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
            except StaleCacheError:
                raise
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

        def measure():   # across hosts: process 0 holds the samples, measures and writes
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
                files.write_json(os.path.join(cell_dir, "cell.json"),
                                 {**row, "recipe": _plain(recipe)})
            return rows
        parallel.process0_first(measure, "evaluate: cells measured", others=False)
        return parallel.share(rows, "evaluate: cell rows")   # every host: process 0's rows

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
    """The evaluation's (subject, method, setting, attack) cells; writes generated subjects
    ('demo:N', 'miniworld:N': ``sources.subjects``) into ``workdir`` and points ``cfg.data`` at them."""
    bad = [m for m in cfg.methods if not METHOD_NAME.fullmatch(m)]
    if bad:
        raise ConfigError(f"config methods: {', '.join(map(repr, bad))} is not a method name (letters, digits, "
                          f"'._=-', and an optional '@variant')")
    os.makedirs(workdir, exist_ok=True)
    spec = cfg.data   # generated subjects: written by process 0, found by the others
    cfg.data = parallel.share(parallel.process0_first(lambda: sources.subjects(spec, workdir, cfg.demo_size),
                                                      "evaluate: subjects", others=False), "evaluate: subjects root")
    subjects = find_subjects(cfg.data, tuple(cfg.subjects))
    return [(s, m, st, a) for s in subjects for m in cfg.methods for st in cfg.settings for a in cfg.attacks]


def subject_groups(cells, size: int):
    """(subjects, method, setting, attack): the cells of one (method, setting, attack), ``size``
    subjects at a time (their attacks train as one program), in the order the cells come."""
    if size < 1:
        raise ConfigError(f"config subject_batch must be >= 1, got {size}")
    by = {}
    for subject, *rest in cells:
        by.setdefault(tuple(rest), []).append(subject)
    for rest, subjects in by.items():
        for i in range(0, len(subjects), size):
            yield (subjects[i:i + size], *rest)


def run(cfg, workdir: str, log=print) -> list[dict]:
    """Every cell of the evaluation; writes results.csv, results.md and plots/ into ``workdir``."""
    cells = cells_of(cfg, workdir)
    runner = Runner(cfg, workdir, log)
    done = {}
    bar = tqdm(total=len(cells), desc="evaluate", unit="cell", disable=jax.process_index() != 0)
    for subjects, *rest in subject_groups(cells, int(cfg.get("subject_batch", 1))):
        bar.set_postfix_str("/".join(rest)[:60])
        for s, row in zip(subjects, runner.cells(subjects, *rest)):
            done[(s, *rest)] = row
        bar.update(len(subjects))
    bar.close()
    rows = [done[c] for c in cells]
    rows = with_ism_drop(rows)
    if jax.process_index() == 0:
        write_results(workdir, rows, cfg)
    n_cached = sum(bool(r.get("cached")) for r in rows)
    counts = {k: sum(r["status"] == k for r in rows) for k in ("done", "skipped", "failed")}
    log(f"{len(rows)} cells: {counts['done']} done ({n_cached} from cache), {counts['skipped']} skipped, "
        f"{counts['failed']} failed -> {os.path.join(workdir, 'results.md')}")
    return rows
