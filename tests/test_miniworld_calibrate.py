"""The calibration's measurements: each statistic on inputs whose answer is known."""
import math

import numpy as np
import pytest

from ldu_jax.evaluate import calibrate


def test_fine_rms_is_zero_on_flat_images_and_grows_with_texture():
    flat = np.full((2, 32, 32, 3), 128, np.uint8)
    assert calibrate.fine_rms(flat) == pytest.approx([0.0, 0.0], abs=1e-12)
    rng = np.random.default_rng(0)
    weak = np.clip(128 + rng.normal(0, 2, (2, 32, 32, 3)), 0, 255).astype(np.uint8)
    strong = np.clip(128 + rng.normal(0, 20, (2, 32, 32, 3)), 0, 255).astype(np.uint8)
    w, s = calibrate.fine_rms(weak), calibrate.fine_rms(strong)
    assert np.all(s > 5 * w) and np.all(w > 0)
    # a smooth ramp has almost no fine structure
    ramp = np.broadcast_to(np.linspace(0, 255, 32)[None, None, :, None], (1, 32, 32, 3)).astype(np.uint8)
    assert calibrate.fine_rms(ramp)[0] < 0.01


def test_imprint_fraction_recovers_the_pattern_coefficient():
    rng = np.random.default_rng(1)
    clean = rng.uniform(0, 1, (3, 16, 16, 3))
    p = calibrate.sign_pattern(16)[None] * 0.03
    unrelated = rng.normal(0, 0.05, clean.shape)
    assert calibrate.imprint_fraction(clean + p, clean, p) == pytest.approx([1, 1, 1])
    assert calibrate.imprint_fraction(clean + 0.25 * p, clean, p) == pytest.approx([0.25] * 3)
    assert np.all(np.abs(calibrate.imprint_fraction(clean + unrelated, clean, p)) < 0.1)
    assert calibrate.imprint_fraction(clean - p, clean, p) == pytest.approx([-1, -1, -1])


def test_patterns_and_corruptions_have_the_stated_strength():
    x = np.full((2, 16, 16, 3), 100, np.uint8)
    for kind in ("sign pattern", "texture pattern"):
        y = calibrate.corrupt(x, kind, 8).astype(int) - 100
        assert np.max(np.abs(y)) == 8
    assert np.array_equal(calibrate.corrupt(x, "blur", 1.0), x)          # blur of a flat image
    n = calibrate.corrupt(x, "noise", 16).astype(float) - 100
    assert 13 < n.std() < 19
    assert calibrate.psnr01(calibrate.to_unit(x), calibrate.to_unit(x))[0] == pytest.approx(120.0)
    assert calibrate.BUDGET_36DB_RMS == pytest.approx(0.01585, rel=1e-3)


def _row(method, setting, ism, ism_others=0.05, fdfr=0.1):
    return {"status": "done", "method": method, "setting": setting, "attack": "dreambooth", "ism": ism,
            "ism_others": ism_others, "fdfr": fdfr}


def test_gates_pass_and_fail_on_the_stated_thresholds():
    # the rows carry the evaluation's own setting names, those gate_config asks it to run
    none, jpeg, blur = calibrate.gate_config(calibrate.MODELS, 4, 200).settings
    assert (jpeg, blur) == ("jpeg:quality=75", "blur:sigma=1.0")
    rows = [_row("none", none, 0.55), _row("none", jpeg, 0.54), _row("none", blur, 0.53),
            _row("advdm", none, 0.30, fdfr=0.3), _row("advdm", jpeg, 0.50), _row("advdm", blur, 0.52),
            _row("aspl", none, 0.45), _row("aspl", jpeg, 0.30), _row("aspl", blur, 0.53)]
    g = {x["gate"]: x for x in calibrate.gates(rows, {"psnr_drop": 3.0})}
    assert not g["PhotoGuard eps 0.06: PSNR(D(E(x'))) drop, dB"]["passed"]
    assert g["clean DreamBooth: own ISM / others"]["passed"]
    assert g["clean DreamBooth: own ISM / others"]["value"] == pytest.approx(11.0)
    assert g["AdvDM 8/255: ISM cut / clean gap"]["value"] == pytest.approx(0.25 / 0.5)
    assert g["AdvDM 8/255: ISM cut / clean gap"]["passed"]
    assert g["AdvDM 8/255: FDFR rise"]["passed"]
    assert g["AdvDM 8/255: cut after JPEG 75 < cut without"]["passed"]
    assert not g["ASPL eps 0.05: ISM cut / clean gap"]["passed"]      # 0.10 < 0.4 x 0.5
    assert not g["ASPL eps 0.05: FDFR rise"]["passed"]
    assert not g["ASPL eps 0.05: cut after JPEG 75 < cut without"]["passed"]   # purification did not help
    # a world whose clean attack learns no one fails the first gate
    weak = [dict(r, ism_others=0.2) for r in rows]
    assert not {x["gate"]: x for x in calibrate.gates(weak)}["clean DreamBooth: own ISM / others"]["passed"]
    assert math.isnan({x["gate"]: x for x in calibrate.gates([])}["AdvDM 8/255: ISM cut / clean gap"]["value"])
    # purifications not run (--gate_settings=none) are left out, not failed
    only_none = [r for r in rows if r["setting"] == "none"]
    names = {x["gate"] for x in calibrate.gates(only_none)}
    assert "AdvDM 8/255: ISM cut / clean gap" in names and not any("cut after" in n for n in names)
    # with the identity part: the real photos' ratio (the clean gate's ceiling) and the share of their gap
    assert not any(n.startswith("(") for n in names)
    ident = {"clean": {"ism": 0.8, "ism_others": 0.2}}
    g = {x["gate"]: x for x in calibrate.gates(rows, identity=ident)}
    assert g["(real photos: own ISM / others, the ratio's ceiling)"]["value"] == pytest.approx(4.0)
    assert g["(clean DreamBooth: own - others, share of the real photos')"]["value"] == pytest.approx(0.5 / 0.6)
    assert g["(real photos: own ISM / others, the ratio's ceiling)"]["threshold"] is None
    assert "| (real photos: own ISM / others, the ratio's ceiling) | 4.000 | – | – |" in calibrate.report(
        {"gates": list(g.values())})


def test_unknown_part_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="bogus"):
        calibrate.calibrate(str(tmp_path), parts=("bogus",))


def test_encoder_attack_stays_in_its_budget_and_reports_the_round_trip():
    from ldu_jax.miniworld import world
    from ldu_jax.sd import vae as vae_lib
    vae = vae_lib.tiny_vae()
    x = np.stack([world.render(i, 0, 64, np.uint8) for i in world.heldout_identities(2)])
    r = calibrate.encoder_attack(vae, vae.params, x, steps=3)
    # L-inf 0.03 on [0, 1] (0.06 on [-1, 1]) bounds the protected photo's PSNR from below
    assert r["psnr_protected"] >= 20 * np.log10(1 / 0.03) - 0.1
    assert r["psnr_protected"] < 60                                  # and it did change the photos
    assert r["psnr_drop"] == pytest.approx(r["psnr_rec_clean"] - r["psnr_rec_protected"])
    assert r["latent_rel_change"] > 0 and np.isfinite(r["latent_amplification"])
    assert np.isfinite(r["vae_passes_sign_pattern"]) and np.isfinite(r["vae_passes_texture_pattern"])


def test_build_v2_profile_renders_128px_textured_portraits_for_a_factor_8_vae(tmp_path):
    from ldu_jax.jobs import build_world as build
    cfg = build.configs("v2")
    assert cfg["data"]["style"] == "v2" and cfg["data"]["size"] == 128
    assert cfg["vae"].model.sample_size == 128 and len(cfg["vae"].model.block_out_channels) == 4   # factor 8
    images, _ = next(build.world_batches(4, 2, 0, 128, style="v2")(0))
    assert images.shape == (2, 128, 128, 3)
    assert calibrate.fine_rms(images).mean() > 0.03
    with pytest.raises(ValueError, match="no identity recipe"):
        build.build(str(tmp_path / "mw2"), "v2", stages=("identity",))
