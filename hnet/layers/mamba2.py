"""Mamba2 mixer in pure JAX: projections, causal depthwise conv, the SSD recurrence, gated norm.

Shapes: B batch, L length, D width, H heads, P head dim (64), S state size, Q scan chunk size.
The SSD recurrence is hnet.layers.kernels.ssd: its chunked scan does its matmuls in the model dtype
(bfloat16 in a bf16 model) and keeps the decays, the carried state and every other sum in float32.
For generation a layer keeps a MambaCache: the last K-1 conv inputs and the SSM state.
Each document of a packed row is computed as if alone: the conv does not reach across a document
start and the scan's state resets there (hnet.segments).

docs/ARCHITECTURE.md section 1 has the equations.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from hnet.config import SSMConfig
from hnet.layers.common import INIT_STD, linear, param
from hnet.layers.kernels.ssd import ssd_scan, ssd_step
from hnet.layers.norm import RMSNorm
from hnet.segments import Segments, at_positions


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
        self.in_proj = linear(
            d_model, self.d_inner + conv_dim + self.num_heads, ("embed", "mamba_in"), rngs, dtype=dtype
        )
        # Depthwise conv init as PyTorch's Conv1d default: U(-1/sqrt(K), 1/sqrt(K)).
        bound = 1.0 / math.sqrt(ssm.d_conv)
        self.conv_weight = param(
            jax.random.uniform(rngs.params(), (ssm.d_conv, conv_dim), jnp.float32, -bound, bound),
            ("conv", "mamba_conv"),
        )
        self.conv_bias = param(
            jax.random.uniform(rngs.params(), (conv_dim,), jnp.float32, -bound, bound), ("mamba_conv",)
        )
        # dt in [1e-3, 0.1], log-uniform; dt_bias is its inverse softplus.
        log_dt = jax.random.uniform(rngs.params(), (self.num_heads,), jnp.float32, math.log(1e-3), math.log(0.1))
        dt = jnp.maximum(jnp.exp(log_dt), 1e-4)
        self.dt_bias = param(dt + jnp.log(-jnp.expm1(-dt)), ("ssm_heads",))
        self.A_log = param(
            jnp.log(jax.random.uniform(rngs.params(), (self.num_heads,), jnp.float32, 1.0, 16.0)), ("ssm_heads",)
        )
        self.D = param(jnp.ones((self.num_heads,), jnp.float32), ("ssm_heads",))
        self.norm = RMSNorm(self.d_inner, axis_name="mamba_inner")
        self.out_proj = linear(
            self.d_inner, d_model, ("mamba_inner", "embed"), rngs, dtype=dtype, std=INIT_STD * out_scale
        )

    def split_projection(self, zxbcdt: jax.Array):
        """in_proj output (..., Di + Di + 2S + H) -> z (..., Di), xBC (..., Di + 2S), dt_raw (..., H)."""
        conv_dim = self.d_inner + 2 * self.d_state
        return (
            zxbcdt[..., : self.d_inner],
            zxbcdt[..., self.d_inner : self.d_inner + conv_dim],
            zxbcdt[..., self.d_inner + conv_dim :],
        )

    def ssm_inputs(self, xBC: jax.Array, dt_raw: jax.Array):
        """Conv-activated xBC (..., Di + 2S) and raw dt -> x (..., H, P), dt (..., H), A (H,), B, C (..., S)."""
        x = xBC[..., : self.d_inner]
        B = xBC[..., self.d_inner : self.d_inner + self.d_state]
        C = xBC[..., self.d_inner + self.d_state :]
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

    def forward(self, hidden: jax.Array, segments: Segments, lengths: jax.Array | None = None):
        """hidden (B, L, D) -> (y (B, L, D), MambaCache or None), each document on its own.

        With `lengths` (B,) (each row's real length; the rest is right padding) also returns the
        cache after each row's last real position (a fixed-size state, whatever the length), ready
        for `step` (generation's prefill).
        """
        z, conv_input, dt_raw = self.split_projection(self.in_proj(hidden))
        xBC = jax.nn.silu(
            causal_depthwise_conv(conv_input, self.conv_weight[...], self.conv_bias[...], segments.position)
        )
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


@struct.dataclass
class MambaCache:
    """conv: (B, K-1, Di + 2S) the last conv inputs (oldest first); ssm: (B, H, P, S) float32 state."""

    conv: jax.Array
    ssm: jax.Array


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
        tap = padded[:, k : k + length, :]
        if reach:
            tap = jnp.where((doc_position >= reach)[..., None], tap, 0)
        out = out + tap * weight[k].astype(x.dtype)
    return out + bias.astype(x.dtype)
