"""Layer-level equivalences: SSD scan vs recurrence, attention vs a naive loop, RoPE, RMSNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hnet.config import SSMConfig
from hnet.layers.attention import attend, attention_mask, rotary_embedding, CausalSelfAttention
from hnet.layers.mamba2 import Mamba2, causal_depthwise_conv, ssd_scan, ssd_step
from hnet.layers.mlp import SwiGLU
from flax import nnx


def random_ssm_inputs(seed, batch=2, length=37, heads=3, head_dim=4, d_state=5):
    keys = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(keys[0], (batch, length, heads, head_dim))
    dt = jax.nn.softplus(jax.random.normal(keys[1], (batch, length, heads)) - 1.0)
    A = -jnp.exp(jax.random.normal(keys[2], (heads,)))
    B = jax.random.normal(keys[3], (batch, length, d_state))
    C = jax.random.normal(keys[4], (batch, length, d_state))
    state0 = jax.random.normal(keys[5], (batch, heads, head_dim, d_state))
    return x, dt, A, B, C, state0


@jax.jit
def recurrence(x, dt, A, B, C, state):
    """The step-by-step recurrence, one ssd_step per position."""

    def step(state, inputs):
        x_t, dt_t, B_t, C_t = inputs
        y, state = ssd_step(state, x_t, dt_t, A, B_t, C_t)
        return state, y

    state, ys = jax.lax.scan(step, state, tuple(t.swapaxes(0, 1) for t in (x, dt, B, C)))
    return ys.swapaxes(0, 1), state


@pytest.mark.parametrize("length, chunk_size", [(37, 8), (37, 16), (64, 16), (50, 64), (1, 4)])
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_ssd_chunked_scan_equals_recurrence(length, chunk_size, with_initial_state):
    x, dt, A, B, C, state0 = random_ssm_inputs(length, length=length)
    if not with_initial_state:
        state0 = jnp.zeros_like(state0)
    y_scan, final_scan = ssd_scan(x, dt, A, B, C, chunk_size, initial_state=state0 if with_initial_state else None)
    y_loop, final_loop = recurrence(x, dt, A, B, C, state0)
    np.testing.assert_allclose(y_scan, y_loop, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(final_scan, final_loop, rtol=1e-4, atol=1e-4)


def test_causal_conv_matches_loop():
    x = jax.random.normal(jax.random.key(0), (2, 10, 3))
    w = jax.random.normal(jax.random.key(1), (4, 3))
    b = jnp.arange(3.0)
    out = causal_depthwise_conv(x, w, b)
    for t in range(10):
        expected = b + sum(w[k] * x[:, t - 3 + k] for k in range(4) if t - 3 + k >= 0)
        np.testing.assert_allclose(out[:, t], expected, rtol=1e-5, atol=1e-5)


def test_mamba2_is_causal():
    layer = Mamba2(32, SSMConfig(d_state=8, chunk_size=8, head_dim=16), dtype=jnp.float32, out_scale=1.0, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 20, 32))
    x2 = x.at[:, 12:].set(jax.random.normal(jax.random.key(1), (1, 8, 32)))
    y, y2 = layer(x), layer(x2)
    np.testing.assert_allclose(y[:, :12], y2[:, :12], rtol=1e-5, atol=1e-5)
    assert not np.allclose(y[:, 12:], y2[:, 12:])


def naive_attention(q, k, v, window):
    """Per-query loop in numpy: softmax over visible keys."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    batch, length, heads, head_dim = q.shape
    group = heads // k.shape[2]
    out = np.zeros_like(q)
    for i in range(length):
        lo = 0 if window < 0 else max(0, i - window)
        for h in range(heads):
            keys, values = k[:, lo:i + 1, h // group], v[:, lo:i + 1, h // group]
            scores = np.einsum("bd,bsd->bs", q[:, i, h], keys) / np.sqrt(head_dim)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            out[:, i, h] = np.einsum("bs,bsd->bd", weights, values)
    return out


@pytest.mark.parametrize("window", [-1, 1, 5])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_equals_naive_masked_softmax(window, kv_heads):
    keys = jax.random.split(jax.random.key(window + 10 * kv_heads), 3)
    q = jax.random.normal(keys[0], (2, 13, 4, 8))
    k = jax.random.normal(keys[1], (2, 13, kv_heads, 8))
    v = jax.random.normal(keys[2], (2, 13, kv_heads, 8))
    positions = jnp.arange(13)
    out = attend(q, k, v, attention_mask(positions, positions, window))
    np.testing.assert_allclose(out, naive_attention(q, k, v, window), rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))

    def score(m, n):
        qm = rotary_embedding(q, jnp.array([m]), 8)
        kn = rotary_embedding(k, jnp.array([n]), 8)
        return float(jnp.sum(qm * kn))

    assert score(3, 1) == pytest.approx(score(10, 8), rel=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)
    # Dims past rotary_dim are untouched.
    np.testing.assert_array_equal(rotary_embedding(q, jnp.array([5]), 8)[..., 8:], q[..., 8:])


def test_attention_layer_gqa_window_is_causal():
    layer = CausalSelfAttention(32, 4, 2, 8, 3, dtype=jnp.float32, out_scale=1.0, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 12, 32))
    x2 = x.at[:, 7:].add(1.0)
    np.testing.assert_allclose(layer(x)[:, :7], layer(x2)[:, :7], rtol=1e-5, atol=1e-5)


def test_swiglu_rounds_hidden_to_128():
    mlp = SwiGLU(32, 100, dtype=jnp.float32, out_scale=1.0, rngs=nnx.Rngs(0))
    assert mlp.fc1.kernel.shape == (32, 256) and mlp.fc2.kernel.shape == (128, 32)
