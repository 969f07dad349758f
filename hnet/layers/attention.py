"""Causal multi-head self-attention with RoPE, optional sliding window and grouped KV heads."""

import jax
import jax.numpy as jnp
from flax import nnx

from hnet.layers.common import INIT_STD, linear


def rotary_embedding(x: jax.Array, positions: jax.Array, rotary_dim: int, base: float = 10000.0) -> jax.Array:
    """Apply RoPE ("rotate half", non-interleaved) to the first `rotary_dim` dims of each head.

    x: (B, L, H, Dh); positions: (L,) or (B, L) integer positions. Returns x's shape and dtype.
    """
    if rotary_dim == 0:
        return x
    half = rotary_dim // 2
    inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / rotary_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (..., L, half)
    if angles.ndim == 2:
        angles = angles[None]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]  # (B|1, L, 1, half)
    rotated, rest = x[..., :rotary_dim].astype(jnp.float32), x[..., rotary_dim:]
    x1, x2 = rotated[..., :half], rotated[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([out.astype(x.dtype), rest], axis=-1)


def attention_mask(q_positions: jax.Array, k_positions: jax.Array, window: int) -> jax.Array:
    """Boolean (Lq, Lk): key j is visible to query i when j <= i and (window < 0 or i - j <= window)."""
    delta = q_positions[:, None] - k_positions[None, :]
    visible = delta >= 0
    if window >= 0:
        visible &= delta <= window
    return visible


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked softmax attention with a float32 softmax.

    q: (B, Lq, H, Dh); k, v: (B, Lk, Hkv, Dh) with H a multiple of Hkv; mask: (Lq, Lk) bool.
    Returns (B, Lq, H, Dh) in q's dtype.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim ** -0.5)
    scores = jnp.where(mask, scores, -1e30)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", weights, v)
    return out.reshape(batch, q_len, heads, head_dim)


class CausalSelfAttention(nnx.Module):
    """(B, L, D) -> (B, L, D) causal self-attention.

    One fused projection D -> [q (H*Dh), k (Hkv*Dh), v (Hkv*Dh)], RoPE on the first `rotary_dim`
    dims of each head, softmax scale 1/sqrt(Dh), optional sliding window (`window` previous
    positions and itself; -1 = global), output projection D -> D. No biases.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, rotary_dim: int, window: int,
                 *, dtype, out_scale: float, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = d_model // num_heads
        self.rotary_dim, self.window = rotary_dim, window
        qkv_dim = (num_heads + 2 * num_kv_heads) * self.head_dim
        self.wqkv = linear(d_model, qkv_dim, ("embed", "qkv"), rngs, dtype=dtype)
        self.out_proj = linear(d_model, d_model, ("heads", "embed"), rngs, dtype=dtype, std=INIT_STD * out_scale)

    def project_qkv(self, x: jax.Array, positions: jax.Array):
        """x (B, L, D) -> q (B, L, H, Dh), k and v (B, L, Hkv, Dh), RoPE applied to q and k."""
        batch, length, _ = x.shape
        qkv = self.wqkv(x)
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q = qkv[..., :q_dim].reshape(batch, length, self.num_heads, self.head_dim)
        k = qkv[..., q_dim:q_dim + kv_dim].reshape(batch, length, self.num_kv_heads, self.head_dim)
        v = qkv[..., q_dim + kv_dim:].reshape(batch, length, self.num_kv_heads, self.head_dim)
        q = rotary_embedding(q, positions, self.rotary_dim)
        k = rotary_embedding(k, positions, self.rotary_dim)
        return q, k, v

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, d_model = x.shape
        positions = jnp.arange(length)
        q, k, v = self.project_qkv(x, positions)
        out = attend(q, k, v, attention_mask(positions, positions, self.window))
        return self.out_proj(out.reshape(batch, length, d_model))
