"""Dynamic chunking: routing (boundary prediction), the capacity rule, chunk, dechunk, ratio loss.

Shapes: B batch, L positions of the stage's input, M chunk capacity (static), D width.

A boundary (the router's decision, p > 0.5) becomes a chunk when the capacity rule
(CapacityRule, a token bucket per document, then one per row) keeps it. The rule looks
only at earlier positions, so training, evaluation and generation chunk a document the same way
whatever the row length, window or cache size. docs/ARCHITECTURE.md has the equations and
the function implementing each.
"""

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import struct

from hnet.config import EXACT, ModelConfig, round_up
from hnet.layers.common import param
from hnet.segments import Segments

PROB_CLIP = 1e-4  # smoothing probabilities are clipped to [1e-4, 1 - 1e-4]
BOUNDARY_THRESHOLD = 0.5  # a boundary where p > 0.5 (the reference's argmax over (1 - p, p))


def is_boundary(boundary_prob: jax.Array) -> jax.Array:
    """The router's decision: p > 0.5, any shape -> bool."""
    return boundary_prob > BOUNDARY_THRESHOLD


class Routing(nnx.Module):
    """Learned boundary predictor: h (B, L, D) float32 -> boundary probability p (B, L) float32.

    q_t = W_q h_t, k_t = W_k h_t (W_q = W_k = identity at init, float32);
    p_t = clip((1 - cos(q_{t-1}, k_t)) / 2, 0, 1), and p_t = 1 at every document start.
    """

    def __init__(self, d_model: int):
        self.q_proj = param(jnp.eye(d_model, dtype=jnp.float32), ("embed", "embed_out"))
        self.k_proj = param(jnp.eye(d_model, dtype=jnp.float32), ("embed", "embed_out"))

    def __call__(self, hidden: jax.Array, doc_start: jax.Array) -> jax.Array:
        """hidden (B, L, D), doc_start (B, L) bool -> p (B, L) float32."""
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
    """x / max(|x|, 1e-12) (the reference's F.normalize), with a finite gradient at x = 0 (padding
    chunk slots hold zeros)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


# ---- Heuristic boundary rules (routing modes "space" and "stride:K") ----

# Bytes after which a word starts: ASCII whitespace and ASCII punctuation.
SEPARATOR_BYTES = frozenset(b" \t\n\r\x0b\x0c" + b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
SEPARATOR_TABLE = np.array([b in SEPARATOR_BYTES for b in range(256)])  # (256,) bool, indexed by byte


def space_boundaries(byte_ids: jax.Array) -> jax.Array:
    """(B, L) byte values -> (B, L) bool: True at the first byte of every word.

    A word starts at a byte that is not a separator (ASCII whitespace or punctuation) and follows
    a separator; position 0 always starts a chunk. So separators stay attached to the end of the
    preceding word ("hello, " | "world"). Bytes of a multi-byte UTF-8 character (lead 0xC0-0xF7,
    continuation 0x80-0xBF) are never separators, so a character is never split; text without
    separators (e.g. CJK) forms one long chunk.
    """
    is_separator = jnp.asarray(SEPARATOR_TABLE)[byte_ids]
    starts = ~is_separator[:, 1:] & is_separator[:, :-1]
    return jnp.pad(starts, ((0, 0), (1, 0)), constant_values=True)


def stride_boundaries(positions: jax.Array, stride: int) -> jax.Array:
    """Integer positions (any shape) -> bool, True at positions 0, K, 2K, ..."""
    return positions % stride == 0


# ---- Which boundaries become chunks: the capacity rule ----


RATE_UNIT = 4096  # chunk rates are whole multiples of 1 / RATE_UNIT, so the rule is integer arithmetic


@dataclass(frozen=True)
class CapacityRule:
    """How many chunks a document may have started by each of its positions: a token bucket.

    Chunk k of a document (k = 0, 1, ...) may start at document position u only while
    k < burst + rate * (u + 1), rate = rate_units / RATE_UNIT (= capacity_slack / N, at most 1).
    The same allowance then applies to the row over what the documents kept (chunk k of the row
    at row position t while k < burst + rate * (t + 1)), which binds only in rows packing several
    documents. So whether a position starts a chunk depends only on earlier positions, never on
    the row length, padding, an evaluation window or a cache size (prefix consistency), and a row
    of L positions never needs more than row_capacity(L) chunk slots. With rate 1 nothing is ever
    dropped: the exact setting.
    """

    rate_units: int
    burst: int
    multiple: int

    @property
    def is_exact(self) -> bool:
        return self.rate_units >= RATE_UNIT

    def allowance(self, doc_position):
        """ceil(burst + rate * (u + 1)) for document positions u: a Python int or an int32 array.

        Integer arithmetic only (split so that nothing overflows int32), so the parallel forward
        and the one-step decode compute exactly the same numbers.
        """
        count = doc_position + 1
        whole, part = count // RATE_UNIT, count % RATE_UNIT
        return self.burst + whole * self.rate_units + (part * self.rate_units + RATE_UNIT - 1) // RATE_UNIT

    def row_capacity(self, length: int) -> int:
        """Static chunk slots M for rows of `length` positions (at most `length`)."""
        if self.is_exact:
            return length
        return min(length, round_up(self.allowance(length - 1), self.multiple))

    @classmethod
    def for_stage(cls, config: ModelConfig, stage: int) -> "CapacityRule":
        """The rule of chunking stage `stage`: rate = capacity_slack / N_stage (1 for "exact")."""
        if config.capacity_slack == EXACT:
            rate_units = RATE_UNIT
        else:
            rate_units = min(RATE_UNIT, math.ceil(config.capacity_slack / config.ratio(stage) * RATE_UNIT))
        return cls(rate_units=rate_units, burst=config.capacity_burst, multiple=config.capacity_multiple)


def stage_lengths(config: ModelConfig, length: int) -> list[int]:
    """Static sequence length at each stage (outermost first) for rows of `length` positions."""
    lengths = [length]
    for stage in range(config.depth):
        lengths.append(CapacityRule.for_stage(config, stage).row_capacity(lengths[-1]))
    return lengths


def capacity_is_exact(config: ModelConfig) -> bool:
    """True when no chunking stage of the model can ever drop a boundary."""
    return all(CapacityRule.for_stage(config, s).is_exact for s in range(config.depth))


def _min_with_zero(values: jax.Array, segment_index: jax.Array | None) -> jax.Array:
    """min(0, running minimum of `values` (B, L) int32 along axis 1 within each segment).

    segment_index (B, L): non-decreasing segment numbers (None: one segment per row). Cheap to
    compile: one plain cummin. Clipping at 0 bounds the values to [-L, 0], so subtracting
    segment number * (L + 1) makes every earlier segment's values larger than all of the
    current one's; the running minimum then sees only the current segment. Exact in int32 while
    L * (L + 1) fits; longer rows take an associative scan.
    """
    clipped = jnp.minimum(values, 0)
    if segment_index is None:
        return jax.lax.cummin(clipped, axis=1)
    length = values.shape[1]
    if length * (length + 1) < 2**31 - 1:
        offset = segment_index * (length + 1)
        return jax.lax.cummin(clipped - offset, axis=1) + offset
    start = jnp.pad(segment_index[:, 1:] != segment_index[:, :-1], ((0, 0), (1, 0)), constant_values=True)

    def combine(left, right):
        value_l, start_l = left
        value_r, start_r = right
        return jnp.where(start_r, value_r, jnp.minimum(value_l, value_r)), start_l | start_r

    return jax.lax.associative_scan(combine, (clipped, start), axis=1)[0]


def bucket_counts(boundary_mask: jax.Array, segments: Segments | None, rule: CapacityRule) -> jax.Array:
    """Chunks the capacity rule keeps: (B, L) bool boundaries -> (B, L) int32 kept count of the
    position's segment (its document, or the whole row for segments=None) up to each position.

    Keeping greedily, kept_t = min(kept_{t-1} + b_t, A_t) with the allowance A_t = rule.allowance
    non-decreasing; unrolled, kept_t = S_t + min(0, min_{s<=t} (A_s - S_s)) with S the segment's
    running count of boundaries: a cumsum and a cummin, no sequential scan over L.
    """
    counts = jnp.cumsum(boundary_mask, axis=1, dtype=jnp.int32)
    row_position = jnp.arange(boundary_mask.shape[1], dtype=jnp.int32)
    if segments is None:
        running, position, index = counts, jnp.broadcast_to(row_position, counts.shape), None
    else:  # subtract the count before the segment began
        begin = row_position - segments.position
        before = jnp.take_along_axis(counts - boundary_mask, begin, axis=1)
        running, position, index = counts - before, segments.position, segments.index
    return running + _min_with_zero(rule.allowance(position) - running, index)


def _increments(counts: jax.Array, start: jax.Array) -> jax.Array:
    """(B, L) running counts that restart where `start` ((B, L) or (L,)) -> bool, True where the count went up."""
    previous = jnp.where(start, 0, jnp.pad(counts[:, :-1], ((0, 0), (1, 0))))
    return counts > previous


def bucket_keeps(previous_count: jax.Array, boundary: jax.Array, position: jax.Array, rule: CapacityRule) -> jax.Array:
    """The step form of bucket_counts: whether a boundary (B,) at segment position `position` (B,)
    is kept, given the chunks previous_count (B,) its segment kept before."""
    return boundary & (previous_count + 1 <= rule.allowance(position))


@struct.dataclass
class ChunkLayout:
    """Which positions start chunks and where the chunks live in the static M slots.

    chunk_mask: (B, L) bool, the position starts a chunk; doc_chunks: (B, L) int32, chunks the
    document-level rule kept in the position's document so far (the decode cache's counter);
    chunk_position: (B, M) int32, the input position of each chunk (L for an empty slot);
    chunk_valid: (B, M) bool, the slot holds a chunk; plug_index: (B, L) int32, the chunk each
    position belongs to (the last one starting at or before it); dropped: (B,) int32, boundaries
    that did not become chunks.
    """

    chunk_mask: jax.Array
    doc_chunks: jax.Array
    chunk_position: jax.Array
    chunk_valid: jax.Array
    plug_index: jax.Array
    dropped: jax.Array


def chunk_layout(boundary_mask: jax.Array, segments: Segments, rule: CapacityRule, capacity: int) -> ChunkLayout:
    """(B, L) bool boundaries -> ChunkLayout under the capacity rule, in two levels:

    1. per document: chunk k may start at document position u while k < burst + rate (u + 1);
    2. per row, over what step 1 kept: chunk k of the row may start at row position t while
       k < burst + rate (t + 1). A row holding one document never loses anything here; a row
       packing several can (their bursts add up), and it still only looks at positions <= t.
    Both levels depend only on earlier positions, so the chunks of a prefix never depend on the
    row length, and `capacity` = rule.row_capacity(L) slots always hold every chunk.
    """
    batch, length = boundary_mask.shape
    doc_chunks = bucket_counts(boundary_mask, segments, rule)
    doc_kept = _increments(doc_chunks, segments.start)
    row_chunks = bucket_counts(doc_kept, None, rule)
    chunk_mask = _increments(row_chunks, jnp.arange(length) == 0)
    chunk_id = row_chunks - 1  # (B, L): the chunk each position belongs to; below capacity by the rule
    row_position = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    slot = jnp.where(chunk_mask, chunk_id, capacity)  # positions without a chunk are dropped by the scatter
    chunk_position = jnp.full((batch, capacity), length, jnp.int32)
    chunk_position = chunk_position.at[jnp.arange(batch)[:, None], slot].set(row_position, mode="drop")
    return ChunkLayout(
        chunk_mask=chunk_mask,
        doc_chunks=doc_chunks,
        chunk_position=chunk_position,
        chunk_valid=chunk_position < length,
        plug_index=jnp.clip(chunk_id, 0, capacity - 1),
        dropped=jnp.sum(boundary_mask & ~chunk_mask, axis=1, dtype=jnp.int32),
    )


# ---- Chunk and dechunk ----


def gather_chunks(values: jax.Array, layout: ChunkLayout) -> jax.Array:
    """values (B, L, ...) -> (B, M, ...): the value at each chunk's position (empty slots repeat the last position)."""
    length = values.shape[1]
    index = jnp.minimum(layout.chunk_position, length - 1)
    index = index.reshape(index.shape + (1,) * (values.ndim - 2))
    return jnp.take_along_axis(values, index, axis=1)


def ema_weights(boundary_prob: jax.Array, doc_start: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-> (P, decay) float32, any shape: a chunk's EMA weight P, its boundary probability clipped
    to [1e-4, 1 - 1e-4] (as the reference: a document's first chunk, p = 1, has P = 1 - 1e-4), and
    the weight 1 - P of the previous output, 0 at a document start: nothing of the previous
    document leaks in (the reference's state reset)."""
    prob = jnp.clip(boundary_prob.astype(jnp.float32), PROB_CLIP, 1.0 - PROB_CLIP)
    return prob, jnp.where(doc_start, 0.0, 1.0 - prob)


def ema_smooth(chunk_values: jax.Array, chunk_prob: jax.Array, chunk_doc_start: jax.Array) -> jax.Array:
    """Smoothing over chunks: out_k = P_k z_k + (1 - P_k) out_{k-1}, restarting at document
    starts (ema_weights).

    chunk_values (B, M, D), chunk_prob and chunk_doc_start (B, M) -> float32 (B, M, D). A linear
    recurrence, so it runs as an associative scan with combine((a1, u1), (a2, u2)) = (a1 a2, a2 u1 + u2).
    """
    prob, decay = ema_weights(chunk_prob, chunk_doc_start)
    decay, update = decay[..., None], prob[..., None] * chunk_values.astype(jnp.float32)

    def combine(left, right):
        decay_l, update_l = left
        decay_r, update_r = right
        return decay_l * decay_r, decay_r * update_l + update_r

    _, smoothed = jax.lax.associative_scan(combine, (decay, update), axis=1)
    return smoothed


def ema_step(previous: jax.Array, chunk_value: jax.Array, boundary_prob: jax.Array, doc_start: jax.Array) -> jax.Array:
    """One step of ema_smooth: previous (B, D), chunk_value (B, D), boundary_prob and doc_start (B,) -> (B, D)."""
    prob, decay = ema_weights(boundary_prob, doc_start)
    return prob[:, None] * chunk_value.astype(jnp.float32) + decay[:, None] * previous


def dechunk(
    chunk_values: jax.Array, chunk_prob: jax.Array, chunk_doc_start: jax.Array, layout: ChunkLayout
) -> jax.Array:
    """Chunk outputs (B, M, D) -> float32 (B, L, D): smooth, then each position takes its chunk's value."""
    smoothed = ema_smooth(chunk_values, chunk_prob, chunk_doc_start)
    return jnp.take_along_axis(smoothed, layout.plug_index[..., None], axis=1)


def confidence(boundary_prob: jax.Array, chunk_mask: jax.Array) -> jax.Array:
    """c_t = p_t where a chunk starts, else 1 - p_t (any shape)."""
    return jnp.where(chunk_mask, boundary_prob, 1.0 - boundary_prob)


def straight_through(confidence: jax.Array) -> jax.Array:
    """1 in the forward pass; passes the gradient to `confidence` in the backward pass."""
    return 1.0 + confidence - jax.lax.stop_gradient(confidence)


def ratio_loss(boundary_mask: jax.Array, boundary_prob: jax.Array, valid: jax.Array, target: float):
    """L = N/(N-1) ((N-1) F G + (1-F)(1-G)), F = fraction selected, G = mean p, over valid positions.

    Minimum 1 at F = G = 1/N. F counts the router's boundaries (before the capacity rule), so the
    loss regulates what the router wants. (B, L) inputs -> (L, F, G), scalars float32.
    """
    valid = valid.astype(jnp.float32)
    count = jnp.maximum(valid.sum(), 1.0)
    selected = jnp.sum(boundary_mask * valid) / count
    mean_prob = jnp.sum(boundary_prob * valid) / count
    n = target
    loss = n / (n - 1.0) * ((n - 1.0) * selected * mean_prob + (1.0 - selected) * (1.0 - mean_prob))
    return loss, selected, mean_prob
