"""Mamba2 mixer in pure JAX, with the SSD chunked scan (Dao & Gu 2024) in float32.

Shapes: B batch, L length, D width, H heads, P head dim (64), S state size, Q scan chunk size.
For generation a layer keeps a MambaCache: the last K-1 conv inputs and the SSM state.
Each document of a packed row is computed as if alone: the conv does not reach across a document
start and the scan's state resets there (hnet.segments).

docs/ARCHITECTURE.md section 1 has the equations.
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from hnet.config import SSMConfig
from hnet.layers.common import INIT_STD, linear, param
from hnet.layers.norm import RMSNorm
from hnet.segments import Segments, at_positions


def causal_depthwise_conv(x: jax.Array, weight: jax.Array, bias: jax.Array, doc_position: jax.Array) -> jax.Array:
    """x (B, L, C), weight (K, C), bias (C,), doc_position (B, L) -> (B, L, C).

    Output t sees inputs t-K+1 .. t of its own document: a tap that would reach before the
    document's start reads zero, as if the document were alone (zero left padding).
    """
    kernel = weight.shape[0]
    length = x.shape[1]
    padded = jnp.pad(x, ((0, 0), (kernel - 1, 0), (0, 0)))
    out = 0
    for k in range(kernel):
        reach = kernel - 1 - k  # how many positions back tap k reads
        tap = padded[:, k:k + length, :]
        if reach:
            tap = jnp.where((doc_position >= reach)[..., None], tap, 0)
        out = out + tap * weight[k].astype(x.dtype)
    return out + bias.astype(x.dtype)


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
    final_state, y = jax.lax.scan(
        functools.partial(_ssd_chunk, A=A), initial_state, (x, dt, B, C, segment, segment_in))
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


@struct.dataclass
class MambaCache:
    """conv: (B, K-1, Di + 2S) the last conv inputs (oldest first); ssm: (B, H, P, S) float32 state."""

    conv: jax.Array
    ssm: jax.Array


class Mamba2(nnx.Module):
    """(B, L, D) -> (B, L, D) Mamba2 mixer.

    in_proj D -> [z (Di), xBC (Di + 2S), dt (H)] with Di = expand*D and H = Di / head_dim; causal
    depthwise conv + SiLU on xBC; SSD scan with per-head scalar A = -exp(A_log), dt = softplus(dt +
    dt_bias), D skip; y <- RMSNorm(y * silu(z)); out_proj Di -> D.
    """

    def __init__(self, d_model: int, ssm: SSMConfig, *, dtype, out_scale: float, rngs: nnx.Rngs):
        self.dtype = dtype
        self.d_inner = ssm.expand * d_model
        self.num_heads = self.d_inner // ssm.head_dim
        self.head_dim, self.d_state, self.chunk_size = ssm.head_dim, ssm.d_state, ssm.chunk_size
        conv_dim = self.d_inner + 2 * ssm.d_state
        self.in_proj = linear(d_model, self.d_inner + conv_dim + self.num_heads, ("embed", "mamba_in"), rngs, dtype=dtype)
        # Depthwise conv init as PyTorch's Conv1d default: U(-1/sqrt(K), 1/sqrt(K)).
        bound = 1.0 / math.sqrt(ssm.d_conv)
        self.conv_weight = param(jax.random.uniform(rngs.params(), (ssm.d_conv, conv_dim), jnp.float32, -bound, bound), ("conv", "mamba_conv"))
        self.conv_bias = param(jax.random.uniform(rngs.params(), (conv_dim,), jnp.float32, -bound, bound), ("mamba_conv",))
        # dt in [1e-3, 0.1], log-uniform; dt_bias is its inverse softplus.
        log_dt = jax.random.uniform(rngs.params(), (self.num_heads,), jnp.float32, math.log(1e-3), math.log(0.1))
        dt = jnp.maximum(jnp.exp(log_dt), 1e-4)
        self.dt_bias = param(dt + jnp.log(-jnp.expm1(-dt)), ("ssm_heads",))
        self.A_log = param(jnp.log(jax.random.uniform(rngs.params(), (self.num_heads,), jnp.float32, 1.0, 16.0)), ("ssm_heads",))
        self.D = param(jnp.ones((self.num_heads,), jnp.float32), ("ssm_heads",))
        self.norm = RMSNorm(self.d_inner, axis_name="mamba_inner")
        self.out_proj = linear(self.d_inner, d_model, ("mamba_inner", "embed"), rngs, dtype=dtype, std=INIT_STD * out_scale)

    def split_projection(self, zxbcdt: jax.Array):
        """in_proj output (..., Di + Di + 2S + H) -> z (..., Di), xBC (..., Di + 2S), dt_raw (..., H)."""
        conv_dim = self.d_inner + 2 * self.d_state
        return zxbcdt[..., :self.d_inner], zxbcdt[..., self.d_inner:self.d_inner + conv_dim], zxbcdt[..., self.d_inner + conv_dim:]

    def ssm_inputs(self, xBC: jax.Array, dt_raw: jax.Array):
        """Conv-activated xBC (..., Di + 2S) and raw dt -> x (..., H, P), dt (..., H), A (H,), B, C (..., S)."""
        x = xBC[..., :self.d_inner]
        B = xBC[..., self.d_inner:self.d_inner + self.d_state]
        C = xBC[..., self.d_inner + self.d_state:]
        x = x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)
        dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + self.dt_bias[...])
        A = -jnp.exp(self.A_log[...])
        return x, dt, A, B, C

    def output(self, y: jax.Array, x: jax.Array, z: jax.Array) -> jax.Array:
        """SSM output y (..., H, P) float32 + D skip, gated norm, out_proj -> (..., D)."""
        y = y + self.D[...][:, None] * x.astype(jnp.float32)
        y = y.reshape(*y.shape[:-2], self.d_inner)
        y = self.norm(y * jax.nn.silu(z.astype(jnp.float32)))
        return self.out_proj(y.astype(self.dtype))

    def prefill(self, hidden: jax.Array, segments: Segments, lengths: jax.Array | None = None):
        """hidden (B, L, D) -> (y (B, L, D), MambaCache or None), each document on its own.

        With `lengths` (B,) (each row's real length; the rest is right padding) also returns the
        cache after each row's last real position (a fixed-size state, whatever the length).
        """
        z, conv_input, dt_raw = self.split_projection(self.in_proj(hidden))
        xBC = jax.nn.silu(causal_depthwise_conv(conv_input, self.conv_weight[...], self.conv_bias[...], segments.position))
        x, dt, A, B, C = self.ssm_inputs(xBC, dt_raw)
        if lengths is not None:  # dt = 0 on padding: the state passes through unchanged
            dt = jnp.where(jnp.arange(hidden.shape[1])[None, :, None] < lengths[:, None, None], dt, 0.0)
        y, final_state = ssd_scan(x, dt, A, B, C, self.chunk_size, segments.index)
        out = self.output(y, x, z)
        if lengths is None:
            return out, None
        # The conv inputs of the last K-1 positions that belong to the row's last document.
        kernel = self.conv_weight.shape[0]
        last = jnp.maximum(lengths - 1, 0)
        doc_begin = last - at_positions(segments.position, last)
        index = lengths[:, None] - (kernel - 1) + jnp.arange(kernel - 1)[None, :]  # (B, K-1)
        conv = jnp.take_along_axis(conv_input, jnp.clip(index, 0, hidden.shape[1] - 1)[..., None], axis=1)
        conv = jnp.where((index >= doc_begin[:, None])[..., None], conv, 0).astype(conv_input.dtype)
        return out, MambaCache(conv=conv, ssm=final_state)

    def step(self, hidden: jax.Array, cache: MambaCache, doc_start: jax.Array):
        """One new position per row: hidden (B, D), doc_start (B,) bool -> (y (B, D), updated MambaCache)."""
        z, conv_input, dt_raw = self.split_projection(self.in_proj(hidden))
        previous = jnp.where(doc_start[:, None, None], 0, cache.conv)  # a new document sees no earlier input
        window = jnp.concatenate([previous, conv_input[:, None]], axis=1)  # (B, K, Di + 2S)
        weight = self.conv_weight[...].astype(window.dtype)
        conv = 0
        for k in range(window.shape[1]):  # same order as the forward
            conv = conv + window[:, k] * weight[k]
        xBC = jax.nn.silu(conv + self.conv_bias[...].astype(window.dtype))
        x, dt, A, B, C = self.ssm_inputs(xBC, dt_raw)
        y, ssm = ssd_step(cache.ssm, x, dt, A, B, C, doc_start)
        return self.output(y, x, z), MambaCache(conv=window[:, 1:], ssm=ssm)
