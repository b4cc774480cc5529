"""The mini-world evaluation: held-out identities x methods x settings x attacks, measured with the
world's identity model (ISM, FDFR, Fréchet distance of identity features) and PSNR / SSIM, on the
shipped models in ldu_jax/miniworld/models (to evaluate a build of your own, point sd, shortcut,
rho_checkpoint and face_backend at its export/ folder, or install it with the build's --install):

    python -m ldu_jax.evaluate --config=configs/eval_miniworld.py --workdir=runs/eval_miniworld
"""
import os

from configs import eval_tiny
from ldu_jax.miniworld import MODELS

BASELINES = ("advdm", "aspl", "fsmg", "photoguard", "mist", "sds", "pid")
# Each baseline at its published budget ([0, 1] units), as the '<method>@published' variant, on the
# world's step schedule: AdvDM 8/255 and ASPL eps 0.05 on [-1, 1] (Anti-DreamBooth's comparison, the
# calibration gates'), FSMG the same budget with 100 PGD steps (its SD 2.1 config), PhotoGuard eps
# 0.06 / step 0.02 on [-1, 1] (200 steps: its sign steps reach the box's corners by then, 1000
# measured the same), Mist and SDS 16/255 with 100 steps of 1/255, PID 0.05 with 1000 steps of 1/255.
PUBLISHED = {
    "advdm": {"eps": 8 / 255, "step_size": 1 / 255, "steps": 50},
    "aspl": {"eps": 0.05 / 2, "step_size": 0.005 / 2, "steps": 6, "rounds": 10},
    "fsmg": {"eps": 0.05 / 2, "step_size": 0.005 / 2, "steps": 100},
    "photoguard": {"eps": 0.06 / 2, "step_size": 0.02 / 2, "steps": 200},
    "mist": {"eps": 16 / 255, "step_size": 1 / 255, "steps": 100},
    "sds": {"eps": 16 / 255, "step_size": 1 / 255, "steps": 100},
    "pid": {"eps": 0.05, "step_size": 1 / 255, "steps": 1000},
}
# ldu-opt at the PSNRs the published budgets reach on these portraits (AdvDM 8/255 ~31 dB, Mist and
# SDS 16/255 ~26 dB), as variants run by name ('ldu-opt@31dB'): LDU has no published budget of its
# own, and these place it on the baselines' ISM-drop-vs-PSNR curves. Its budget is an MSE on [-1, 1].
LDU_OPT_PSNRS = (31, 26)


def mse_budget(psnr_db: float) -> float:
    """LDU's eps (pixel MSE on [-1, 1]) for a PSNR in dB on [0, 1]."""
    return 4 * 10 ** (-psnr_db / 10)


def get_config():
    c = eval_tiny.get_config()
    c.data = "miniworld:8"         # 8 held-out identities (Anti-DreamBooth layout) written into the work dir
    c.reference_sets = ("set_A", "set_C")
    c.sd = os.path.join(MODELS, "sd")
    c.shortcut = os.path.join(MODELS, "shortcut")
    c.rho_checkpoint = os.path.join(MODELS, "rho")   # '' trains ρ (configs/ldu_miniworld.py) into <workdir>/rho
    c.rho_dataset = ""
    c.methods = ("none", "ldu", "ldu-opt", *BASELINES, *(f"{m}@published" for m in BASELINES))
    c.method_configs = {**c.method_configs, "ldu": "configs/ldu_miniworld.py", "ldu-opt": "configs/ldu_miniworld.py"}
    # The default budget is PSNR >= 36 dB for every method: an L-inf ball of 4/255 gives ~36 dB
    # (8/255, the published baselines' usual budget, measured 30-31 dB on these portraits).
    pgd = {"eps": 4 / 255, "step_size": 0.5 / 255, "steps": 50}
    c.method_overrides = {"ldu": {}, "ldu-opt": {},
                          **{m: dict(pgd) for m in ("advdm", "photoguard", "mist", "sds", "sds-", "pid")},
                          "aspl": {**pgd, "steps": 6, "rounds": 10},
                          # FSMG's surrogate trained as long as ASPL's copies are on the clean photos
                          # (10 rounds x 2 steps at the tiny config's lr), not the tiny config's 2 steps
                          "fsmg": {**pgd, "surrogate_steps": 20},
                          **{f"{m}@published": dict(b) for m, b in PUBLISHED.items()},
                          **{f"ldu-opt@{db}dB": {"eps": mse_budget(db)} for db in LDU_OPT_PSNRS}}
    c.settings = ("none", "jpeg:quality=75", "blur:sigma=1.0", "diffpure:strength=0.1,steps=10")
    c.subject_batch = 8
    c.attacks = ("ti", "dreambooth")
    c.attack_configs = {"ti": "configs/attack_ti_miniworld.py", "dreambooth": "configs/attack_db_miniworld.py"}
    c.attack_overrides = {"ti": {"max_steps": 300}, "dreambooth": {"max_steps": 300}}
    c.num_samples = 8
    c.face_backend = "miniworld:" + os.path.join(MODELS, "identity")
    return c
