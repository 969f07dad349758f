"""RMSNorm, computed in float32."""

import jax
import jax.numpy as jnp
from flax import nnx

from hnet.layers.common import param


def rms_norm(x: jax.Array, weight: jax.Array, eps: float = 1e-5) -> jax.Array:
    """x (..., D) -> float32 (..., D): x / rms(x) * weight."""
    x = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(variance + eps) * weight


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis (width D); returns float32 (..., D)."""

    def __init__(self, dim: int, eps: float = 1e-5, axis_name: str = "norm"):
        self.weight = param(jnp.ones((dim,), jnp.float32), (axis_name,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)
