"""Chunk slots that follow the data (hnet.slots): the ladder, the residual-sharing switch, row
groups, and the exactness of a stack run on the ladder against the same stack on every slot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hnet
from hnet import chunking, slots
from hnet import config as config_lib
from hnet.layers.isotropic import Isotropic
from hnet.segments import Segments
from conftest import LADDER, shrink, tiny_config


def test_the_ladder_is_ascending_fractions_of_the_target_ending_at_the_static_cap():
    config = tiny_config("hnet_1stage_tiny", capacity_multiple=16, slot_ladder=hnet.ModelConfig.slot_ladder)
    ladder = slots.slot_ladder(config, 0, 512)
    cap = chunking.stage_lengths(config, 512)[1]
    target = 512 / 6
    assert ladder[-1] == cap and list(ladder) == sorted(set(ladder))
    assert all(n % 16 == 0 for n in ladder[:-1])
    assert ladder[0] == 96  # ceil(1.0 * 85.3) rounded up to 16
    assert all(n >= target for n in ladder)
    two = tiny_config("hnet_2stage_tiny", slot_ladder=hnet.ModelConfig.slot_ladder)
    inner = slots.slot_ladder(two, 1, 1024)
    assert inner[-1] == chunking.stage_lengths(two, 1024)[2]
    assert inner[0] >= 1024 / 9  # stage 1's chunks: seq_len / N_0 / N_1
    assert slots.slot_ladder(config_lib.replace(config, slot_ladder=()), 0, 512) == (cap,)


def test_ladder_index_picks_the_smallest_length_that_holds_the_count():
    index = slots.ladder_index(jnp.array([0, 96, 97, 160, 161, 999]), (96, 128, 160, 192))
    assert index.tolist() == [0, 0, 1, 2, 3, 3]
    assert slots.group_lengths([10, 100, 50, 130], (96, 128, 160), groups=2) == [160, 96]
    assert slots.group_lengths([10, 100, 50], (96, 128, 160), groups=2) == [128]  # 3 rows: one group


def test_row_groups_order_rows_by_count_and_merge_restores_them():
    counts = jnp.array([3, 9, 1, 7, 5, 8], jnp.int32)
    groups = slots.RowGroups.by_count(counts, 3)
    assert groups.groups == 3 and groups.shards == 1
    grouped = groups.split(counts)
    assert grouped.tolist() == [[9, 8], [7, 5], [3, 1]]
    values = jnp.arange(6 * 4).reshape(6, 4)
    np.testing.assert_array_equal(groups.merge(groups.split(values)), values)
    assert slots.RowGroups.by_count(counts, 4).groups == 3  # the largest divisor of the rows


def _switch_pieces(length=64):
    """Three branches of one MLP at lengths length / 2, 3 length / 4, length of (B, length, 8)
    inputs, zeros beyond."""
    sizes = (length // 2, 3 * length // 4, length)

    def branch(size):
        def run(operands):
            w, x = operands
            h = jnp.tanh(x[:, :size] @ w[0])
            y = jnp.tanh(h @ w[1]) @ w[2]
            return jnp.pad(y, ((0, 0), (0, length - size), (0, 0)))

        return run

    key = jax.random.split(jax.random.PRNGKey(0), 4)
    w = [
        jax.random.normal(key[0], (8, 32)) / 3,
        jax.random.normal(key[1], (32, 32)) / 6,
        jax.random.normal(key[2], (32, 8)) / 6,
    ]
    x = jax.random.normal(key[3], (4, length, 8))
    return [branch(size) for size in sizes], w, x


def test_switch_keeping_taken_residuals_gives_the_switch_values_and_gradients():
    branches, w, x = _switch_pieces()

    def loss(switch, index, w, x):
        return jnp.sum(jnp.sin(switch(index, branches, (w, x))))

    plain = jax.jit(jax.value_and_grad(lambda i, w, x: loss(jax.lax.switch, i, w, x), argnums=(1, 2)))
    shared = jax.jit(
        jax.value_and_grad(lambda i, w, x: loss(slots.switch_keeping_taken_residuals, i, w, x), argnums=(1, 2))
    )
    for index in range(3):
        (value, grads), (value_s, grads_s) = plain(index, w, x), shared(index, w, x)
        assert float(value_s) == pytest.approx(float(value), rel=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_s)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_switch_keeping_taken_residuals_keeps_one_branch_of_residuals():
    """The plain switch's backward keeps every branch's residuals; ours those of the largest."""
    branches, w, x = _switch_pieces(length=512)
    x = jnp.tile(x, (4, 1, 1))  # (16, 512, 8)

    def temp(switch):  # the index is an argument: a constant one would let lax.switch pick its branch
        grad = jax.jit(jax.grad(lambda i, w, x: jnp.sum(switch(i, branches, (w, x))), argnums=(1, 2)))
        return grad.lower(jnp.int32(2), w, x).compile().memory_analysis().temp_size_in_bytes

    largest_alone = temp(lambda index, branches, operands: branches[2](operands))
    assert temp(slots.switch_keeping_taken_residuals) < 0.8 * temp(jax.lax.switch)
    assert temp(slots.switch_keeping_taken_residuals) < 2.0 * largest_alone


@pytest.fixture(scope="module")
def stack_and_rows():
    config = shrink(tiny_config("hnet_1stage_tiny"))  # stage 1: T (attention + MLP) at width 48
    stack = Isotropic(
        "T1m1",
        config_lib.replace(
            config, ssm_cfg=config_lib.SSMConfig(d_state=8, d_conv=4, expand=2, chunk_size=8, head_dim=16)
        ),
        1,
        2,
        nnx.Rngs(params=1),
    )
    counts = np.array([5, 30, 17, 40, 2, 33], np.int32)
    length = 40
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(len(counts), length, 48)), jnp.float32)
    starts = np.zeros((len(counts), length), bool)
    starts[:, 0] = True
    starts[1, 12] = starts[3, 20] = True  # a second document in two rows
    starts &= np.arange(length) < counts[:, None]
    return stack, x, Segments.from_starts(jnp.asarray(starts)), jnp.asarray(counts)


@pytest.mark.parametrize("groups, residuals", [(1, "keep"), (3, "keep"), (3, "recompute")])
def test_a_stack_on_the_ladder_equals_the_stack_on_every_slot(stack_and_rows, groups, residuals):
    """Real positions (before each row's count) get the same values and gradients whichever
    ladder length their group runs on, whether the backward pass keeps the taken branch's
    residuals or recomputes its forward."""
    stack, x, segments, counts = stack_and_rows
    rows = slots.SlotRows(counts, (16, 40), groups, 0)  # 3 groups run on 40, 40 and 16 (the rows of 5 and 2)
    real = (jnp.arange(x.shape[1])[None, :] < counts[:, None])[..., None]
    graphdef, state = nnx.split(stack)
    weights = jax.random.normal(jax.random.PRNGKey(3), x.shape)

    def loss(run, state, x):
        return jnp.sum(jnp.where(real, run(nnx.merge(graphdef, state), x), 0.0) * weights)

    def on_ladder(module, x):
        with slots.ladder_residuals(residuals):
            return slots.run_stack(module, x, segments, rows)

    def on_every_slot(module, x):
        return module.forward(x, segments)[0]

    out = jax.jit(on_ladder)(stack, x)
    full = jax.jit(on_every_slot)(stack, x)
    np.testing.assert_allclose(jnp.where(real, out, 0.0), jnp.where(real, full, 0.0), atol=2e-5)
    grads = jax.jit(jax.grad(lambda s, x: loss(on_ladder, s, x), argnums=(0, 1)))(state, x)
    grads_full = jax.jit(jax.grad(lambda s, x: loss(on_every_slot, s, x), argnums=(0, 1)))(state, x)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_full)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


def test_recomputing_ladder_keeps_only_the_stack_input_and_is_chosen_on_cpu(stack_and_rows):
    """slot_residuals="recompute" keeps less for the backward pass than "keep" (whose buffers hold
    the cap's worth of the taken branch's activations); auto recomputes on CPU only."""
    from hnet.training.train_step import slot_residual_mode

    stack, x, segments, counts = stack_and_rows
    rows = slots.SlotRows(counts, (16, 40), 3, 0)
    graphdef, state = nnx.split(stack)

    def temp(mode):
        def loss(state, x):
            with slots.ladder_residuals(mode):
                return jnp.sum(slots.run_stack(nnx.merge(graphdef, state), x, segments, rows))

        return jax.jit(jax.grad(loss)).lower(state, x).compile().memory_analysis().temp_size_in_bytes

    assert temp("recompute") < 0.7 * temp("keep")
    assert [slot_residual_mode("auto", p) for p in ("cpu", "gpu", "tpu")] == ["recompute", "keep", "keep"]
    assert slot_residual_mode("keep", "cpu") == "keep"
    with pytest.raises(ValueError, match="ladder residuals"):
        with slots.ladder_residuals("auto"):
            pass


def test_slots_computed_counts_each_group_at_its_length(stack_and_rows):
    _, _, _, counts = stack_and_rows  # sorted: 40 33 | 30 17 | 5 2
    assert float(slots.slots_computed(slots.SlotRows(counts, (8, 16, 32, 40), 3, 0))) == 2 * 40 + 2 * 32 + 2 * 8
    assert float(slots.slots_computed(slots.SlotRows(counts, (8, 16, 32, 40), 1, 0))) == 6 * 40


def test_a_document_scores_the_same_whatever_rows_share_its_batch(config_1stage):
    """The same document beside sparse rows (a short ladder length) and beside rows that keep
    many chunks (the static cap): the same logits (float32 rounding) and the same chunks."""
    config = config_lib.replace(config_1stage, capacity_multiple=16, **LADDER)
    model = hnet.build_model(config, seed=0)
    forward = jax.jit(lambda state, ids: nnx.merge(*state)(ids))
    state = nnx.split(model)
    rng = np.random.default_rng(5)
    document = np.frombuffer(b"def scored(document):\n    return sum(len(x) for x in document)\n" * 6, np.uint8)[:300]
    document = np.concatenate([[hnet.BOS_ID], document, np.full(512 - 301, 32)]).astype(np.int32)
    quiet = np.full((3, 512), ord("a"), np.int32)  # the router keeps few chunks in these
    busy = rng.integers(0, 250, size=(3, 512)).astype(np.int32)  # and many in these
    out_quiet = forward(state, np.concatenate([document[None], quiet]))
    out_busy = forward(state, np.concatenate([busy, document[None]]))
    quiet_slots = float(out_quiet.stages[0].chunk_slots)
    assert quiet_slots < float(out_busy.stages[0].chunk_slots), "the two batches run on different lengths"
    np.testing.assert_allclose(out_quiet.logits[0, :301], out_busy.logits[3, :301], atol=1e-5)
    np.testing.assert_array_equal(out_quiet.stages[0].chunk_mask[0], out_busy.stages[0].chunk_mask[3])
