"""The SSD (state-space duality) recurrence of Mamba2 (Dao & Gu 2024), per head h:

    state_t = exp(dt_t A_h) state_{t-1} + dt_t x_t ⊗ B_t,    y_t = state_t · C_t

with the state reset to zero at every document start. `ssd_scan` computes a whole sequence chunk by
chunk in matmul form (the parallel forward); `ssd_step` advances one position (decoding).

Precision: the scan's matmuls take their operands in the model dtype (bfloat16 in a bf16 model,
forward and backward); the decays, the carried state and every sum outside a matmul are float32.
The step runs in float32. The layer around it is hnet.layers.mamba2.
"""

import functools

import jax
import jax.numpy as jnp


def ssd_scan(x, dt, A, B, C, chunk_size: int, segment_index=None):
    """The selective state-space recurrence, computed chunk by chunk in matmul form.

    Per head h:  state_t = exp(dt_t A_h) state_{t-1} + dt_t x_t ⊗ B_t,   y_t = state_t · C_t,
    with the state reset to zero at every document start (mamba_ssm's `seq_idx` semantics), so
    no document sees another one.

    x: (B, L, H, P); dt: (B, L, H) (after softplus); A: (H,) negative; B, C: (B, L, S) shared by
    all heads; segment_index: (B, L) int32 document number of each position, non-decreasing
    along the row (None: one document).
    Returns y (B, L, H, P) and the final state (B, H, P, S) of each row's last document, float32.

    One lax.scan step per chunk of Q positions carries the state from chunk to chunk (see
    `_ssd_chunk`). Each step is rematerialised, so the backward pass keeps only the state entering
    each chunk (B, H, P, S) and the inputs. Matmuls are in x's dtype (bfloat16 in a bf16 model),
    everything else in float32 (see `_ssd_chunk`).
    """
    f32 = jnp.float32
    dt, A = dt.astype(f32), A.astype(f32)
    batch, length, heads, head_dim = x.shape
    d_state = B.shape[-1]
    if segment_index is None:
        segment_index = jnp.zeros((batch, length), jnp.int32)
    chunk = min(chunk_size, length)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if pad:  # dt = 0 on padding: decay 1 and no input, so the final state is unchanged.
        x, dt, B, C = (jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2)) for t in (x, dt, B, C))
        segment_index = jnp.pad(segment_index, ((0, 0), (0, pad)), mode="edge")
    # Chunk-major: (nc, B, Q, ...), the scan's leading axis.
    x = x.reshape(batch, n_chunks, chunk, heads, head_dim).swapaxes(0, 1)
    dt = dt.reshape(batch, n_chunks, chunk, heads).swapaxes(0, 1)
    B = B.reshape(batch, n_chunks, chunk, d_state).swapaxes(0, 1)
    C = C.reshape(batch, n_chunks, chunk, d_state).swapaxes(0, 1)
    segment = segment_index.reshape(batch, n_chunks, chunk).swapaxes(0, 1)
    # Document of the state entering each chunk: the previous chunk's last position (the first
    # chunk: its own first position).
    segment_in = jnp.concatenate([segment[:1, :, 0], segment[:-1, :, -1]], axis=0)  # (nc, B)
    initial_state = jnp.zeros((batch, heads, head_dim, d_state), f32)
    final_state, y = jax.lax.scan(functools.partial(_ssd_chunk, A=A), initial_state, (x, dt, B, C, segment, segment_in))
    y = y.swapaxes(0, 1).reshape(batch, n_chunks * chunk, heads, head_dim)[:, :length]
    return y, final_state


@jax.checkpoint
def _ssd_chunk(state, inputs, A):
    """One chunk of ssd_scan: (state entering it, inputs) -> (state at its end, y).

    state (B, H, P, S) float32; inputs x (B, Q, H, P), dt (B, Q, H), B, C (B, Q, S), segment
    (B, Q) document numbers, segment_in (B,) the document of the entering state; A (H,).
    y_i = sum over j <= i of the same document of (C_i·B_j) exp(log_decay_i - log_decay_j) dt_j x_j
          + exp(log_decay_i) C_i · state   (only where position i continues the entering document).

    Every matmul takes its operands in x's dtype and returns its product in it, so in a bf16
    model the backward pass's matmuls are bf16 too (XLA accumulates bf16 matmuls in float32 on
    GPU and TPU). The decays, the carried state and every sum outside a matmul stay float32; they
    are rounded to bf16 only where they enter one, as in mamba_ssm's kernels.
    """
    x, dt, B, C, segment, segment_in = inputs
    f32, operand = jnp.float32, x.dtype

    def matmul(spec, a, b):
        return jnp.einsum(spec, a.astype(operand), b.astype(operand)).astype(f32)

    chunk = x.shape[1]
    log_decay = jnp.cumsum(dt * A, axis=1)  # (B, Q, H): sum of dt*A up to and including i
    # Within the chunk: a (B, Q, Q, H) decay and weight tensor of this chunk only.
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))[None]
    visible = causal & (segment[:, :, None] == segment[:, None, :])  # (B, Qi, Qj)
    segsum = log_decay[:, :, None, :] - log_decay[:, None, :, :]  # (B, Qi, Qj, H)
    decay = jnp.exp(jnp.where(visible[..., None], segsum, -jnp.inf))
    weights = matmul("bis,bjs->bij", C, B)[..., None] * decay * dt[:, None, :, :]
    y = matmul("bijh,bjhp->bihp", weights, x)
    # The entering state reaches the positions of its own document only.
    carried_decay = jnp.where((segment == segment_in[:, None])[..., None], jnp.exp(log_decay), 0.0)  # (B, Q, H)
    y = y + matmul("bis,bhps->bihp", C, state) * carried_decay[..., None]
    # The state at the chunk's end: what its last document added, plus the entering state unless
    # a document starts inside the chunk (that cuts it off).
    chunk_last = segment[:, -1]
    in_last_doc = (segment == chunk_last[:, None])[..., None]  # (B, Q, 1)
    decay_to_end = jnp.where(in_last_doc, jnp.exp(log_decay[:, -1:, :] - log_decay), 0.0)  # (B, Q, H)
    added = matmul("bjs,bjhp->bhps", B, x * (decay_to_end * dt)[..., None])
    chunk_decay = jnp.where((chunk_last == segment_in)[:, None], jnp.exp(log_decay[:, -1, :]), 0.0)  # (B, H)
    return chunk_decay[:, :, None, None] * state + added, y


def ssd_step(state, x, dt, A, B, C, doc_start):
    """One recurrence step. state (B, H, P, S), x (B, H, P), dt (B, H), B/C (B, S), doc_start (B,)
    bool (the state resets first) -> (y (B, H, P), state)."""
    f32 = jnp.float32
    x, dt, B, C = (t.astype(f32) for t in (x, dt, B, C))
    decay = jnp.where(doc_start[:, None], 0.0, jnp.exp(dt * A.astype(f32)))
    state = decay[:, :, None, None] * state + (dt[:, :, None] * x)[..., None] * B[:, None, None, :]
    y = jnp.einsum("bhps,bs->bhp", state, C)
    return y, state
