"""The evaluation runner: tiny end-to-end run, cache on rerun, skipped cells, the results table."""
import csv
import json
import math
import os
import shutil

import pytest

from ldu_jax import config_file, evaluate, sources
from ldu_jax.evaluate import report, runner, subjects


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
    from configs import eval_tiny
    from ldu_jax.metrics import fid
    tmp = tmp_path_factory.mktemp("eval")
    weights = str(tmp / "inception.safetensors")
    fid.save_weights(weights, fid.init_random(0))
    root = sources.make_demo_subjects(str(tmp / "subjects"), 1)
    os.makedirs(os.path.join(root, "no_set_b", "set_A"))  # bad input: a subject without set_B
    c = eval_tiny.get_config()
    c.data = root
    c.methods = ("none", "ldu")
    c.method_overrides = {"ldu": {"max_steps": 2, "save_every": 2}}
    c.settings = ("none", "jpeg:quality=75")
    c.attacks = ("ti",)
    c.attack_overrides = {"ti": {"max_steps": 3, "save_every": 3}}
    c.num_samples = 2
    c.fid_weights = weights
    workdir = str(tmp / "work")
    logs = []
    rows = evaluate.run(c, workdir, log=logs.append)
    return c, workdir, rows, logs


def test_tiny_evaluation_runs_end_to_end(tiny_eval):
    c, workdir, rows, logs = tiny_eval
    assert len(rows) == 2 * 2 * 2  # subjects x methods x settings x attacks
    done = [r for r in rows if r["status"] == "done"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert len(done) == 4 and all(r["subject"] == "subject_0" for r in done)
    assert len(skipped) == 4 and all("has no set_B" in r["reason"] for r in skipped)
    ldu = [r for r in done if r["method"] == "ldu"]
    assert all(35.5 < r["psnr"] < 60 and r["linf"] > 0 for r in ldu)  # the LDU config's 36 dB budget
    assert all(r["fid_protected"] >= 0 for r in ldu) and all(r["fid_generated"] >= 0 for r in done)
    assert all(r["n_generated"] == 2 * len(c_prompts(c)) and 0 <= r["brisque"] for r in done)
    # the procedural cartoons carry no real face: the face metrics say why they are missing
    assert all("face" in r["notes"] for r in done)
    with open(os.path.join(workdir, "results.csv")) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and {t["status"] for t in table} == {"done", "skipped"}
    md = open(os.path.join(workdir, "results.md")).read()
    assert "| ldu | jpeg:quality=75 | ti | 1 |" in md and "no_set_b" in md
    for name in ("brisque.png", "psnr.png", "samples_ldu.png", "samples_none.png"):
        assert os.path.getsize(os.path.join(workdir, "plots", name)) > 1000
    assert os.path.isdir(os.path.join(workdir, "cells", "subject_0", "ldu", "jpeg_quality=75", "images"))


def c_prompts(c):
    return config_file.load(c.attack_configs["ti"]).validation_prompts


def test_rerun_is_served_from_cache(tiny_eval):
    c, workdir, rows, _ = tiny_eval
    cell = os.path.join(workdir, "cells", "subject_0", "ldu", "none", "ti", "cell.json")
    before = os.stat(cell).st_mtime_ns
    logs = []
    again = evaluate.run(c, workdir, log=logs.append)
    assert [r.get("cached", False) for r in again if r["status"] == "done"] == [True] * 4
    assert not any("textual inversion" in line or "ρ" in line for line in logs)
    assert os.stat(cell).st_mtime_ns == before
    key = lambda r: (r["subject"], r["method"], r["setting"], r["attack"])  # noqa: E731
    assert {key(r): r.get("ism") for r in again} == {key(r): r.get("ism") for r in rows}


def test_a_cell_cached_with_another_config_stops_the_rerun(tiny_eval, tmp_path):
    c, workdir, rows, _ = tiny_eval
    cell = os.path.join(workdir, "cells", "subject_0", "none", "none", "ti", "cell.json")
    with open(cell) as f:
        assert json.load(f)["recipe"]["attack"]["config"]["max_steps"] == 3
    other = c.copy_and_resolve_references()
    other.attack_overrides = {"ti": {"max_steps": 4, "save_every": 3}}
    with pytest.raises(runner.StaleCacheError, match=r"none/none/ti/cell.json .*max_steps: 3 -> 4"):
        evaluate.run(other, workdir, log=lambda *_: None)
    # a protection cached with another config is refused too, when a cell needs it again
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    os.remove(copy / "cells" / "subject_0" / "ldu" / "none" / "ti" / "cell.json")
    other = c.copy_and_resolve_references()
    other.method_overrides = {**c.method_overrides, "ldu": {"max_steps": 2, "save_every": 2, "eps": 1e-3}}
    other.methods, other.settings = ("ldu",), ("none",)
    with pytest.raises(runner.StaleCacheError, match=r"ldu/protect.json .*eps"):
        evaluate.run(other, str(copy), log=lambda *_: None)
    # a work dir from before recipes were recorded: its cells cannot be checked, so a run stops on
    # them, and cached_only tabulates them
    legacy = tmp_path / "legacy"
    shutil.copytree(workdir, legacy)
    for path in legacy.rglob("*.json"):
        if path.name in ("cell.json", "protect.json"):
            entry = json.loads(path.read_text())
            entry.pop("recipe")
            path.write_text(json.dumps(entry))
    with pytest.raises(runner.StaleCacheError, match=r"none/none/ti/cell.json records no recipe"):
        evaluate.run(c, str(legacy), log=lambda *_: None)
    other = c.copy_and_resolve_references()
    other.cached_only = True
    again = evaluate.run(other, str(legacy), log=lambda *_: None)
    assert sum(r["status"] == "done" for r in again) == 4


def test_a_cached_cell_is_named_by_its_place(tiny_eval, tmp_path):
    """A cell.json copied from another work dir (there another method's) is served as the cell
    whose place it holds."""
    c, workdir, _, _ = tiny_eval
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    cell = copy / "cells" / "subject_0" / "ldu" / "none" / "ti" / "cell.json"
    entry = json.loads(cell.read_text())
    cell.write_text(json.dumps({**entry, "method": "ldu@elsewhere", "subject": "subject_9"}))
    again = evaluate.run(c, str(copy), log=lambda *_: None)
    served = [r for r in again if r["method"] == "ldu" and r["setting"] == "none" and r["status"] == "done"]
    assert [r["subject"] for r in served] == ["subject_0"] and served[0]["cached"]
    assert not any(r["method"] == "ldu@elsewhere" for r in again)


def test_cached_only_tabulates_the_cache_and_runs_nothing(tiny_eval):
    c, workdir, rows, _ = tiny_eval
    c = c.copy_and_resolve_references()
    c.methods, c.cached_only = ("none", "ldu", "advdm"), True   # advdm never ran in this work dir
    logs = []
    again = evaluate.run(c, workdir, log=logs.append)
    advdm = [r for r in again if r["method"] == "advdm"]
    assert advdm and all(r["status"] == "skipped" and "cached_only" in r["reason"] for r in advdm)
    assert not os.path.exists(os.path.join(workdir, "cells", "subject_0", "advdm"))
    assert sum(r["status"] == "done" for r in again) == 4 and not any("advdm" in line for line in logs[:-1])


def test_a_method_variant_protects_with_its_method_at_its_own_budget(tiny_eval, tmp_path):
    c, workdir, _, _ = tiny_eval
    c = c.copy_and_resolve_references()
    c.methods = ("photoguard", "photoguard@wide")
    c.method_overrides = {"photoguard": {"eps": 2 / 255, "step_size": 1 / 255},
                          "photoguard@wide": {"eps": 8 / 255}}   # over the method's: step_size stays 1/255
    r = runner.Runner(c, str(tmp_path))
    cfg = r.method_config("photoguard@wide")
    assert (cfg.eps, cfg.step_size) == (8 / 255, 1 / 255)
    stats = {m: r.protect("subject_0", m)[1] for m in c.methods}
    assert stats["photoguard"]["linf"] <= 2 / 255 + 1e-6 < stats["photoguard@wide"]["linf"] <= 8 / 255 + 1e-6
    assert all(s["protect_s_per_image"] > 0 for s in stats.values())
    assert r.protect("subject_0", "photoguard")[1] == stats["photoguard"]   # from protect.json, as measured
    assert os.path.isfile(tmp_path / "cells" / "subject_0" / "photoguard@wide" / "protect.json")
    c.methods = ("photoguard@", "photo guard")
    with pytest.raises(ValueError, match=r"config methods: 'photoguard@', 'photo guard' is not a method name"):
        runner.cells_of(c, str(tmp_path))


def test_results_table_is_mean_and_std_over_subjects():
    rows = [{"subject": s, "method": "ldu", "setting": "none", "attack": "ti", "status": "done",
             "ism": v, "psnr": 36.0} for s, v in (("a", 0.2), ("b", 0.4))]
    rows.append({"subject": "c", "method": "ldu", "setting": "none", "attack": "ti", "status": "failed",
                 "reason": "RuntimeError: boom"})
    md = report.results_markdown(rows)
    assert "| ldu | none | ti | 2 | 36.000 ± 0.000 | 0.300 ± 0.141 |" in md   # the sample std (n - 1)
    assert "c / ldu / none / ti: failed — RuntimeError: boom" in md


def test_ism_drop_is_clean_minus_cell_per_subject_and_attack():
    row = lambda s, m, st, a, ism, others=None: {"subject": s, "method": m, "setting": st,  # noqa: E731
                                                 "attack": a, "status": "done", "ism": ism, "ism_others": others}
    rows = [row("a", "none", "none", "ti", 0.5, 0.1), row("b", "none", "none", "ti", 0.7, 0.1),
            row("a", "ldu", "none", "ti", 0.3), row("b", "ldu", "none", "ti", 0.6),
            row("a", "ldu", "jpeg:quality=75", "ti", 0.45), row("a", "ldu", "none", "dreambooth", 0.2),
            {**row("b", "ldu", "jpeg:quality=75", "ti", None), "status": "failed", "reason": "boom"},
            row("a", "none", "jpeg:quality=75", "ti", 0.48)]
    out = report.with_ism_drop(rows)
    drops = [r.get("ism_drop") for r in out]
    assert drops[:5] == pytest.approx([0.0, 0.0, 0.2, 0.1, 0.05]) and drops[5:7] == [None, None]
    assert "ism_drop" not in rows[2]   # the input rows are not modified
    # against the clean photos given the same purification; only purified rows have one
    assert out[4]["ism_drop_purified"] == pytest.approx(0.03) and "ism_drop_purified" not in out[2]
    assert [r.get("clean_gap") for r in out[:5]] == pytest.approx([0.4, 0.6, 0.4, 0.6, 0.4])
    md = report.results_markdown(out)
    # the cut: mean drop 0.15 over mean clean gap 0.5 of the same subjects
    assert "ISM drop↑ | cut↑ |" in md and "| ldu | none | ti | 2 | 0.450 ± 0.212 | – | 0.150 ± 0.071 | 0.30 |" in md


def test_results_table_shows_the_median_protection_seconds_per_image():
    rows = [{"subject": s, "method": "aspl", "setting": "none", "attack": "ti", "status": "done", "ism": 0.3,
             "protect_s_per_image": t} for s, t in (("a", 30.0), ("b", 1.5), ("c", 1.3))]   # a: compiling
    md = report.results_markdown(rows)
    assert "s / image |" in md and md.rstrip().endswith("| aspl | none | ti | 3 | 0.300 ± 0.000 | 1.5 |")



def test_ism_drop_against_psnr_plots_each_protection_group(tmp_path):
    row = lambda s, m, st, ism, psnr: {"subject": s, "method": m, "setting": st, "attack": "dreambooth",  # noqa: E731
                                       "status": "done", "ism": ism, "psnr": psnr}
    rows = report.with_ism_drop([
        row("a", "none", "none", 0.5, float("inf")), row("b", "none", "none", 0.7, float("inf")),
        row("a", "advdm", "none", 0.3, 36.0), row("b", "advdm", "none", 0.6, 37.0),
        row("a", "advdm", "jpeg:quality=75", 0.45, 36.0), row("a", "ldu", "none", 0.5, None)])
    points = report.tradeoff_points(report.summarize(rows))
    # the clean photos (PSNR inf) and a group without PSNR are no protection point
    assert [p[:3] for p in points] == [("advdm", "none", "dreambooth"), ("advdm", "jpeg:quality=75", "dreambooth")]
    assert points[0][3:] == pytest.approx((36.5, 0.15, 0.05 * 2 ** 0.5))   # the sample std (n - 1)
    assert points[1][3:] == pytest.approx((36.0, 0.05, 0.0))
    report.write_plots(str(tmp_path), rows)
    assert os.path.getsize(tmp_path / "plots" / "ism_drop_vs_psnr.png") > 1000
    report.write_plots(str(tmp_path / "clean_only"), rows[:2])
    assert not os.path.exists(tmp_path / "clean_only" / "plots" / "ism_drop_vs_psnr.png")


def test_ism_drop_against_psnr_gives_a_method_and_its_budgets_one_colour():
    """12 methods, beyond one 10-colour cycle: each base method its own colour, its variant (at the
    published budget) the same colour hollow, and a line through the base's budgets per setting."""
    bases = ["ldu", "ldu-opt", "advdm", "aspl", "fsmg", "photoguard", "mist", "sds", "pid", "metacloak", "a", "b"]
    points = [(m, "none", "ti", 36.0 + i / 10, 0.01 * i, 0.0) for i, m in enumerate(bases)]
    points += [("advdm@published", "none", "ti", 31.4, 0.2, 0.1), ("advdm@published", "jpeg:quality=75", "ti",
                                                                      31.4, 0.05, 0.0)]
    styles = report.tradeoff_styles(points)
    assert len({styles[m][0] for m in bases}) == len(bases)
    assert styles["advdm@published"] == (styles["advdm"][0], False) and styles["advdm"][1]
    curves = report.tradeoff_curves(points)
    assert curves == {("advdm", "none", "ti"): [(31.4, 0.2), (36.2, 0.02)]}

def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="no config key 'max_stepz'"):
        config_file.load("configs/attack_ti_tiny.py", {"max_stepz": 1})
    with pytest.raises(FileNotFoundError, match="nowhere.py"):
        config_file.load(str(tmp_path / "nowhere.py"))
    with pytest.raises(FileNotFoundError, match="no subject folders"):
        subjects.find_subjects(str(tmp_path))


@pytest.mark.parametrize("name", ["eval_tiny", "eval_celebahq_sd21", "eval_vggface2_sd21", "eval_miniworld",
                                  "eval_miniworld_fragile"])
def test_eval_configs_reference_loadable_configs(name):
    import importlib
    c = importlib.import_module(f"configs.{name}").get_config()
    assert {runner.base_method(m) for m in c.methods} - {"none"} <= set(c.method_configs)
    assert set(c.attacks) <= set(c.attack_configs)
    r = runner.Runner(c, "unused")
    for m in (set(c.method_configs) | set(c.methods) | set(c.method_overrides)) - {"none"}:
        cfg = r.method_config(m)
        assert "eps" in cfg and "sd" in cfg
        if "rho_checkpoint" in cfg:   # a cell's recipe names the ρ the evaluation uses, and only where one is
            assert cfg.rho_checkpoint == (c.rho_checkpoint if runner.base_method(m) == "ldu" else "")
        if "@" in m:   # a variant: its own budget over its method's overrides
            assert cfg.eps == c.method_overrides[m]["eps"] != r.method_config(runner.base_method(m)).eps
    for a in c.attacks:
        assert "model" in config_file.load(c.attack_configs[a], c.attack_overrides.get(a, {}))
    from ldu_jax import purify
    [purify.parse(s) for s in c.settings]


def test_ldu_budget_variants_sit_at_their_psnr():
    from configs import eval_miniworld
    assert eval_miniworld.mse_budget(10 * math.log10(4 / (8 / 255) ** 2)) == pytest.approx((8 / 255) ** 2)
    for db in eval_miniworld.LDU_OPT_PSNRS:   # PSNR on [0, 1] of the MSE budget on [-1, 1]
        eps = eval_miniworld.get_config().method_overrides[f"ldu-opt@{db}dB"]["eps"]
        assert 10 * math.log10(4 / eps) == pytest.approx(db)


def test_cli_reports_bad_input_in_one_line(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = lambda *a: subprocess.run([sys.executable, "-m", "ldu_jax.cli.evaluate", "--config=configs/eval_tiny.py",  # noqa: E731
                                     f"--workdir={tmp_path}/w", *a], cwd=root, capture_output=True, text=True)
    r = run("--config.methodz=none")
    assert r.returncode != 0 and "methodz" in r.stderr and "Traceback" not in r.stderr
    r = run(f"--config.data={tmp_path}/nowhere")
    assert r.returncode != 0 and f"{tmp_path}/nowhere does not exist" in r.stderr and "Traceback" not in r.stderr


def test_commands_keep_compiled_programs_in_a_persistent_cache(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = ("import jax, jax.numpy as jnp\n"
              "from ldu_jax import cli\n"
              "hits = []\n"
              "jax.monitoring.register_event_listener(lambda e, **k: hits.append(e.endswith('cache_hits')))\n"
              "path = cli.enable_compilation_cache()\n"
              "jax.jit(lambda x: jnp.tanh(x @ x).sum())(jnp.ones((64, 64))).block_until_ready()\n"
              "print(sum(hits), path)\n")

    def run(cache):
        env = {**os.environ, "LDU_JAX_COMPILE_CACHE": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        r = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        hits, _, path = r.stdout.strip().splitlines()[-1].partition(" ")
        return int(hits), path

    cache = str(tmp_path / "xla")
    assert run(cache) == (0, cache) and os.listdir(cache)      # programs written ...
    assert run(cache)[0] >= 1                                    # ... and loaded by the next run
    assert run("") == (0, "")                                    # '' turns it off


def test_subject_groups_split_by_cell_kind_and_size():
    cells = [(s, m, "none", "ti") for s in ("a", "b", "c") for m in ("none", "ldu")]
    assert list(evaluate.subject_groups(cells, 2)) == [(["a", "b"], "none", "none", "ti"),
                                                      (["c"], "none", "none", "ti"),
                                                      (["a", "b"], "ldu", "none", "ti"), (["c"], "ldu", "none", "ti")]
    assert [g[0] for g in evaluate.subject_groups(cells, 1)] == [["a"], ["b"], ["c"]] * 2
    with pytest.raises(ValueError, match="subject_batch"):
        list(evaluate.subject_groups(cells, 0))


def test_subjects_attacked_together_match_one_at_a_time(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from configs import eval_tiny
    from ldu_jax.jobs import attack
    batched = []
    real = attack.Attacker.train_many
    monkeypatch.setattr(attack.Attacker, "train_many", lambda self, kind, cfg, dirs, *a, **k:
                        batched.append(len(dirs)) or real(self, kind, cfg, dirs, *a, **k))
    c = eval_tiny.get_config()
    c.data = sources.make_demo_subjects(str(tmp_path / "subjects"), 2)
    c.methods, c.settings, c.attacks = ("none",), ("none",), ("ti",)
    c.attack_overrides = {"ti": {"max_steps": 3, "save_every": 3}}
    c.num_samples = 2
    rows = {}
    for size in (1, 2):
        c.subject_batch = size
        rows[size] = evaluate.run(c, str(tmp_path / f"w{size}"), log=lambda s: None)
        assert [r["status"] for r in rows[size]] == ["done", "done"]
    assert batched == [2]                       # subject_batch 2: one program for both subjects
    assert not os.path.exists(tmp_path / "w2" / "groups" / "none" / "none" / "ti" / "subject_0+subject_1")
    for subject in ("subject_0", "subject_1"):
        samples = [os.path.join(tmp_path, f"w{size}", "cells", subject, "none", "none", "ti", "samples")
                   for size in (1, 2)]
        files = sorted(os.path.join(d, f) for d in os.listdir(samples[0])
                       for f in os.listdir(os.path.join(samples[0], d)))
        assert len(files) == 2 * len(c_prompts(c))
        for f in files:
            a, b = (np.asarray(Image.open(os.path.join(s, f)), int) for s in samples)
            np.testing.assert_allclose(a, b, atol=2)
    assert rows[1][0]["brisque"] == pytest.approx(rows[2][0]["brisque"], abs=0.5)
    assert set(rows[2][0]["time"]) >= {"protect", "purify", "load", "train", "generate", "metrics"}
