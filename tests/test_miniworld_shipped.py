"""The mini-world models shipped in ldu_jax/miniworld/models load through the normal code paths,
do what they were trained for, and drive the default perturb.py and the mini-world evaluation."""
import json
import math
import os

import numpy as np

from ldu_jax.miniworld import MODELS, world


def test_shipped_models_are_complete_and_small():
    assert sorted(os.listdir(MODELS)) == ["identity", "manifest.json", "rho", "sd", "shortcut"]
    manifest = json.load(open(os.path.join(MODELS, "manifest.json")))
    assert all(manifest[s]["done"] and manifest[s]["profile"] != "test"     # the real recipes, not the tiny ones
               for s in ("data", "identity", "vae", "t2i", "shortcut", "rho"))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(MODELS) for f in fs)
    assert size < 40e6  # "a few tens of MB at most"


def test_identity_model_tells_heldout_identities_apart():
    from ldu_jax.miniworld import identity
    m = identity.measure(identity.load(os.path.join(MODELS, "identity")), n_identities=8, n_tests=4)
    assert m["ism_same"] > m["ism_other"] + 0.5 and m["rank1"] > 0.8 and m["det_acc"] > 0.9


def test_t2i_bundle_generates_world_faces():
    from ldu_jax.miniworld import identity
    from ldu_jax.personalize import common
    from ldu_jax.sd import models as sdm
    sd, params = sdm.load_sd(os.path.join(MODELS, "sd"))
    assert sd.resolution == 64
    prompt = "a photo of a person"
    out = common.generate(sd, params, [prompt], n_per_prompt=4, steps=10, guidance=3.0, seed=0)[prompt]
    assert out.shape == (4, 64, 64, 3) and out.dtype == np.uint8 and out.std() > 10
    detected = identity.load(os.path.join(MODELS, "identity")).detect(out)
    assert detected.mean() >= 0.5  # the world's face detector sees faces in the samples


def test_default_perturb_apply_protects_world_portraits_within_budget(tmp_path):
    from configs import ldu_miniworld
    from ldu_jax.jobs.protect import protect_dir as apply
    from ldu_jax.sources import sample_folder
    src = sample_folder(str(tmp_path), "miniworld")
    before = {f: open(os.path.join(src, f), "rb").read() for f in os.listdir(src)}
    rows = apply("ldu", ldu_miniworld.get_config(), None, src, str(tmp_path / "out"))  # ρ: the shipped one
    assert len(rows) == 4 and all(not r["error"] and r["budget_ok"] for r in rows)
    assert all(float(r["psnr"]) >= 36.0 for r in rows)
    assert all(open(os.path.join(src, f), "rb").read() == b for f, b in before.items())  # inputs untouched


def test_miniworld_evaluation_runs_on_the_shipped_models(tmp_path):
    from configs import eval_miniworld
    from ldu_jax import evaluate
    c = eval_miniworld.get_config()
    c.data = "miniworld:2"
    c.subjects = ("subject_0",)          # subject_1 is only the other person of ISM(others)
    c.methods = ("none", "ldu")
    c.settings = ("none",)
    c.attacks = ("ti",)
    c.attack_overrides = {"ti": {"max_steps": 2, "save_every": 2, "sample_steps": 4}}
    c.num_samples = 2
    rows = evaluate.run(c, str(tmp_path), log=lambda s: None)
    assert [r["status"] for r in rows] == ["done", "done"], [r.get("reason") for r in rows]
    assert sorted(os.listdir(tmp_path / "subjects" / "subject_0")) == ["set_A", "set_B", "set_C", "subject.json"]
    ldu_row = rows[1]
    assert ldu_row["psnr"] >= 36.0 and 0 <= ldu_row["fdfr"] <= 1
    assert all(math.isnan(r["ism_others"]) == math.isnan(r["ism"]) for r in rows)    # nan: no face in the samples
    assert all(-1 <= r["ism_others"] <= 1 and r["ism_others"] != r["ism"] for r in rows if not math.isnan(r["ism"]))
    table = open(tmp_path / "results.md").read()
    assert "FD(id)" in table and "ISM(others)" in table


def test_shipped_tokenizer_has_every_caption_and_attack_word_as_one_token():
    from transformers import CLIPTokenizer
    from ldu_jax.miniworld.train_t2i import ATTACK_PROMPTS, caption_words
    tok = CLIPTokenizer.from_pretrained(os.path.join(MODELS, "sd", "tokenizer"))
    words = caption_words(world.vocabulary() + list(ATTACK_PROMPTS))
    assert words and all(len(tok.tokenize(w)) == 1 for w in words)
