"""The Anti-DreamBooth protocol on VGGFace2 with Stable Diffusion 2.1-base (as eval_celebahq_sd21):

    python -m ldu_jax.evaluate --config=configs/eval_vggface2_sd21.py --workdir=runs/eval_vggface2 \\
        --config.data=/data/vggface2_antidb --config.rho_checkpoint=runs/rho_sd21
"""
from configs import eval_celebahq_sd21


def get_config():
    c = eval_celebahq_sd21.get_config()
    c.data = "/data/vggface2_antidb"
    return c
