"""Causal multi-head self-attention with RoPE, optional sliding window and grouped KV heads.

For generation, a layer keeps a KVCache: keys and values of the positions seen so far in C slots,
position p in slot p % C. For a global layer C is the longest sequence the cache must hold; for
a sliding-window layer C = window + 1, a ring buffer holding exactly the visible positions.

Documents packed into one row never see each other (hnet.segments): keys of other documents are
masked, and RoPE positions count from the document's start.

The attention itself (the plain, blockwise and Pallas paths) is hnet.layers.kernels.attention.
docs/ARCHITECTURE.md section 1 has the conventions (scale, RoPE, window).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from hnet.layers.common import INIT_STD, linear
from hnet.layers.kernels.attention import attend, causal_attention
from hnet.logical_axes import HEADS_AXES, constrain
from hnet.segments import Segments, at_positions


class CausalSelfAttention(nnx.Module):
    """(B, L, D) -> (B, L, D) causal self-attention.

    One fused projection D -> [q (H*Dh), k (Hkv*Dh), v (Hkv*Dh)], RoPE on the first `rotary_dim`
    dims of each head, softmax scale 1/sqrt(Dh), optional sliding window (`window` previous
    positions and itself; -1 = global), output projection D -> D. No biases.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        rotary_dim: int,
        window: int,
        *,
        dtype,
        out_scale: float,
        rngs: nnx.Rngs,
    ):
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = d_model // num_heads
        self.rotary_dim, self.window = rotary_dim, window
        qkv_dim = (num_heads + 2 * num_kv_heads) * self.head_dim
        self.wqkv = linear(d_model, qkv_dim, ("embed", "qkv"), rngs, dtype=dtype)
        self.out_proj = linear(d_model, d_model, ("heads", "embed"), rngs, dtype=dtype, std=INIT_STD * out_scale)

    def project_qkv(self, x: jax.Array, positions: jax.Array):
        """x (B, L, D), positions (B, L) -> q (B, L, H, Dh), k and v (B, L, Hkv, Dh), RoPE applied."""
        batch, length, _ = x.shape
        qkv = self.wqkv(x)
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q = qkv[..., :q_dim].reshape(batch, length, self.num_heads, self.head_dim)
        k = qkv[..., q_dim : q_dim + kv_dim].reshape(batch, length, self.num_kv_heads, self.head_dim)
        v = qkv[..., q_dim + kv_dim :].reshape(batch, length, self.num_kv_heads, self.head_dim)
        q = rotary_embedding(q, positions, self.rotary_dim)
        k = rotary_embedding(k, positions, self.rotary_dim)
        return q, k, v

    def cache_slots(self, max_length: int) -> int:
        """Cache slots C for sequences of up to `max_length` positions."""
        return max_length if self.window < 0 else min(max_length, self.window + 1)

    def forward(
        self, x: jax.Array, segments: Segments, lengths: jax.Array | None = None, max_length: int | None = None
    ):
        """Causal attention within each document of x (B, L, D) -> (y (B, L, D), KVCache or None).

        RoPE uses positions within the document, so a document attends exactly as it would alone.
        With `lengths` (B,) (each row's real length; the rest is right padding) and `max_length`,
        also returns the cache after each row's last real position, ready for `step` (generation's
        prefill).
        """
        batch, length, d_model = x.shape
        q, k, v = self.project_qkv(x, segments.position)
        # Heads split over tensor: each device attends with its own heads.
        q, k, v = (constrain(t, HEADS_AXES) for t in (q, k, v))
        out = causal_attention(q, k, v, segments.index, self.window)
        out = constrain(out, HEADS_AXES)
        y = self.out_proj(out.reshape(batch, length, d_model))
        if lengths is None:
            return y, None
        slots = self.cache_slots(max_length)
        source = _slot_positions(lengths, slots)  # (B, C)
        take = lambda t: jnp.where(
            (source >= 0)[..., None, None],
            jnp.take_along_axis(t, jnp.clip(source, 0, length - 1)[..., None, None], axis=1),
            0,
        ).astype(t.dtype)
        last = jnp.maximum(lengths - 1, 0)
        doc_begin = last - at_positions(segments.position, last)
        return y, KVCache(
            key=take(k), value=take(v), length=lengths.astype(jnp.int32), doc_begin=doc_begin.astype(jnp.int32)
        )

    def step(self, x: jax.Array, cache: KVCache, doc_start: jax.Array):
        """One new position per row: x (B, D), doc_start (B,) bool -> (y (B, D), updated KVCache)."""
        batch, d_model = x.shape
        slots = cache.key.shape[1]
        doc_begin = jnp.where(doc_start, cache.length, cache.doc_begin)
        q, k, v = self.project_qkv(x[:, None], (cache.length - doc_begin)[:, None])
        write = jax.nn.one_hot(cache.length % slots, slots, dtype=bool)[..., None, None]  # (B, C, 1, 1)
        cache = KVCache(
            key=jnp.where(write, k, cache.key),
            value=jnp.where(write, v, cache.value),
            length=cache.length + 1,
            doc_begin=doc_begin,
        )
        # Visible: the slots holding this document's positions (a window layer's ring holds exactly
        # the window, so nothing else needs masking).
        mask = (_slot_positions(cache.length, slots) >= doc_begin[:, None])[:, None, :]  # (B, 1, C)
        out = attend(q, cache.key, cache.value, mask)
        return self.out_proj(out.reshape(batch, d_model)), cache


@struct.dataclass
class KVCache:
    """key, value: (B, C, Hkv, Dh) with RoPE applied to keys; length: (B,) int32 positions seen;
    doc_begin: (B,) int32 the position where the current document began (earlier keys are hidden)."""

    key: jax.Array
    value: jax.Array
    length: jax.Array
    doc_begin: jax.Array


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


def _slot_positions(length: jax.Array, slots: int) -> jax.Array:
    """(B,) positions seen -> (B, C) int32: the position each slot holds (the latest p < length with
    p % C == slot), negative for a slot not written yet."""
    slot = jnp.arange(slots)[None, :]
    last = length[:, None] - 1
    return slot + slots * ((last - slot) // slots)
