"""SDS(-) (Xue et al. 2024: descending the score-distillation gradient, their stronger variant)
with the settings of protect_sds_tiny.py."""
from configs import protect_sds_tiny


def get_config():
    c = protect_sds_tiny.get_config()
    c.method = "sds-"
    return c
