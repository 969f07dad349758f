"""Layer-level equivalences: SSD scan vs the recurrence (with document resets), the conv and
attention vs per-document loops, RoPE, RMSNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hnet import config as config_lib
from hnet.config import SSMConfig, load_config
from hnet.layers.attention import rotary_embedding, CausalSelfAttention
from hnet.layers.kernels.attention import attend, attention_mask, blockwise_attention, causal_attention
from hnet.layers.kernels.ssd import ssd_scan, ssd_step
from hnet.layers.mamba2 import Mamba2, causal_depthwise_conv
from hnet.layers.mlp import SwiGLU
from hnet.segments import Segments
from hnet.perf.xla_stats import matmul_flops
from flax import nnx

from conftest import CONFIGS


def random_ssm_inputs(seed, batch=2, length=37, heads=3, head_dim=4, d_state=5):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (batch, length, heads, head_dim))
    dt = jax.nn.softplus(jax.random.normal(keys[1], (batch, length, heads)) - 1.0)
    A = -jnp.exp(jax.random.normal(keys[2], (heads,)))
    B = jax.random.normal(keys[3], (batch, length, d_state))
    C = jax.random.normal(keys[4], (batch, length, d_state))
    return x, dt, A, B, C


def random_documents(seed, batch, length, rate=0.08) -> Segments:
    """Document starts at random positions (some one position long), position 0 always."""
    start = np.random.default_rng(seed).random((batch, length)) < rate
    if length > 4:
        start[0, 3] = start[0, 4] = True  # a one-position document
    return Segments.from_starts(jnp.asarray(start))


jit_ssd_scan = jax.jit(ssd_scan, static_argnums=5)


@jax.jit
def recurrence(x, dt, A, B, C, doc_start):
    """The step-by-step recurrence with resets, one ssd_step per position."""
    batch, _, heads, head_dim = x.shape
    state = jnp.zeros((batch, heads, head_dim, B.shape[-1]))

    def step(state, inputs):
        x_t, dt_t, B_t, C_t, start_t = inputs
        y, state = ssd_step(state, x_t, dt_t, A, B_t, C_t, start_t)
        return state, y

    state, ys = jax.lax.scan(step, state, tuple(t.swapaxes(0, 1) for t in (x, dt, B, C, doc_start)))
    return ys.swapaxes(0, 1), state


@pytest.mark.parametrize("length, chunk_size", [(37, 8), (37, 16), (64, 16), (50, 64), (1, 4)])
@pytest.mark.parametrize("documents", ["one", "several"])
def test_ssd_chunked_scan_equals_recurrence_with_resets(length, chunk_size, documents):
    x, dt, A, B, C = random_ssm_inputs(length, length=length)
    if documents == "one":
        segments = Segments.from_starts(jnp.zeros((2, length), bool))
    else:  # starts inside chunks, on chunk edges, and one-position documents
        segments = random_documents(length, 2, length, rate=0.15)
    y_scan, final_scan = jit_ssd_scan(x, dt, A, B, C, chunk_size, segments.index)
    y_loop, final_loop = recurrence(x, dt, A, B, C, segments.start)
    np.testing.assert_allclose(y_scan, y_loop, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(final_scan, final_loop, rtol=1e-4, atol=1e-4)


def test_ssd_scan_gradients_equal_the_recurrence_gradients():
    """The rematerialised intra-chunk term gives the recurrence's gradients (documents included)."""
    x, dt, A, B, C = random_ssm_inputs(3, length=37)
    segments = random_documents(3, 2, 37, rate=0.15)
    cotangent = jax.random.normal(jax.random.key(9), x.shape)

    def scan_loss(x, dt, B, C):
        return jnp.sum(ssd_scan(x, dt, A, B, C, 8, segments.index)[0] * cotangent)

    def loop_loss(x, dt, B, C):
        return jnp.sum(recurrence(x, dt, A, B, C, segments.start)[0] * cotangent)

    grads = jax.jit(jax.grad(scan_loss, argnums=(0, 1, 2, 3)))(x, dt, B, C)
    expected = jax.jit(jax.grad(loop_loss, argnums=(0, 1, 2, 3)))(x, dt, B, C)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_bfloat16_ssd_scan_stays_within_tolerance_of_the_float32_recurrence():
    """bf16 inputs: every matmul of the scan and of its gradient is bf16, and the outputs and
    gradients stay within 1% of the float32 recurrence on the same rounded inputs (measured:
    0.2-0.6% of the largest value; rounding the exact output to bf16 alone costs 0.4%)."""
    x, dt, A, B, C = random_ssm_inputs(4, length=200)
    segments = random_documents(4, 2, 200, rate=0.03)
    x, B, C = (t.astype(jnp.bfloat16) for t in (x, B, C))
    cotangent = jax.random.normal(jax.random.key(5), x.shape)

    def scan_loss(x, dt, B, C):
        y, state = ssd_scan(x, dt, A, B, C, 32, segments.index)
        return jnp.sum(y * cotangent), (y, state)

    def loop_loss(x, dt, B, C):
        y, state = recurrence(
            *(t.astype(jnp.float32) for t in (x, dt)), A, B.astype(jnp.float32), C.astype(jnp.float32), segments.start
        )
        return jnp.sum(y * cotangent), (y, state)

    def relative_error(got, want):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        return np.abs(got - want).max() / np.abs(want).max()

    scan_grad = jax.value_and_grad(scan_loss, argnums=(0, 1, 2, 3), has_aux=True)
    assert matmul_flops(jax.make_jaxpr(scan_grad)(x, dt, B, C)).float32_operand_flops == 0
    (_, scanned), scan_grads = jax.jit(scan_grad)(x, dt, B, C)
    (_, looped), loop_grads = jax.jit(jax.value_and_grad(loop_loss, argnums=(0, 1, 2, 3), has_aux=True))(x, dt, B, C)
    for got, want in zip(scanned + scan_grads, looped + loop_grads):
        assert relative_error(got, want) < 1e-2


def test_ssd_scan_documents_equal_each_document_alone():
    x, dt, A, B, C = random_ssm_inputs(3, batch=1, length=45)
    start = np.zeros((1, 45), bool)
    start[0, [0, 9, 10, 30]] = True  # documents [0, 9), [9], [10, 30), [30, 45)
    y, _ = jit_ssd_scan(x, dt, A, B, C, 8, Segments.from_starts(jnp.asarray(start)).index)
    for begin, end in ((0, 9), (9, 10), (10, 30), (30, 45)):
        alone, _ = jit_ssd_scan(*(t[:, begin:end] if t.ndim > 1 else t for t in (x, dt, A, B, C)), 8)
        np.testing.assert_allclose(y[:, begin:end], alone, rtol=1e-5, atol=1e-5)


def test_causal_conv_matches_a_per_document_loop():
    x = jax.random.normal(jax.random.key(0), (2, 14, 3))
    w = jax.random.normal(jax.random.key(1), (4, 3))
    b = jnp.arange(3.0)
    segments = random_documents(0, 2, 14, rate=0.2)
    out = causal_depthwise_conv(x, w, b, segments.position)
    position = np.asarray(segments.position)
    for row in range(2):
        for t in range(14):
            # Taps reaching before the document's start read zero (the document alone).
            expected = b + sum(w[k] * x[row, t - 3 + k] for k in range(4) if 3 - k <= position[row, t])
            np.testing.assert_allclose(out[row, t], expected, rtol=1e-5, atol=1e-5)


def test_mamba2_is_causal():
    layer = Mamba2(
        32, SSMConfig(d_state=8, chunk_size=8, head_dim=16), dtype=jnp.float32, out_scale=1.0, rngs=nnx.Rngs(0)
    )
    x = jax.random.normal(jax.random.key(0), (1, 20, 32))
    x2 = x.at[:, 12:].set(jax.random.normal(jax.random.key(1), (1, 8, 32)))
    forward = nnx.jit(lambda layer, t: layer.forward(t, Segments.from_starts(jnp.zeros((1, 20), bool)))[0])
    y, y2 = forward(layer, x), forward(layer, x2)
    np.testing.assert_allclose(y[:, :12], y2[:, :12], rtol=1e-5, atol=1e-5)
    assert not np.allclose(y[:, 12:], y2[:, 12:])


def naive_attention(q, k, v, window, segment_index):
    """Per-query loop in numpy: softmax over the visible keys of the query's own document."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    segment_index = np.asarray(segment_index)
    batch, length, heads, head_dim = q.shape
    group = heads // k.shape[2]
    out = np.zeros_like(q)
    for b in range(batch):
        for i in range(length):
            lo = 0 if window < 0 else max(0, i - window)
            keys = [j for j in range(lo, i + 1) if segment_index[b, j] == segment_index[b, i]]
            for h in range(heads):
                scores = q[b, i, h] @ k[b, keys, h // group].T / np.sqrt(head_dim)
                weights = np.exp(scores - scores.max())
                out[b, i, h] = (weights / weights.sum()) @ v[b, keys, h // group]
    return out


@pytest.mark.parametrize("window", [-1, 1, 5])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_equals_naive_masked_softmax_within_documents(window, kv_heads):
    keys = jax.random.split(jax.random.key(window + 10 * kv_heads), 3)
    q = jax.random.normal(keys[0], (2, 13, 4, 8))
    k = jax.random.normal(keys[1], (2, 13, kv_heads, 8))
    v = jax.random.normal(keys[2], (2, 13, kv_heads, 8))
    segments = random_documents(window + 2, 2, 13, rate=0.2)
    out = attend(q, k, v, attention_mask(jnp.arange(13), segments.index, window))
    np.testing.assert_allclose(out, naive_attention(q, k, v, window, segments.index), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window, block", [(-1, 8), (-1, 16), (5, 8), (12, 16)])
def test_blockwise_attention_equals_the_plain_path_in_values_and_gradients(window, block):
    """causal_attention over query blocks (only the keys the causal window reaches, rematerialised)
    against attend with the whole mask: L = 45 is not a multiple of the block (global layers: 6
    blocks, or 3 padded to 4 to pair them up); two KV-head groups."""
    keys = jax.random.split(jax.random.key(block + window), 4)
    q = jax.random.normal(keys[0], (2, 45, 4, 8))
    k = jax.random.normal(keys[1], (2, 45, 2, 8))
    v = jax.random.normal(keys[2], (2, 45, 2, 8))
    cotangent = jax.random.normal(keys[3], (2, 45, 4, 8))
    segments = random_documents(window + block, 2, 45, rate=0.1)

    def plain(q, k, v):
        return jnp.sum(attend(q, k, v, attention_mask(jnp.arange(45), segments.index, window)) * cotangent)

    def blockwise(q, k, v):
        return jnp.sum(causal_attention(q, k, v, segments.index, window, block_size=block) * cotangent)

    np.testing.assert_allclose(
        causal_attention(q, k, v, segments.index, window, block_size=block),
        naive_attention(q, k, v, window, segments.index),
        rtol=1e-5,
        atol=1e-5,
    )
    gradients = [jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v) for f in (plain, blockwise)]
    for expected, got in zip(*gradients):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_blockwise_attention_executes_only_the_blocks_its_window_reaches():
    """The jaxpr's matmul FLOPs (what runs: no block is skipped at run time) are the causal
    triangle of blocks for a global layer and (window / block + 1) blocks per query block for a
    windowed one: 2 matmuls (scores, values) of 2 x block^2 x H x Dh FLOPs per block visited. The
    backward pass (custom VJP) adds 5 matmuls per pair of blocks holding a visible key, and does
    not run the forward again."""
    from hnet.perf.xla_stats import matmul_flops

    blocks, block, heads, head_dim = 6, 8, 4, 8
    q = jnp.zeros((1, blocks * block, heads, head_dim))
    kv = jnp.zeros((1, blocks * block, 2, head_dim))
    segments = jnp.zeros((1, blocks * block), jnp.int32)
    matmul = 2 * block * block * heads * head_dim
    for window, visited, pairs in (
        (-1, blocks * (blocks + 1) // 2, blocks * (blocks + 1) // 2),
        (8, blocks * 2, blocks * 2 - 1),
        (20, blocks * 4, blocks * 4 - 6),
    ):
        attention = lambda q, k, v: blockwise_attention(q, k, v, segments, window, block)
        assert matmul_flops(jax.make_jaxpr(attention)(q, kv, kv)).flops == visited * 2 * matmul, window
        grads = jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(attention(*a)), argnums=(0, 1, 2)))(q, kv, kv)
        assert matmul_flops(grads).flops == (visited * 2 + pairs * 5) * matmul, window


def test_pallas_attention_equals_the_plain_path_in_interpret_mode():
    """The GPU path (Pallas flash attention with segment ids), run by Pallas' interpreter on CPU:
    values and gradients against the plain masked softmax; L = 45 is padded to the kernel's block."""
    from hnet.layers.kernels.attention import pallas_causal_attention

    keys = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(keys[0], (1, 45, 4, 16))
    k = jax.random.normal(keys[1], (1, 45, 2, 16))
    v = jax.random.normal(keys[2], (1, 45, 2, 16))
    cotangent = jax.random.normal(keys[3], (1, 45, 4, 16))
    segments = random_documents(4, 1, 45, rate=0.1)

    def plain(q, k, v):
        return jnp.sum(attend(q, k, v, attention_mask(jnp.arange(45), segments.index, -1)) * cotangent)

    def pallas(q, k, v):
        return jnp.sum(pallas_causal_attention(q, k, v, segments.index, block=16, interpret=True) * cotangent)

    np.testing.assert_allclose(
        pallas_causal_attention(q, k, v, segments.index, block=16, interpret=True),
        naive_attention(q, k, v, -1, segments.index),
        rtol=1e-4,
        atol=1e-4,
    )
    for want, got in zip(jax.grad(plain, argnums=(0, 1, 2))(q, k, v), jax.grad(pallas, argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


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
    forward = nnx.jit(lambda layer, t: layer.forward(t, Segments.from_starts(jnp.zeros((2, 12), bool)))[0])
    y, y2 = forward(layer, x), forward(layer, x2)
    np.testing.assert_allclose(y[:, :7], y2[:, :7], rtol=1e-5, atol=1e-5)


def test_mlp_hidden_is_rounded_up_to_128():
    config = config_lib.replace(load_config(CONFIGS / "hnet_1stage_tiny.json"), d_intermediate=(0, 100))
    assert config.mlp_hidden(1) == 128
    mlp = SwiGLU(32, config.mlp_hidden(1), dtype=jnp.float32, out_scale=1.0, rngs=nnx.Rngs(0))
    assert mlp.fc1.kernel.shape == (32, 256) and mlp.fc2.kernel.shape == (128, 32)
