"""Dynamic chunking pieces: chunk layout under capacity, EMA dechunk, STE, ratio loss, heuristics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hnet import chunking


def test_ema_associative_scan_equals_sequential_loop():
    keys = jax.random.split(jax.random.key(0), 2)
    values = jax.random.normal(keys[0], (2, 11, 3))
    prob = jax.random.uniform(keys[1], (2, 11))
    smoothed = chunking.ema_smooth(values, prob)
    p = np.clip(np.asarray(prob), 1e-4, 1 - 1e-4)
    expected = np.zeros((2, 11, 3))
    previous = np.zeros((2, 3))
    for k in range(11):
        previous = p[:, k, None] * np.asarray(values[:, k]) + (1 - p[:, k, None]) * previous
        expected[:, k] = previous
    np.testing.assert_allclose(smoothed, expected, rtol=1e-5, atol=1e-6)


def test_chunk_layout_gathers_boundaries_in_order():
    mask = jnp.array([[1, 0, 1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0, 0, 1]], bool)
    layout = chunking.chunk_layout(mask, capacity=5)
    np.testing.assert_array_equal(layout.chunk_position, [[0, 2, 3, 6, 8], [0, 7, 8, 8, 8]])
    np.testing.assert_array_equal(layout.chunk_valid, [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(layout.plug_index, [[0, 0, 1, 2, 2, 2, 3, 3], [0, 0, 0, 0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(layout.overflow, [0, 0])


def test_capacity_overflow_is_counted_and_nothing_is_misplaced():
    mask = jnp.array([[1, 1, 0, 1, 1, 1, 0, 1]], bool)  # 6 boundaries, room for 3
    layout = chunking.chunk_layout(mask, capacity=3)
    np.testing.assert_array_equal(layout.chunk_position, [[0, 1, 3]])  # the first three, in order
    np.testing.assert_array_equal(layout.overflow, [3])
    # Positions whose chunk overflowed take the last kept chunk (earlier in time: still causal).
    np.testing.assert_array_equal(layout.plug_index, [[0, 1, 1, 2, 2, 2, 2, 2]])


def test_dechunk_with_prob_one_reproduces_each_chunks_value():
    key = jax.random.key(1)
    mask = jax.random.bernoulli(key, 0.3, (3, 40)).at[:, 0].set(True)
    layout = chunking.chunk_layout(mask, capacity=40)
    values = jax.random.normal(jax.random.key(2), (3, 40, 4))
    out = chunking.dechunk(values, jnp.ones((3, 40)), layout)
    chunk_of_byte = np.cumsum(np.asarray(mask), axis=1) - 1
    expected = np.take_along_axis(np.asarray(values), chunk_of_byte[..., None], axis=1)
    # P is clipped to 1 - 1e-4, so each output leaks 1e-4 of the previous chunk.
    np.testing.assert_allclose(out, expected, atol=2e-3)


def test_straight_through_is_one_forward_and_identity_backward():
    c = jnp.array([0.2, 0.7, 0.9])
    np.testing.assert_array_equal(chunking.straight_through(c), 1.0)
    grad = jax.grad(lambda c: jnp.sum(chunking.straight_through(c) * jnp.array([1.0, 2.0, 3.0])))(c)
    np.testing.assert_allclose(grad, [1.0, 2.0, 3.0])


def test_dechunk_passes_gradient_to_probabilities():
    mask = jnp.array([[1, 0, 1, 1, 0, 1]], bool)
    layout = chunking.chunk_layout(mask, capacity=6)
    values = jax.random.normal(jax.random.key(0), (1, 6, 2))
    grad = jax.grad(lambda p: jnp.sum(chunking.dechunk(values, p, layout) ** 2))(jnp.full((1, 6), 0.6))
    assert np.all(np.abs(np.asarray(grad)[0, 1:4]) > 0)


@pytest.mark.parametrize("target", [2.0, 3.0, 6.0])
def test_ratio_loss_is_one_at_target_and_grows_away(target):
    length = 600
    valid = jnp.ones((1, length), bool)

    def loss_at(fraction):
        n_selected = int(round(fraction * length))
        mask = (jnp.arange(length) < n_selected)[None]
        return float(chunking.ratio_loss(mask, jnp.full((1, length), n_selected / length), valid, target))

    assert loss_at(1 / target) == pytest.approx(1.0, abs=1e-5)
    for fraction in (0.5 / target, 0.8 / target, 1.3 / target, min(0.99, 2 / target)):
        assert loss_at(fraction) > 1.0 + 1e-4


def test_ratio_loss_ignores_invalid_positions():
    mask = jnp.array([[1, 0, 0, 1, 1, 1]], bool)
    prob = jnp.array([[0.5, 0.5, 0.5, 0.9, 0.9, 0.9]])
    valid = jnp.array([[1, 1, 1, 0, 0, 0]], bool)
    expected = chunking.ratio_loss(mask[:, :3], prob[:, :3], valid[:, :3], 3.0)
    assert float(chunking.ratio_loss(mask, prob, valid, 3.0)) == pytest.approx(float(expected))


def test_space_boundaries_on_multilingual_text():
    text = "Hi, café 日本語 ok😀!\nx"
    data = text.encode()
    mask = np.asarray(chunking.space_boundaries(jnp.array([list(data)])))[0]
    # Words start after a separator: "Hi, " | "café " | "日本語 " | "ok😀!\n" | "x"
    expected_starts = [0] + [len(text[:i].encode()) for i in (4, 9, 13, 18)]
    np.testing.assert_array_equal(np.flatnonzero(mask), expected_starts)
    continuation = np.array([(b & 0xC0) == 0x80 for b in data])
    assert not np.any(mask & continuation)  # never inside a multi-byte character


def test_stride_boundaries():
    mask = np.asarray(chunking.stride_boundaries(jnp.broadcast_to(jnp.arange(10), (2, 10)), 4))
    np.testing.assert_array_equal(np.flatnonzero(mask[0]), [0, 4, 8])
    np.testing.assert_array_equal(mask[0], mask[1])
