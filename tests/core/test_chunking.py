"""Dynamic chunking pieces: the capacity rule (closed form vs the greedy rule, allowance, prefix
consistency, the exact setting), chunk layout, EMA dechunk with document restarts, STE, ratio
loss, heuristics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hnet
from hnet import chunking
from hnet import config as config_lib
from hnet.chunking import RATE_UNIT, CapacityRule, capacity_is_exact, stage_lengths
from hnet.segments import Segments
from conftest import CONFIGS


EXACT = CapacityRule(rate_units=RATE_UNIT, burst=0, multiple=1)
# Jitted once per shape (eager JAX compiles every scan step separately, which is slower here).
chunk_layout = jax.jit(chunking.chunk_layout, static_argnames=("rule", "capacity"))
dechunk = jax.jit(chunking.dechunk)


def segments_of(mask_or_starts) -> Segments:
    return Segments.from_starts(jnp.asarray(mask_or_starts, bool))


def test_ema_associative_scan_equals_sequential_loop_and_restarts_at_documents():
    keys = jax.random.split(jax.random.key(0), 2)
    values = jax.random.normal(keys[0], (2, 11, 3))
    prob = jax.random.uniform(keys[1], (2, 11))
    doc_start = np.zeros((2, 11), bool)
    doc_start[:, 0] = doc_start[0, 4] = doc_start[1, 9] = True
    smoothed = chunking.ema_smooth(values, prob, jnp.asarray(doc_start))
    p = np.clip(np.asarray(prob), 1e-4, 1 - 1e-4)
    expected = np.zeros((2, 11, 3))
    previous = np.zeros((2, 3))
    for k in range(11):
        previous = np.where(doc_start[:, k, None], 0.0, previous)  # the reference's state reset
        previous = p[:, k, None] * np.asarray(values[:, k]) + (1 - p[:, k, None]) * previous
        expected[:, k] = previous
    np.testing.assert_allclose(smoothed, expected, rtol=1e-5, atol=1e-6)
    # A document start takes only its own value: nothing of the previous document leaks in.
    np.testing.assert_array_equal(smoothed[0, 4], np.float32(p[0, 4]) * values[0, 4])
    # The one-step form agrees.
    step = chunking.ema_step(smoothed[:, 3], values[:, 4], prob[:, 4], jnp.asarray(doc_start[:, 4]))
    np.testing.assert_allclose(step, smoothed[:, 4], rtol=1e-6, atol=1e-6)


def test_chunk_layout_gathers_chunks_in_order():
    mask = jnp.array([[1, 0, 1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0, 0, 1]], bool)
    layout = chunk_layout(mask, segments_of([[1] + [0] * 7] * 2), EXACT, capacity=5)
    np.testing.assert_array_equal(layout.chunk_mask, mask)
    np.testing.assert_array_equal(layout.chunk_position, [[0, 2, 3, 6, 8], [0, 7, 8, 8, 8]])
    np.testing.assert_array_equal(layout.chunk_valid, [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(layout.plug_index, [[0, 0, 1, 2, 2, 2, 3, 3], [0, 0, 0, 0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(layout.dropped, [0, 0])


def greedy_keep(boundaries: np.ndarray, doc_start: np.ndarray, rule: CapacityRule) -> np.ndarray:
    """The capacity rule as written, one position at a time: chunk k of a document may start at
    document position u while k < burst + rate (u + 1); then the same per row over what was kept."""
    length = len(boundaries)
    kept = np.zeros(length, bool)
    doc_count = row_count = 0
    doc_position = -1
    for t in range(length):
        if doc_start[t] or t == 0:
            doc_count, doc_position = 0, 0
        else:
            doc_position += 1
        if boundaries[t] and doc_count + 1 <= rule.allowance(doc_position):
            doc_count += 1
            if row_count + 1 <= rule.allowance(t):
                row_count += 1
                kept[t] = True
    return kept


@pytest.mark.parametrize("slack, burst", [(1.25, 16), (1.25, 0), (2.0, 4), (1.0, 2)])
def test_capacity_rule_closed_form_equals_greedy_and_respects_the_allowance(slack, burst):
    rule = CapacityRule(rate_units=int(np.ceil(slack / 6 * RATE_UNIT)), burst=burst, multiple=8)
    rng = np.random.default_rng(burst)
    length = 300
    density = rng.uniform(0.05, 0.9, size=(6, 1))  # rows from sparse to far above the rate
    boundaries = rng.random((6, length)) < density
    doc_start = rng.random((6, length)) < 0.01
    doc_start[:, 0] = True
    doc_start[5, ::3] = True  # many tiny documents: the row allowance binds
    boundaries |= doc_start
    capacity = rule.row_capacity(length)
    layout = chunk_layout(jnp.asarray(boundaries), segments_of(doc_start), rule, capacity)
    chunk_mask = np.asarray(layout.chunk_mask)
    for row in range(6):
        np.testing.assert_array_equal(chunk_mask[row], greedy_keep(boundaries[row], doc_start[row], rule))
    assert not np.any(chunk_mask & ~boundaries)
    np.testing.assert_array_equal(layout.dropped, (boundaries & ~chunk_mask).sum(axis=1))
    assert np.asarray(layout.dropped).sum() > 0  # the test exercises dropping
    # Never more chunks than the allowance, per document and per row; the static slots suffice.
    segments = segments_of(doc_start)
    doc_counts = np.asarray(layout.doc_chunks)
    assert np.all(doc_counts <= rule.allowance(np.asarray(segments.position)))
    assert np.all(np.cumsum(chunk_mask, axis=1) <= rule.allowance(np.arange(length)))
    assert chunk_mask.sum(axis=1).max() <= capacity
    # The document level always keeps a document's first position; only the row level (rows
    # packing documents faster than the rate, as row 5) can drop one.
    doc_kept = doc_counts > np.where(doc_start, 0, np.pad(doc_counts[:, :-1], ((0, 0), (1, 0))))
    assert np.all(doc_kept[doc_start])
    row_level_drops = (doc_kept & ~chunk_mask).sum(axis=1)
    assert row_level_drops[5] > 0
    for row in np.flatnonzero(row_level_drops == 0):
        assert np.all(chunk_mask[row][doc_start[row]])


def test_capacity_rule_is_prefix_consistent():
    rule = CapacityRule(rate_units=RATE_UNIT // 5, burst=3, multiple=16)
    rng = np.random.default_rng(0)
    boundaries = rng.random((3, 200)) < 0.4
    doc_start = rng.random((3, 200)) < 0.03
    full = chunk_layout(jnp.asarray(boundaries), segments_of(doc_start), rule, rule.row_capacity(200))
    assert np.asarray(full.dropped).sum() > 0
    for t in (17, 150):
        prefix = chunk_layout(jnp.asarray(boundaries[:, :t]), segments_of(doc_start[:, :t]), rule, rule.row_capacity(t))
        np.testing.assert_array_equal(prefix.chunk_mask, np.asarray(full.chunk_mask)[:, :t])


def test_exact_setting_never_drops():
    config = config_lib.replace(hnet.load_config(CONFIGS / "hnet_2stage_tiny.json"), capacity_slack=2.0)
    for slack in ("exact", 3.0, 6.0):
        exact = config_lib.replace(config, capacity_slack=slack)
        assert capacity_is_exact(exact) and stage_lengths(exact, 300) == [300, 300, 300]
    assert not capacity_is_exact(config)
    rule = CapacityRule.for_stage(config_lib.replace(config, capacity_slack="exact"), 0)
    boundaries = np.ones((1, 50), bool)
    layout = chunk_layout(jnp.asarray(boundaries), segments_of(np.eye(1, 50, 0, bool)), rule, 50)
    assert bool(np.all(layout.chunk_mask)) and int(layout.dropped[0]) == 0


def test_dechunk_with_prob_one_reproduces_each_chunks_value():
    key = jax.random.key(1)
    mask = jax.random.bernoulli(key, 0.3, (3, 40)).at[:, 0].set(True)
    layout = chunk_layout(mask, segments_of(np.eye(3, 40, 0, bool)), EXACT, capacity=40)
    values = jax.random.normal(jax.random.key(2), (3, 40, 4))
    out = dechunk(values, jnp.ones((3, 40)), jnp.zeros((3, 40), bool), layout)
    chunk_of_byte = np.cumsum(np.asarray(mask), axis=1) - 1
    expected = np.take_along_axis(np.asarray(values), chunk_of_byte[..., None], axis=1)
    # P is clipped to 1 - 1e-4 (except at document starts), so each output leaks 1e-4 of the previous chunk.
    np.testing.assert_allclose(out, expected, atol=2e-3)


def test_straight_through_is_one_forward_and_identity_backward():
    c = jnp.array([0.2, 0.7, 0.9])
    np.testing.assert_array_equal(chunking.straight_through(c), 1.0)
    grad = jax.grad(lambda c: jnp.sum(chunking.straight_through(c) * jnp.array([1.0, 2.0, 3.0])))(c)
    np.testing.assert_allclose(grad, [1.0, 2.0, 3.0])


def test_dechunk_passes_gradient_to_probabilities():
    mask = jnp.array([[1, 0, 1, 1, 0, 1]], bool)
    layout = chunk_layout(mask, segments_of([[1, 0, 0, 0, 0, 0]]), EXACT, capacity=6)
    values = jax.random.normal(jax.random.key(0), (1, 6, 2))
    no_start = jnp.zeros((1, 6), bool)
    grad = jax.grad(lambda p: jnp.sum(dechunk(values, p, no_start, layout) ** 2))(jnp.full((1, 6), 0.6))
    assert np.all(np.abs(np.asarray(grad)[0, 1:4]) > 0)


@pytest.mark.parametrize("target", [2.0, 3.0, 6.0])
def test_ratio_loss_is_one_at_target_and_grows_away(target):
    length = 600
    valid = jnp.ones((1, length), bool)

    def loss_at(fraction):
        n_selected = int(round(fraction * length))
        mask = (jnp.arange(length) < n_selected)[None]
        loss, selected, mean_prob = chunking.ratio_loss(mask, jnp.full((1, length), n_selected / length), valid, target)
        assert float(selected) == pytest.approx(n_selected / length) and float(mean_prob) == pytest.approx(
            n_selected / length
        )
        return float(loss)

    assert loss_at(1 / target) == pytest.approx(1.0, abs=1e-5)
    for fraction in (0.5 / target, 0.8 / target, 1.3 / target, min(0.99, 2 / target)):
        assert loss_at(fraction) > 1.0 + 1e-4


def test_ratio_loss_ignores_invalid_positions():
    mask = jnp.array([[1, 0, 0, 1, 1, 1]], bool)
    prob = jnp.array([[0.5, 0.5, 0.5, 0.9, 0.9, 0.9]])
    valid = jnp.array([[1, 1, 1, 0, 0, 0]], bool)
    expected = chunking.ratio_loss(mask[:, :3], prob[:, :3], valid[:, :3], 3.0)[0]
    assert float(chunking.ratio_loss(mask, prob, valid, 3.0)[0]) == pytest.approx(float(expected))


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
