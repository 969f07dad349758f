"""Dynamic chunking: routing (boundary prediction), chunk under a static capacity, dechunk.

Shapes: B batch, L positions of the stage's input, M chunk capacity (static), D width.
See DESIGN.md section 1 for the equations and section 2 for the static-shape plan.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from hnet.layers.common import param

PROB_CLIP = 1e-4  # smoothing probabilities are clipped to [1e-4, 1 - 1e-4]


class Routing(nnx.Module):
    """Learned boundary predictor: h (B, L, D) float32 -> boundary probability p (B, L) float32.

    q_t = W_q h_t, k_t = W_k h_t (W_q = W_k = identity at init, float32);
    p_t = clip((1 - cos(q_{t-1}, k_t)) / 2, 0, 1), and p_t = 1 at every document start.
    """

    def __init__(self, d_model: int):
        self.q_proj = param(jnp.eye(d_model, dtype=jnp.float32), ("embed", "embed_out"))
        self.k_proj = param(jnp.eye(d_model, dtype=jnp.float32), ("embed", "embed_out"))

    def __call__(self, hidden: jax.Array, doc_start: jax.Array) -> jax.Array:
        prob = self.pair_prob(hidden[:, :-1], hidden[:, 1:])
        prob = jnp.pad(prob, ((0, 0), (1, 0)), constant_values=1.0)
        return jnp.where(doc_start, 1.0, prob)

    def step(self, previous: jax.Array, hidden: jax.Array, doc_start: jax.Array) -> jax.Array:
        """One position: previous and current hidden (B, D), doc_start (B,) -> p (B,) float32."""
        return jnp.where(doc_start, 1.0, self.pair_prob(previous, hidden))

    def pair_prob(self, previous: jax.Array, current: jax.Array) -> jax.Array:
        """(..., D) hidden states at t-1 and t -> (...,) boundary probability at t."""
        q = _unit(previous.astype(jnp.float32) @ self.q_proj[...])
        k = _unit(current.astype(jnp.float32) @ self.k_proj[...])
        cos = jnp.sum(q * k, axis=-1)
        return jnp.clip((1.0 - cos) / 2.0, 0.0, 1.0)


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ---- Heuristic boundary rules (routing modes "space" and "stride:K") ----

# Bytes after which a word starts: ASCII whitespace and ASCII punctuation.
SEPARATOR_BYTES = frozenset(b" \t\n\r\x0b\x0c" + b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
_SEPARATOR_TABLE = jnp.array([b in SEPARATOR_BYTES for b in range(256)])


def space_boundaries(byte_ids: jax.Array) -> jax.Array:
    """(B, L) byte values -> (B, L) bool: True at the first byte of every word.

    A word starts at a byte that is not a separator (ASCII whitespace or punctuation) and follows
    a separator; position 0 always starts a chunk. So separators stay attached to the end of the
    preceding word ("hello, " | "world"). Bytes of a multi-byte UTF-8 character (lead 0xC0-0xF7,
    continuation 0x80-0xBF) are never separators, so a character is never split; text without
    separators (e.g. CJK) forms one long chunk.
    """
    is_separator = _SEPARATOR_TABLE[byte_ids]
    starts = ~is_separator[:, 1:] & is_separator[:, :-1]
    return jnp.pad(starts, ((0, 0), (1, 0)), constant_values=True)


def stride_boundaries(positions: jax.Array, stride: int) -> jax.Array:
    """Integer positions (any shape) -> bool, True at positions 0, K, 2K, ..."""
    return positions % stride == 0


# ---- Chunk and dechunk ----


@struct.dataclass
class ChunkLayout:
    """Where each position's chunk lives under a static capacity M.

    chunk_position: (B, M) int32, the input position of each chunk (L for an empty slot);
    chunk_valid: (B, M) bool, slot holds a chunk; plug_index: (B, L) int32, the slot whose value
    position t takes when dechunking (its chunk, or the last slot for positions whose chunk
    overflowed, which is still causal); overflow: (B,) int32, boundaries dropped for lack of room.
    """

    chunk_position: jax.Array
    chunk_valid: jax.Array
    plug_index: jax.Array
    overflow: jax.Array


def chunk_layout(boundary_mask: jax.Array, capacity: int) -> ChunkLayout:
    """(B, L) bool boundaries -> ChunkLayout, keeping the first `capacity` chunks in order."""
    batch, length = boundary_mask.shape
    chunk_id = jnp.cumsum(boundary_mask.astype(jnp.int32), axis=1) - 1  # (B, L)
    kept = boundary_mask & (chunk_id < capacity)
    slot = jnp.where(kept, chunk_id, capacity)  # out-of-range slots are dropped by the scatter
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    chunk_position = jnp.full((batch, capacity), length, jnp.int32)
    chunk_position = chunk_position.at[jnp.arange(batch)[:, None], slot].set(positions, mode="drop")
    overflow = jnp.sum(boundary_mask & (chunk_id >= capacity), axis=1, dtype=jnp.int32)
    return ChunkLayout(
        chunk_position=chunk_position,
        chunk_valid=chunk_position < length,
        plug_index=jnp.clip(chunk_id, 0, capacity - 1),
        overflow=overflow,
    )


def gather_chunks(values: jax.Array, layout: ChunkLayout) -> jax.Array:
    """values (B, L, ...) -> (B, M, ...): the value at each chunk's position (empty slots repeat the last position)."""
    length = values.shape[1]
    index = jnp.minimum(layout.chunk_position, length - 1)
    index = index.reshape(index.shape + (1,) * (values.ndim - 2))
    return jnp.take_along_axis(values, index, axis=1)


def ema_smooth(chunk_values: jax.Array, chunk_prob: jax.Array) -> jax.Array:
    """Smoothing over chunks: out_k = P_k z_k + (1 - P_k) out_{k-1}, with P clipped to [1e-4, 1 - 1e-4].

    chunk_values (B, M, D), chunk_prob (B, M) -> float32 (B, M, D). A linear recurrence, so it
    runs as an associative scan with combine((a1, u1), (a2, u2)) = (a1 a2, a2 u1 + u2).
    """
    prob = jnp.clip(chunk_prob.astype(jnp.float32), PROB_CLIP, 1.0 - PROB_CLIP)[..., None]
    decay, update = 1.0 - prob, prob * chunk_values.astype(jnp.float32)

    def combine(left, right):
        decay_l, update_l = left
        decay_r, update_r = right
        return decay_l * decay_r, decay_r * update_l + update_r

    _, smoothed = jax.lax.associative_scan(combine, (decay, update), axis=1)
    return smoothed


def dechunk(chunk_values: jax.Array, chunk_prob: jax.Array, layout: ChunkLayout) -> jax.Array:
    """Chunk outputs (B, M, D) -> float32 (B, L, D): smooth, then each position takes its chunk's value."""
    smoothed = ema_smooth(chunk_values, chunk_prob)
    return jnp.take_along_axis(smoothed, layout.plug_index[..., None], axis=1)


def straight_through(confidence: jax.Array) -> jax.Array:
    """1 in the forward pass; passes the gradient to `confidence` in the backward pass."""
    return 1.0 + confidence - jax.lax.stop_gradient(confidence)


def ratio_loss(boundary_mask: jax.Array, boundary_prob: jax.Array, valid: jax.Array, target: float) -> jax.Array:
    """L = N/(N-1) ((N-1) F G + (1-F)(1-G)), F = fraction selected, G = mean p, over valid positions.

    Minimum 1 at F = G = 1/N. (B, L) inputs -> scalar float32.
    """
    valid = valid.astype(jnp.float32)
    count = jnp.maximum(valid.sum(), 1.0)
    selected = jnp.sum(boundary_mask * valid) / count
    mean_prob = jnp.sum(boundary_prob * valid) / count
    n = target
    return n / (n - 1.0) * ((n - 1.0) * selected * mean_prob + (1.0 - selected) * (1.0 - mean_prob))
