"""The Anti-DreamBooth protocol on CelebA-HQ with Stable Diffusion 2.1-base: 50 subjects in
<data>/<subject>/{set_A,set_B,set_C} (4 images each at 512 px), set_B protected, DreamBooth with
prior preservation and Textual Inversion, 16 images per prompt, ISM / FDFR / BRISQUE (+ CLIP-IQA,
FID when their weights are given). Point ``data``, ``shortcut`` and ``rho_checkpoint`` at yours:

    python -m ldu_jax.evaluate --config=configs/eval_celebahq_sd21.py --workdir=runs/eval_celebahq \\
        --config.data=/data/celebahq_antidb --config.rho_checkpoint=runs/rho_sd21 \\
        --config.fid_weights=/models/pt_inception-2015-12-05-6726825d.pth
"""
from configs import eval_tiny

BASELINES = ("advdm", "aspl", "fsmg", "photoguard", "mist", "sds", "sds-", "pid")
CONFIG_NAME = {"sds-": "sds_minus"}


def get_config():
    c = eval_tiny.get_config()
    c.data = "/data/celebahq_antidb"
    c.reference_sets = ("set_A", "set_C")
    c.sd = "stabilityai/stable-diffusion-2-1-base"
    c.shortcut = "runs/shortcut_sd21"
    c.rho_checkpoint = "runs/rho_sd21"
    c.methods = ("none", "ldu", "ldu-opt") + BASELINES
    c.method_configs = {"ldu": "configs/ldu_sd21.py", "ldu-opt": "configs/ldu_sd21.py",
                        **{m: f"configs/protect_{CONFIG_NAME.get(m, m)}_sd21.py" for m in BASELINES}}
    c.method_overrides = {}
    c.settings = ("none", "jpeg:quality=75", "blur:sigma=1.0", "noise:sigma=0.05", "resize:factor=0.5",
                  "diffpure:strength=0.1,steps=20", "gridpure:strength=0.1,steps=20")
    c.attacks = ("dreambooth", "ti")
    c.subject_batch = 1            # one SD 2.1 DreamBooth state (UNet + Adam) is ~10 GB: one subject per program
    c.attack_configs = {"ti": "configs/attack_ti_sd21.py", "dreambooth": "configs/attack_db_sd21.py"}
    c.attack_overrides = {}
    c.num_samples = 16
    c.fid_batch = 50
    return c
