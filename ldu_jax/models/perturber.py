"""ρ, the trajectory-shift network: a small UNet on NHWC latents that maps z_T to the shifted z_T'.

As the public code: double 3x3 conv blocks per level, max-pool down, transposed-conv up with skip
connections, a 1x1 output conv. Options: GroupNorm (default: one image's output does not depend
on its batch) or BatchNorm (the public code; then the variables carry ``batch_stats``); residual
output z_T + δ with a zero-initialised last layer (default: training starts from the plain
invert -> denoise reconstruction) or direct output (the public code).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from ldu_jax.errors import ConfigError


class _DoubleConv(nn.Module):
    features: int
    norm: str

    @nn.compact
    def __call__(self, x, train: bool):
        for _ in range(2):
            x = nn.Conv(self.features, (3, 3), padding="SAME")(x)
            if self.norm == "batch":
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            else:
                x = nn.GroupNorm(num_groups=min(8, self.features))(x)
            x = nn.relu(x)
        return x


class Perturber(nn.Module):
    widths: Sequence[int] = (64, 128, 256, 512)
    norm: str = "group"          # 'group' or 'batch'
    residual: bool = True        # z + δ with a zero-initialised last layer, or direct output

    @nn.compact
    def __call__(self, z, train: bool = False):
        if self.norm not in ("group", "batch"):
            raise ConfigError(f"perturber norm must be 'group' or 'batch', got {self.norm!r}")
        levels = len(self.widths)
        if z.shape[1] % 2 ** (levels - 1) or z.shape[2] % 2 ** (levels - 1):
            raise ConfigError(f"latent size {z.shape[1:3]} is not divisible by 2^{levels - 1} for {levels} levels")
        skips, x = [], z
        for i, w in enumerate(self.widths):
            x = _DoubleConv(w, self.norm)(x, train)
            if i < levels - 1:
                skips.append(x)
                x = nn.max_pool(x, (2, 2), (2, 2))
        for w, skip in zip(reversed(self.widths[:-1]), reversed(skips)):
            x = nn.ConvTranspose(w, (2, 2), (2, 2))(x)
            x = _DoubleConv(w, self.norm)(jnp.concatenate([skip, x], -1), train)
        init = nn.initializers.zeros if self.residual else nn.initializers.lecun_normal()
        out = nn.Conv(z.shape[-1], (1, 1), kernel_init=init, name="out")(x)
        return z + out if self.residual else out
