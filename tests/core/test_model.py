"""Whole-model properties: causality (with many, few and dropped boundaries), documents isolated in
packed rows, prefix consistency, the public API, gradients into the router through both paths,
one compile per input shape, every config runs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hnet
from hnet import chunking
from hnet.config import AttnConfig, replace
from hnet.segments import Segments
from conftest import CONFIGS, jit_forward, shrink, tiny_config

LENGTH = 96


def byte_batch(seed: int, batch: int = 2, length: int = LENGTH) -> jnp.ndarray:
    """Random printable bytes with a document start (BOS) in the middle of row 0."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(32, 127, size=(batch, length))
    ids[0, length // 2] = hnet.BOS_ID
    return jnp.asarray(ids, jnp.int32)


def set_routing(model, mode: str, input_ids):
    """Rank-1 routing weights along the mean encoder direction u: with W_q = W_k = u u^T
    neighbours look alike (few boundaries); with W_k = -u u^T they look opposite (many)."""
    for stage in stages_of(model):
        stage.routing.q_proj[...] = jnp.eye(stage.routing.q_proj.shape[0])
        stage.routing.k_proj[...] = jnp.eye(stage.routing.q_proj.shape[0])
    if mode == "fresh":
        return
    one_document = Segments.from_starts(jnp.zeros(input_ids.shape, bool))
    hidden = model.backbone.encoder.forward(model.embedding(input_ids), one_document)[0]
    u = hidden.mean((0, 1))
    u = u / jnp.linalg.norm(u)
    projection = jnp.outer(u, u)
    model.backbone.routing.q_proj[...] = projection
    model.backbone.routing.k_proj[...] = projection if mode == "few" else -projection


def perturb_residual_proj(model):
    """residual_proj starts at zero; make it nonzero so every path into the decoder is exercised."""
    for i, stage in enumerate(stages_of(model)):
        kernel, bias = stage.residual_proj.kernel, stage.residual_proj.bias
        kernel[...] = 0.1 * jax.random.normal(jax.random.key(i), kernel.shape)
        bias[...] = 0.1 * jax.random.normal(jax.random.key(100 + i), bias.shape)


def stages_of(model):
    stage = model.backbone
    while not stage.is_main:
        yield stage
        stage = stage.inner


@pytest.fixture(scope="module")
def models(config_1stage, config_2stage):
    """One model and one jitted forward per depth, shared by the tests in this file."""
    out = {}
    for name, config in (("1stage", config_1stage), ("2stage", config_2stage)):
        model = hnet.build_model(config, seed=0)
        perturb_residual_proj(model)
        out[name] = (model, jit_forward(model))
    return out


@pytest.mark.parametrize("depth", ["1stage", "2stage"])
@pytest.mark.parametrize("routing", ["fresh", "many", "few"])
def test_causality(models, depth, routing):
    model, forward = models[depth]
    ids = byte_batch(0)
    set_routing(model, routing, ids)
    base = forward(ids)
    fraction = float(base.stages[0].selected_fraction)
    if routing == "many":
        assert fraction > 0.7
    if routing == "few":
        assert fraction < 0.3
    for t in (10, LENGTH // 2 + 3, LENGTH - 2):
        changed = ids.at[:, t + 1 :].set(byte_batch(t + 1)[:, t + 1 :])
        out = forward(changed)
        np.testing.assert_allclose(out.logits[:, : t + 1], base.logits[:, : t + 1], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out.stages[0].boundary_mask[:, : t + 1], base.stages[0].boundary_mask[:, : t + 1])
        assert not np.allclose(out.logits[:, t + 1 :], base.logits[:, t + 1 :])
    set_routing(model, "fresh", ids)


def test_dropped_boundaries_are_counted_and_causal():
    config = tiny_config("hnet_1stage_tiny", capacity_slack=1.0, capacity_burst=2, capacity_multiple=8)
    model = hnet.build_model(config, seed=0)
    perturb_residual_proj(model)
    forward = jit_forward(model)
    ids = byte_batch(3)
    set_routing(model, "many", ids)
    base = forward(ids)
    stage = base.stages[0]
    boundaries = np.asarray(stage.boundary_mask).sum(axis=1)
    chunks = np.asarray(stage.chunk_mask).sum(axis=1)
    assert np.all(boundaries > chunks)  # far more boundaries than the rule's rate allows
    assert float(stage.dropped) == float(np.sum(boundaries - chunks)) == float(stage.boundary_count - stage.chunk_count)
    assert not np.any(np.asarray(stage.chunk_mask) & ~np.asarray(stage.boundary_mask))
    assert stage.chunk_position.shape == (2, chunking.CapacityRule.for_stage(config, 0).row_capacity(LENGTH))
    for t in (5, 40, 80):
        changed = ids.at[:, t + 1 :].set(byte_batch(t)[:, t + 1 :])
        np.testing.assert_allclose(forward(changed).logits[:, : t + 1], base.logits[:, : t + 1], rtol=1e-5, atol=1e-5)
    set_routing(model, "fresh", ids)


ISOLATION_KINDS = {  # name: (config, changes); learned routing at the exact setting (see below)
    "1stage": ("hnet_1stage_tiny", {"capacity_slack": "exact"}),
    "2stage": ("hnet_2stage_tiny", {"capacity_slack": "exact"}),
    "space": ("hnet_1stage_tiny", {"routing": ("space",)}),
    "stride": ("hnet_2stage_tiny", {"routing": ("stride:2", "stride:3")}),
    "byte": ("transformer_byte_tiny", {}),
    "bpe": ("transformer_bpe_tiny", {}),
}


def packed_rows(config, seed: int, length: int = 64):
    """Rows of several documents (random lengths, some only a BOS) ending with a document B,
    and the same B alone from position 0. -> (packed, alone, B's first position per row)."""
    rng = np.random.default_rng(seed)
    bos = config.bos_id
    low, high = (32, 127) if config.is_byte_model else (1, config.vocab_size)
    packed = np.zeros((3, length), np.int32)
    alone = np.zeros((3, length), np.int32)
    b_start = []
    for row in range(3):
        tokens = []
        for doc_length in rng.choice([1, 1, 2, 5, 13, 22], size=rng.integers(1, 4)):
            tokens += [bos] + list(rng.integers(low, high, doc_length - 1))
        tokens = tokens[: length - 8]
        b_start.append(len(tokens))
        b = [bos] + list(rng.integers(low, high, length - len(tokens) - 1))
        packed[row] = tokens + b
        alone[row, : len(b)] = b
        alone[row, len(b) :] = rng.integers(low, high, length - len(b))  # right padding (ignored)
    return jnp.asarray(packed), jnp.asarray(alone), b_start


@pytest.mark.parametrize("kind", sorted(ISOLATION_KINDS))
def test_documents_in_a_packed_row_are_isolated(kind):
    """[BOS A ... BOS B]: B's logits equal those of [BOS B] alone, in every layer kind.

    Learned routing runs at the exact capacity setting: at a finite slack, a row packing several
    documents whose routers all select faster than the rate shares one row allowance (see
    hnet.chunking.chunk_layout), which is counted as dropped, not isolated.
    """
    name, changes = ISOLATION_KINDS[kind]
    config = replace(shrink(tiny_config(name)), **changes)
    model = hnet.build_model(config, seed=3)
    if config.depth:
        perturb_residual_proj(model)
    forward = jit_forward(model)
    packed, alone, b_start = packed_rows(config, seed=len(kind))
    out_packed, out_alone = forward(packed), forward(alone)
    for row, start in enumerate(b_start):
        n = packed.shape[1] - start
        np.testing.assert_allclose(out_packed.logits[row, start:], out_alone.logits[row, :n], rtol=1e-5, atol=1e-5)
    if config.depth:
        for s_packed, s_alone in zip(out_packed.stages[:1], out_alone.stages[:1]):
            for row, start in enumerate(b_start):
                n = packed.shape[1] - start
                np.testing.assert_array_equal(s_packed.chunk_mask[row, start:], s_alone.chunk_mask[row, :n])
        assert float(out_packed.stages[0].dropped) == 0.0


@pytest.mark.parametrize("depth", ["1stage", "2stage"])
def test_prefix_of_a_row_is_computed_as_the_prefix_alone(depth):
    """With untrained routing at a capacity that drops boundaries (the training default for
    1-stage): the first t positions of a forward over L equal a forward over those t alone."""
    config = shrink(tiny_config(f"hnet_{depth}_tiny"))
    if depth == "2stage":  # N = 3: untrained routing (about half the positions) drops only below slack 1.5
        config = replace(config, capacity_slack=1.25)
    model = hnet.build_model(config, seed=4)
    perturb_residual_proj(model)
    forward = jit_forward(model)
    ids = byte_batch(11, batch=3, length=120)
    full = forward(ids)
    assert float(sum(s.dropped for s in full.stages)) > 0
    for t in (37, 90):
        prefix = forward(ids[:, :t])
        np.testing.assert_allclose(prefix.logits, full.logits[:, :t], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(prefix.stages[0].chunk_mask, full.stages[0].chunk_mask[:, :t])
        np.testing.assert_array_equal(prefix.stages[0].boundary_mask, full.stages[0].boundary_mask[:, :t])


def test_public_api_shapes(models, config_2stage):
    model, forward = models["2stage"]
    ids = byte_batch(1)
    out = forward(ids)
    assert out.logits.shape == (2, LENGTH, 256) and out.logits.dtype == jnp.float32
    assert len(out.stages) == 2
    lengths = chunking.stage_lengths(config_2stage, LENGTH)
    for stage, length in zip(out.stages, lengths):
        assert stage.boundary_mask.shape == (2, length) and stage.boundary_mask.dtype == jnp.bool_
        assert stage.boundary_prob.shape == (2, length)
        assert np.isfinite(float(stage.ratio_loss))
    # Document starts are always boundaries, with probability 1.
    assert (
        bool(out.stages[0].boundary_mask[0, LENGTH // 2]) and float(out.stages[0].boundary_prob[0, LENGTH // 2]) == 1.0
    )
    assert bool(jnp.all(out.stages[0].boundary_mask[:, 0]))


def test_transformer_baseline_has_no_stages():
    config = tiny_config("transformer_byte_tiny")
    model = hnet.build_model(config)
    assert isinstance(model, hnet.TransformerLM)
    out = model(byte_batch(0, length=16))
    assert out.stages == () and out.logits.shape == (2, 16, 256)


def ce_loss_and_router_grads(model, ids):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def grads(params):
        def loss(params):
            out = nnx.merge(graphdef, params, rest)(ids)
            return hnet.cross_entropy(out.logits[:, :-1], ids[:, 1:]).mean()

        return jax.grad(loss)(params)

    routing = grads(params)["backbone"]["routing"]
    return float(jnp.abs(routing["q_proj"][...]).sum()), float(jnp.abs(routing["k_proj"][...]).sum())


def test_gradients_reach_router_through_ste_and_ema_paths(monkeypatch, config_1stage):
    model = hnet.build_model(shrink(config_1stage), seed=0)
    ids = byte_batch(2)
    both = ce_loss_and_router_grads(model, ids)
    assert min(both) > 0

    # EMA path only: the STE contributes no gradient.
    monkeypatch.setattr(chunking, "straight_through", lambda c: jnp.ones_like(c))
    ema_only = ce_loss_and_router_grads(model, ids)
    assert min(ema_only) > 0
    monkeypatch.undo()

    # STE path only: no gradient through the smoothing probabilities.
    original = chunking.dechunk
    monkeypatch.setattr(
        chunking, "dechunk", lambda v, p, start, layout: original(v, jax.lax.stop_gradient(p), start, layout)
    )
    ste_only = ce_loss_and_router_grads(model, ids)
    assert min(ste_only) > 0
    assert ste_only != pytest.approx(both) and ema_only != pytest.approx(both)


def test_forward_compiles_once_per_shape(models):
    model, forward = models["1stage"]
    forward(byte_batch(5))
    before = forward.jitted._cache_size()
    forward(byte_batch(6))
    model.lm_head.kernel[...] = model.lm_head.kernel[...] * 1.0001  # new weights, same shapes
    forward(byte_batch(7))
    assert forward.jitted._cache_size() == before
    forward(byte_batch(8, length=64))
    assert forward.jitted._cache_size() == before + 1


def distinct_shrunken_configs() -> dict[str, hnet.ModelConfig]:
    """Every model config in configs/, shrunk; configs that shrink to the same one (e.g. the S, M
    and L sizes of one layout) are run once, named after all of them."""
    groups: dict[str, tuple[list, hnet.ModelConfig]] = {}
    for path in sorted(CONFIGS.glob("*.json")):
        if "arch_layout" in json.loads(path.read_text()):
            config = shrink(replace(hnet.load_config(path), dtype="float32"))
            key = json.dumps(config.to_dict(), sort_keys=True)
            groups.setdefault(key, ([], config))[0].append(path.stem)
    return {"+".join(names): config for names, config in groups.values()}


SHRUNKEN_CONFIGS = distinct_shrunken_configs()


@pytest.mark.parametrize("name", sorted(SHRUNKEN_CONFIGS))
def test_shrunken_copy_of_every_config_runs(name):
    config = SHRUNKEN_CONFIGS[name]
    model = hnet.build_model(config)
    out = jit_forward(model)(byte_batch(0, length=40))
    assert out.logits.shape == (2, 40, config.vocab_size)
    assert np.all(np.isfinite(np.asarray(out.logits)))
    assert len(out.stages) == config.depth


def test_heuristic_routing_runs_without_ratio_loss(config_1stage):
    for mode in ("space", "stride:4"):
        model = hnet.build_model(replace(shrink(config_1stage), routing=(mode,)))
        ids = jnp.asarray([list(b"def f(x):\n    return x + 1\n" * 3)[:64]], jnp.int32)
        stage = jit_forward(model)(ids).stages[0]
        assert float(stage.ratio_loss) == 0.0
        expected = (
            chunking.space_boundaries(ids)
            if mode == "space"
            else chunking.stride_boundaries(jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape), 4)
        )
        np.testing.assert_array_equal(stage.boundary_mask, expected)


@pytest.mark.parametrize("mode", ["space", "stride:3"])
def test_causality_with_heuristic_routing(config_1stage, mode):
    model = hnet.build_model(replace(shrink(config_1stage), routing=(mode,)))
    perturb_residual_proj(model)
    forward = jit_forward(model)
    ids = jnp.asarray(
        [list(b"for word in text.split(): print(word, len(word))  # a comment\n" * 2)[:LENGTH]] * 2, jnp.int32
    )
    base = forward(ids)
    for t in (7, 50, 90):
        changed = ids.at[:, t + 1 :].set(byte_batch(t)[:, t + 1 :])
        out = forward(changed)
        np.testing.assert_allclose(out.logits[:, : t + 1], base.logits[:, : t + 1], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out.stages[0].boundary_mask[:, : t + 1], base.stages[0].boundary_mask[:, : t + 1])


def test_three_stage_hierarchy_runs_and_is_causal(config_2stage):
    config = replace(
        shrink(config_2stage),
        arch_layout=("m1", ("m1", ("m1", ("T1",), "m1"), "m1"), "m1"),
        d_model=(32, 32, 48, 64),
        d_intermediate=(0, 0, 0, 64),
        target_ratio=(2, 2, 2),
        routing=None,
        attn_cfg=AttnConfig(num_heads=(2,) * 4, rotary_emb_dim=(8,) * 4, window_size=(-1,) * 4),
    )
    model = hnet.build_model(config)
    perturb_residual_proj(model)
    forward = jit_forward(model)
    ids = byte_batch(4)
    base = forward(ids)
    assert len(base.stages) == 3
    assert [s.boundary_mask.shape[1] for s in base.stages] == chunking.stage_lengths(config, LENGTH)[:3]
    changed = ids.at[:, 41:].set(byte_batch(9)[:, 41:])
    np.testing.assert_allclose(forward(changed).logits[:, :41], base.logits[:, :41], rtol=1e-5, atol=1e-5)


def test_rematerialised_runs_of_blocks_are_one_scan_with_the_loop_values(config_1stage):
    """Under remat, a run of identical blocks ("T3" of "T3m2") is one lax.scan over their stacked
    parameters: the same outputs and gradients as the blocks one after the other."""
    from hnet.layers.isotropic import Isotropic, rematerialise

    config = shrink(config_1stage)
    stack = Isotropic("T3m2", config, 1, 5, nnx.Rngs(params=2))
    graphdef, state = nnx.split(stack)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 24, config.d_model[1])), jnp.float32)
    starts = np.zeros((2, 24), bool)
    starts[:, 0] = starts[1, 9] = True
    segments = Segments.from_starts(jnp.asarray(starts))
    weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def loss(state, x, remat):
        with rematerialise(remat):
            return jnp.sum(nnx.merge(graphdef, state).forward(x, segments)[0] * weights)

    def scans_over_blocks(
        remat,
    ):  # top-level scans of length 3 or 2 (the SSD's scans have 24 / 16 = 2 chunks inside a block)
        jaxpr = jax.make_jaxpr(jax.grad(loss), static_argnums=2)(state, x, remat)
        return sorted(eqn.params["length"] for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "scan")

    assert scans_over_blocks("block") == [2, 2, 3, 3]  # T3 and m2, forward and backward
    assert 3 not in scans_over_blocks("none")
    results = {
        remat: jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)(state, x, remat)
        for remat in ("none", "block")
    }
    for want, got in zip(jax.tree_util.tree_leaves(results["none"]), jax.tree_util.tree_leaves(results["block"])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_rematerialised_blocks_give_the_same_gradients(config_1stage, monkeypatch):
    """train.remat changes what the backward pass keeps, not what it computes; the blockwise
    attention path (rows longer than its query block) is part of the model here."""
    from hnet.layers.kernels import attention
    from hnet.training.train_step import micro_grads, step_compiler_options

    monkeypatch.setattr(attention, "QUERY_BLOCK", 16)  # so the main network's attention runs blockwise
    model = hnet.build_model(shrink(config_1stage), seed=0)  # every kind of block, one of each
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 65)), jnp.int32).at[:, 0].set(254)
    results = {}
    for remat in ("none", "block"):  # block: what train.remat=auto picks for the S models
        step = jax.jit(
            lambda p, x, y, remat=remat: micro_grads(p, x, y, graphdef=graphdef, ratio_loss_weight=0.03, remat=remat),
            compiler_options=step_compiler_options(remat, jax.devices()[0].platform),
        )  # as the train step
        results[remat] = step(params, tokens[:, :-1], tokens[:, 1:])
    for want, got in zip(jax.tree_util.tree_leaves(results["none"]), jax.tree_util.tree_leaves(results["block"])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
