"""The mini-world evaluation: held-out identities x methods x settings x attacks, measured with the
world's identity model (ISM, FDFR, Fréchet distance of identity features) and PSNR / SSIM, on the
shipped models in ldu_jax/miniworld/models (to evaluate a build of your own, point sd, shortcut,
rho_checkpoint and face_backend at its export/ folder, or install it with the build's --install):

    python -m ldu_jax.evaluate --config=configs/eval_miniworld.py --workdir=runs/eval_miniworld
"""
import os

from configs import eval_tiny
from ldu_jax.miniworld import MODELS


def get_config():
    c = eval_tiny.get_config()
    c.data = "miniworld:8"         # 8 held-out identities (Anti-DreamBooth layout) written into the work dir
    c.reference_sets = ("set_A", "set_C")
    c.sd = os.path.join(MODELS, "sd")
    c.shortcut = os.path.join(MODELS, "shortcut")
    c.rho_checkpoint = os.path.join(MODELS, "rho")   # '' trains ρ (configs/ldu_miniworld.py) into <workdir>/rho
    c.rho_dataset = ""
    c.methods = ("none", "ldu", "ldu-opt", "advdm", "aspl", "photoguard", "mist", "sds", "pid")
    c.method_configs = {**c.method_configs, "ldu": "configs/ldu_miniworld.py", "ldu-opt": "configs/ldu_miniworld.py"}
    # The default budget is PSNR >= 36 dB for every method: an L-inf ball of 4/255 gives ~36 dB
    # (8/255, the published baselines' usual budget, measured 30-31 dB on these portraits).
    pgd = {"eps": 4 / 255, "step_size": 0.5 / 255, "steps": 50}
    c.method_overrides = {"ldu": {}, "ldu-opt": {},
                          **{m: dict(pgd) for m in ("advdm", "photoguard", "mist", "sds", "sds-", "pid", "fsmg")},
                          "aspl": {**pgd, "steps": 6, "rounds": 10}}
    c.settings = ("none", "jpeg:quality=75", "blur:sigma=1.0", "diffpure:strength=0.1,steps=10")
    c.subject_batch = 8
    c.attacks = ("ti", "dreambooth")
    c.attack_configs = {"ti": "configs/attack_ti_miniworld.py", "dreambooth": "configs/attack_db_miniworld.py"}
    c.attack_overrides = {"ti": {"max_steps": 300}, "dreambooth": {"max_steps": 300}}
    c.num_samples = 8
    c.face_backend = "miniworld:" + os.path.join(MODELS, "identity")
    return c
