"""The mini-world evaluation in the world with an SD-calibrated fragile encoder (issue 17): the
shipped models with the VAE of ``build_world --profile=fragile`` (``get_config('<its export>')``,
default runs/mw_fragile/export), 8 held-out identities, DreamBooth and TI at 200 steps, every method
at the 36 dB budget of configs/eval_miniworld.py, under no purification, JPEG 75, blur, noise and
DiffPure:

    python -m ldu_jax.cli.build_world --workdir=runs/mw_fragile --profile=fragile --stages=vae,export
    python -m ldu_jax.cli.evaluate --config=configs/eval_miniworld_fragile.py --workdir=runs/eval_fragile

The full table is 17 methods x 5 settings x 2 attacks per group of 4 identities: run it in parts
(``--config.methods``, ``--config.settings``, ``--config.attacks``, ``--config.subjects``) into one
work dir; each cell is cached, and the held-out identities are the same for any count (subject_0..3
of 4 are those of 8).
"""
import os

from configs import eval_miniworld


def get_config(models: str = "runs/mw_fragile/export"):
    c = eval_miniworld.get_config()
    c.data = "miniworld:8"
    c.sd = os.path.join(models, "sd")
    c.shortcut = os.path.join(models, "shortcut")
    c.rho_checkpoint = os.path.join(models, "rho")
    c.face_backend = "miniworld:" + os.path.join(models, "identity")
    c.settings = ("none", "jpeg:quality=75", "blur:sigma=1.0", "noise:sigma=0.05", "diffpure:strength=0.1,steps=10")
    c.attack_overrides = {"ti": {"max_steps": 200}, "dreambooth": {"max_steps": 200}}
    return c
