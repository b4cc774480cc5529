"""The 2-D convolution of the SD modules (UNet, VAE): ``flax.linen.Conv`` with diffusers' parameter
names and shapes (kernel HWIO, bias), computed by XLA's convolution or, on CPU, as one matmul
over the kernel's taps.

Why taps on CPU (``python bench/sd_steps.py --convs=xla,taps``): XLA:CPU's convolution is slow
where the evaluation spends its time. A vmapped DreamBooth step, whose kernels are batched per
subject, becomes grouped convolutions, which ran 0.87x the speed of training the subjects one by
one; in a loop over subjects the kernels' gradient convolutions ran at a third of that. As taps
(the input's k x k shifted windows concatenated on the channel axis, times the kernel reshaped
to [k k C_in, C_out]) a plain 3x3 conv at 64 channels runs 1.6x faster, and the four subjects'
DreamBooth steps looped (``parallel.map_subjects``) 1.50x faster than XLA's convs vmapped. On GPU and TPU XLA's
convolution is the right one (taps would hold k x k copies of each input for the backward pass).
The two agree to float rounding (tests/test_sd_conv.py).
"""
from __future__ import annotations

import contextlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ldu_jax import errors

IMPLS = ("auto", "xla", "taps")
ENV = "LDU_JAX_SD_CONV"   # the process's choice outside ``using``; unset: auto
_impl = ["auto"]
_NHWC = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), ("NHWC", "HWIO", "NHWC"))


@contextlib.contextmanager
def using(impl: str):
    """Modules traced inside compute their convs with ``impl`` ('auto': taps on CPU, else XLA);
    for benches and tests that compare the two (a program traced earlier keeps its choice)."""
    if impl not in IMPLS:
        raise ValueError(f"conv implementation {impl!r}; one of {IMPLS}")
    old, _impl[0] = _impl[0], impl
    try:
        yield
    finally:
        _impl[0] = old


def implementation() -> str:
    """'taps' or 'xla': what a conv traced now computes with (``using``, else $LDU_JAX_SD_CONV, else
    taps on CPU and XLA's elsewhere)."""
    impl = _impl[0] if _impl[0] != "auto" else os.environ.get(ENV) or "auto"
    if impl not in IMPLS:
        raise errors.ConfigError(f"${ENV}={impl!r}: one of {', '.join(IMPLS)}")
    if impl != "auto":
        return impl
    return "taps" if jax.default_backend() == "cpu" else "xla"


def taps_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
              feature_group_count=1, precision=None):
    """``lax.conv_general_dilated`` for NHWC x HWIO with explicit padding and no dilation or groups,
    as one matmul over the k x k taps (anything else: XLA's convolution)."""
    plain = (feature_group_count == 1 and not isinstance(padding, str)
             and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
             and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC)
    if not plain:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision)
    kh, kw, cin, cout = rhs.shape
    sh, sw = window_strides
    x = jnp.pad(lhs, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    cols = jnp.concatenate([x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
                            for i in range(kh) for j in range(kw)], axis=-1)
    return jnp.einsum("nhwk,ko->nhwo", cols, rhs.reshape(kh * kw * cin, cout), precision=precision)


def conv(features: int, kernel: int, dtype, name=None, stride: int = 1, pad: int | None = None) -> nn.Conv:
    """A k x k conv (padding ``pad`` on each side, default k // 2) in this backend's implementation."""
    pad = kernel // 2 if pad is None else pad
    impl = taps_conv if implementation() == "taps" else None
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)), dtype=dtype,
                   name=name, conv_general_dilated=impl)
