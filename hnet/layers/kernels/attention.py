"""Causal attention within the documents of a row, as one function with three paths:

    causal_attention(q, k, v, segment_index, window)   q (B, L, H, Dh); k, v (B, L, Hkv, Dh)

- `attend` with the whole (B, L, L) mask (`attention_mask`) for rows of up to QUERY_BLOCK positions
  (and for the one query of a decoding step);
- `blockwise_attention`: a flash-style online softmax over query blocks in plain JAX, with its own
  backward pass (a custom VJP, FlashAttention's), so no L x L array exists;
- `pallas_causal_attention`: jax's Pallas flash-attention kernel, for global layers on a GPU.

Softmax scale 1/sqrt(Dh), float32 softmax; keys of other documents and, for a window w >= 0, keys
more than w positions back are hidden. The layer around it is hnet.layers.attention.
"""

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

QUERY_BLOCK = 256  # queries per block of the blockwise path (see causal_attention)
# Which path causal_attention takes: "auto" (below), "plain", "blockwise" or "pallas". Settable
# with the HNET_ATTENTION environment variable, e.g. to fall back to "blockwise" on a GPU.
ATTENTION_IMPL = os.environ.get("HNET_ATTENTION", "auto")
PALLAS_BLOCK = 128  # the Pallas kernel's query/key block; rows are padded to a multiple of it


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_index: jax.Array, window: int, block_size: int | None = None
) -> jax.Array:
    """Causal attention within the documents of a row: each query sees the keys of its own
    document at positions j <= i (and i - j <= window unless window < 0).

    q: (B, L, H, Dh); k, v: (B, L, Hkv, Dh); segment_index: (B, L) int32. Returns (B, L, H, Dh).

    Paths (ATTENTION_IMPL, "auto" by default): rows of up to `block_size` (default QUERY_BLOCK)
    positions use `attend` with the whole mask; on a GPU, longer rows of global layers use the
    segment-aware Pallas flash-attention kernel (pallas_causal_attention). Other long rows use
    blockwise_attention: an online softmax over query blocks of `block_size`, one block of scores
    live at a time, in the forward and the backward pass.
    """
    length = q.shape[1]
    block_size = QUERY_BLOCK if block_size is None else block_size
    impl = ATTENTION_IMPL
    if impl == "auto":
        impl = (
            "plain"
            if length <= block_size
            else "pallas"
            if window < 0 and jax.default_backend() == "gpu"
            else "blockwise"
        )
    if impl == "pallas":
        if window >= 0:
            raise ValueError("the Pallas attention kernel has no sliding window; use HNET_ATTENTION=blockwise")
        return pallas_causal_attention(q, k, v, segment_index)
    if impl == "plain" or length <= block_size:
        return attend(q, k, v, attention_mask(jnp.arange(length), segment_index, window))
    return blockwise_attention(q, k, v, segment_index, window, block_size)


def attention_mask(positions: jax.Array, segment_index: jax.Array, window: int) -> jax.Array:
    """Boolean (B, L, L): key j is visible to query i when j <= i, (window < 0 or i - j <= window)
    and both are in the same document. positions (L,) int; segment_index (B, L) int32."""
    delta = positions[:, None] - positions[None, :]
    visible = delta >= 0
    if window >= 0:
        visible &= delta <= window
    same_document = segment_index[:, :, None] == segment_index[:, None, :]
    return visible[None] & same_document


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked softmax attention with a float32 softmax.

    q: (B, Lq, H, Dh); k, v: (B, Lk, Hkv, Dh) with H a multiple of Hkv; mask: (B, Lq, Lk) bool
    (every query sees at least itself). Returns (B, Lq, H, Dh) in q's dtype.
    """
    batch, q_len, heads, head_dim = q.shape
    mask = mask[:, None, None]  # broadcast over (kv heads, group)
    kv_heads = k.shape[2]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim**-0.5)
    scores = jnp.where(mask, scores, -1e30)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", weights, v)
    return out.reshape(batch, q_len, heads, head_dim)


def pallas_causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_index: jax.Array,
    block: int = PALLAS_BLOCK,
    interpret: bool = False,
) -> jax.Array:
    """Global causal attention within documents with jax's Pallas flash-attention kernel for GPUs
    (jax.experimental.pallas.ops.gpu.attention.mha: online softmax, segment ids, its own
    backward). Shapes as causal_attention. KV heads are repeated to the query heads (the kernel
    has no grouping); the row is padded to a multiple of `block` with a segment id of its own, so
    padding is never visible to real positions. interpret=True runs it on any backend (tests).
    """
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    batch, length, heads, head_dim = q.shape
    group = heads // k.shape[2]
    k, v = (jnp.repeat(t, group, axis=2) for t in (k, v))
    pad = -length % block
    if pad:
        q, k, v = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (q, k, v))
        segment_index = jnp.pad(segment_index, ((0, 0), (0, pad)), constant_values=-1)
    sizes = pallas_attention.BlockSizes(
        block_q=block,
        block_k=block,
        block_q_dkv=min(32, block),
        block_kv_dkv=min(32, block),
        block_q_dq=min(32, block),
        block_kv_dq=min(32, block),
    )
    out = pallas_attention.mha(
        q,
        k,
        v,
        segment_index.astype(jnp.int32),
        sm_scale=head_dim**-0.5,
        causal=True,
        block_sizes=sizes,
        interpret=interpret,
    )
    return out[:, :length]


def blockwise_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_index: jax.Array, window: int, block: int
) -> jax.Array:
    """Flash-style attention in plain JAX: query blocks of `block` positions, each with an online
    softmax over the key blocks its causal window reaches. Shapes as causal_attention.

    Forward (`_blockwise_forward`): work items one after the other (lax.map), the key blocks of an
    item in a lax.scan inside, so memory is O(L x block) per layer, never L x L. No block is
    skipped at run time, so the step's static FLOP count is what runs:
    - a windowed layer: one item per query block, visiting the ceil(window / block) + 1 key blocks
      its window reaches (blocks before the row start are masked);
    - a global layer: query blocks i and n - 1 - i form one item (the row is padded to an even
      number of blocks), visiting the i + 1 and n - i key blocks at or before them: n + 1 blocks
      for every item, n (n + 1) / 2 in all, the causal triangle and nothing more.
    Backward (`_blockwise_backward`, a custom VJP): the forward keeps only its output and each
    query's log-sum-exp (named ATTENTION_RESIDUALS, so a rematerialised block can keep them
    instead of running the forward again); one lax.scan over the (query block, key block) pairs
    that hold a visible key recomputes that pair's scores and adds its share of dq, dk and dv:
    5 matmuls per pair, against 2 in the forward.
    """
    return _blockwise(q, k, v, segment_index, window, block)


# checkpoint_name of the forward's residuals: remat=block keeps them (hnet.layers.isotropic).
ATTENTION_RESIDUALS = ("attention_out", "attention_lse")


class _Blocks(NamedTuple):
    """A row cut into `count` blocks of `size` (padded: padded keys get segment id -1, never
    visible to real queries). q: (B, n, Qb, Hkv, G, Dh); k, v: (B, n, Kb, Hkv, Dh); segment: (B, n, Qb)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    segment: jax.Array
    count: int
    size: int


def _cut_into_blocks(q, k, v, segment_index, window: int, block: int) -> _Blocks:
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    padded = -(-length // block) * block
    if window < 0:
        padded = -(-padded // (2 * block)) * 2 * block  # an even number of blocks to pair up
    pad = padded - length
    if pad:
        q, k, v = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (q, k, v))
        segment_index = jnp.pad(segment_index, ((0, 0), (0, pad)), constant_values=-1)
    count = padded // block
    return _Blocks(
        q=q.reshape(batch, count, block, kv_heads, heads // kv_heads, head_dim),
        k=k.reshape(batch, count, block, kv_heads, head_dim),
        v=v.reshape(batch, count, block, kv_heads, head_dim),
        segment=segment_index.reshape(batch, count, block),
        count=count,
        size=block,
    )


def _block_scores(blocks: _Blocks, i, j, window: int):
    """Scaled scores of query block i against key block j (j < 0: nothing visible) and their mask.
    -> (q_i (B, Qb, Hkv, G, Dh), k_j, v_j (B, Kb, Hkv, Dh), scores (B, Hkv, G, Qb, Kb) float32 with
    -inf where hidden, mask (B, 1, 1, Qb, Kb))."""
    take = lambda a, index: jax.lax.dynamic_index_in_dim(a, index, axis=1, keepdims=False)
    size = blocks.size
    j_safe = jnp.maximum(j, 0)
    q_i, k_j, v_j = take(blocks.q, i), take(blocks.k, j_safe), take(blocks.v, j_safe)
    delta = (i * size + jnp.arange(size))[:, None] - (j * size + jnp.arange(size))[None, :]
    visible = (delta >= 0) & (j >= 0)
    if window >= 0:
        visible &= delta <= window
    mask = (visible[None] & (take(blocks.segment, i)[:, :, None] == take(blocks.segment, j_safe)[:, None, :]))[
        :, None, None
    ]
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q_i, k_j, preferred_element_type=jnp.float32) * q_i.shape[-1] ** -0.5
    return q_i, k_j, v_j, jnp.where(mask, scores, -jnp.inf), mask


def _blockwise_forward(q, k, v, segment_index, window: int, block: int):
    """-> (out (B, L, H, Dh) in q's dtype, lse (n, B, Hkv, G, Qb) float32: log-sum-exp of each
    query's visible scores, by query block)."""
    batch, length, heads, head_dim = q.shape
    blocks = _cut_into_blocks(q, k, v, segment_index, window, block)
    kv_heads, group = blocks.k.shape[3], heads // blocks.k.shape[3]

    def empty_state():
        return (
            jnp.full((batch, kv_heads, group, block), -jnp.inf, jnp.float32),
            jnp.zeros((batch, kv_heads, group, block), jnp.float32),
            jnp.zeros((batch, kv_heads, group, block, head_dim), jnp.float32),
        )

    def attend_block(state, i, j):
        """Online-softmax update of query block i's state with key block j."""
        running_max, total, acc = state
        _, _, v_j, scores, _ = _block_scores(blocks, i, j, window)
        new_max = jnp.maximum(running_max, scores.max(axis=-1))
        safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)  # rows with nothing visible yet
        weights = jnp.exp(scores - safe_max[..., None])
        rescale = jnp.exp(running_max - safe_max)
        total = total * rescale + weights.sum(axis=-1)
        acc = acc * rescale[..., None] + jnp.einsum(
            "bkgqs,bskd->bkgqd", weights.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32
        )
        return new_max, total, acc

    def finish(state):
        running_max, total, acc = state
        out = acc / total[..., None]  # every query sees itself: total > 0
        return out.transpose(0, 3, 1, 2, 4).astype(q.dtype), running_max + jnp.log(total)

    n = blocks.count
    if window >= 0:
        reach = min(n, -(-window // block) + 1)  # key blocks a query block's window reaches

        def query_block(i):
            step = lambda state, offset: (attend_block(state, i, i - offset), None)
            return finish(jax.lax.scan(step, empty_state(), jnp.arange(reach))[0])

        out, lse = jax.lax.map(query_block, jnp.arange(n))  # (n, B, Qb, Hkv, G, Dh)
    else:

        def query_pair(p):
            """Query blocks p (key blocks 0..p) and n-1-p (key blocks 0..n-1-p): n + 1 steps."""
            first, second = p, n - 1 - p

            def step(carry, t):
                state, first_state = carry
                switch = t == first + 1  # the first block is done: keep its state, start the second
                select = lambda new, old: jax.tree.map(lambda a, b: jnp.where(switch, a, b), new, old)
                first_state, state = select(state, first_state), select(empty_state(), state)
                in_first = t <= first
                i = jnp.where(in_first, first, second)
                j = jnp.where(in_first, t, t - first - 1)
                return (attend_block(state, i, j), first_state), None

            state, first_state = jax.lax.scan(step, (empty_state(), empty_state()), jnp.arange(n + 1))[0]
            return finish(first_state), finish(state)

        (out_firsts, lse_firsts), (out_seconds, lse_seconds) = jax.lax.map(query_pair, jnp.arange(n // 2))
        out = jnp.concatenate([out_firsts, out_seconds[::-1]], axis=0)  # blocks in order
        lse = jnp.concatenate([lse_firsts, lse_seconds[::-1]], axis=0)
    out = out.transpose(1, 0, 2, 3, 4, 5).reshape(batch, n * block, heads, head_dim)
    return out[:, :length], lse


def _visible_pairs(count: int, size: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(query block, key block) index arrays of every pair of blocks that holds a visible key."""
    reach = count if window < 0 else min(count, -(-window // size) + 1)
    pairs = [(i, j) for i in range(count) for j in range(max(0, i - reach + 1), i + 1)]
    return np.array([i for i, _ in pairs], np.int32), np.array([j for _, j in pairs], np.int32)


def _blockwise_backward(window: int, block: int, residuals, d_out):
    """The VJP of _blockwise_forward from its output and log-sum-exp (FlashAttention's backward):
    per pair, P = exp(S - lse), dv += Pᵀ dO, dS = P (dO Vᵀ - rowsum(dO ∘ O)), dq += dS k, dk += dSᵀ q."""
    q, k, v, segment_index, out, lse = residuals
    batch, length, heads, head_dim = q.shape
    blocks = _cut_into_blocks(q, k, v, segment_index, window, block)
    n, kv_heads = blocks.count, blocks.k.shape[3]
    scale = head_dim**-0.5
    pad = n * block - length
    # rowsum(dO ∘ O) per query, and dO, in the block layout of the scores (B, n, Hkv, G, Qb).
    d_out_blocks = jnp.pad(d_out, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(blocks.q.shape)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    delta = jnp.pad(delta, ((0, 0), (0, pad), (0, 0))).reshape(batch, n, block, kv_heads, -1).transpose(0, 1, 3, 4, 2)

    def add_at(total, index, part):
        return jax.lax.dynamic_update_index_in_dim(
            total, jax.lax.dynamic_index_in_dim(total, index, axis=1, keepdims=False) + part, index, axis=1
        )

    def pair_step(grads, pair):
        dq, dk, dv = grads
        i, j = pair
        q_i, k_j, v_j, scores, mask = _block_scores(blocks, i, j, window)
        lse_i = jax.lax.dynamic_index_in_dim(lse, i, axis=0, keepdims=False)  # (B, Hkv, G, Qb)
        d_out_i = jax.lax.dynamic_index_in_dim(d_out_blocks, i, axis=1, keepdims=False)  # (B, Qb, Hkv, G, Dh)
        delta_i = jax.lax.dynamic_index_in_dim(delta, i, axis=1, keepdims=False)
        probs = jnp.where(mask, jnp.exp(scores - lse_i[..., None]), 0.0)  # (B, Hkv, G, Qb, Kb)
        dv_j = jnp.einsum("bkgqs,bqkgd->bskd", probs.astype(d_out.dtype), d_out_i, preferred_element_type=jnp.float32)
        d_probs = jnp.einsum("bqkgd,bskd->bkgqs", d_out_i, v_j, preferred_element_type=jnp.float32)
        d_scores = (probs * (d_probs - delta_i[..., None]) * scale).astype(q.dtype)
        dq_i = jnp.einsum("bkgqs,bskd->bqkgd", d_scores, k_j, preferred_element_type=jnp.float32)
        dk_j = jnp.einsum("bkgqs,bqkgd->bskd", d_scores, q_i, preferred_element_type=jnp.float32)
        return (add_at(dq, i, dq_i), add_at(dk, j, dk_j), add_at(dv, j, dv_j)), None

    zeros = lambda a: jnp.zeros(a.shape, jnp.float32)
    (dq, dk, dv), _ = jax.lax.scan(
        pair_step, (zeros(blocks.q), zeros(blocks.k), zeros(blocks.v)), _visible_pairs(n, block, window)
    )
    unblock = lambda grad, like: grad.reshape(batch, n * block, *like.shape[2:])[:, :length].astype(like.dtype)
    return (unblock(dq, q), unblock(dk, k), unblock(dv, v), np.zeros(segment_index.shape, jax.dtypes.float0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise(q, k, v, segment_index, window: int, block: int):
    return _blockwise_forward(q, k, v, segment_index, window, block)[0]


def _blockwise_with_residuals(q, k, v, segment_index, window: int, block: int):
    out, lse = _blockwise_forward(q, k, v, segment_index, window, block)
    out, lse = (checkpoint_name(value, name) for value, name in zip((out, lse), ATTENTION_RESIDUALS))
    return out, (q, k, v, segment_index, out, lse)


_blockwise.defvjp(_blockwise_with_residuals, _blockwise_backward)
