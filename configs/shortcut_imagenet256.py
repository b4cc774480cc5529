"""The public ImageNet 256 recipes (class-conditional, cfg 1.5, bootstrap CFG), DiT-B or DiT-XL.

    python train.py --config=configs/shortcut_imagenet256.py:b  --workdir=runs/in_b  --config.dataset=...
    python train.py --config=configs/shortcut_imagenet256.py:xl --workdir=runs/in_xl --config.dataset=...

Labels come from the dataset (a TFDS name such as ``tfds:imagenet2012``).
"""
from configs import shortcut_celebahq256

SIZES = {
    "b": dict(hidden_size=768, depth=12, num_heads=12),
    "xl": dict(hidden_size=1152, depth=28, num_heads=16),
}


def get_config(variant="b"):
    if variant not in SIZES:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(SIZES)}")
    c = shortcut_celebahq256.get_config()
    c.dataset = "tfds:imagenet2012"
    c.batch_size = 256
    c.max_steps = 810_000
    c.model.update(dict(num_classes=1000, class_dropout_prob=0.1, cfg_scale=1.5, bootstrap_cfg=1,
                        **SIZES[variant]))
    if variant == "xl":
        c.sharding = "fsdp"
    return c
