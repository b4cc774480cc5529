"""Compute dtypes by their config names: the one map from a config's string to a jnp dtype."""
import jax.numpy as jnp

from ldu_jax.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def by_name(name: str, where: str = "config.dtype"):
    """The jnp dtype named ``name``; a ConfigError naming ``where`` for any other name."""
    if name not in DTYPES:
        raise ConfigError(f"{where} must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]
