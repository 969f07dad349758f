"""hnet.training.optim: the learning-rate schedules, the weight-decay mask, per-stage multipliers
and the AdamW chain they make, each against a value worked out by hand."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import hnet
from hnet.training import optim
from hnet.training.run_config import TrainConfig
from conftest import tiny_config

TRAIN = TrainConfig(steps=100, lr=1e-2, warmup_frac=0.1, decay_frac=0.2, min_lr_frac=0.1)


def schedule_values(train: TrainConfig, steps) -> np.ndarray:
    schedule = optim.learning_rate_schedule(train)
    return np.array([float(schedule(step)) for step in steps])


def test_wsd_warms_up_holds_then_decays_to_the_floor():
    values = schedule_values(TRAIN, [0, 5, 10, 50, 80, 90, 100])
    # 10 warmup steps from 0, constant until step 80, then linear over the last 20 to 0.1 x lr.
    np.testing.assert_allclose(values, [0.0, 5e-3, 1e-2, 1e-2, 1e-2, 5.5e-3, 1e-3], rtol=1e-6, atol=1e-9)


def test_cosine_and_constant_schedules_after_warmup():
    cosine = schedule_values(dataclasses.replace(TRAIN, schedule="cosine"), [10, 55, 100])
    # Half way through the 90 cosine steps: the mean of peak and floor.
    np.testing.assert_allclose(cosine, [1e-2, (1e-2 + 1e-3) / 2, 1e-3], rtol=1e-5)
    constant = schedule_values(dataclasses.replace(TRAIN, schedule="constant", warmup_frac=0.0), [0, 50, 100])
    np.testing.assert_allclose(constant, [1e-2] * 3)


def test_weight_decay_reaches_matrices_but_not_embeddings_norms_biases_or_mamba_scalars():
    params = nnx.state(hnet.build_model(tiny_config("hnet_1stage_tiny"), seed=0), nnx.Param)
    params = nnx.to_pure_dict(params)
    mask = optim.weight_decay_mask(params)
    decayed = {
        "/".join(str(getattr(k, "key", k)) for k in path): bool(flag)
        for path, flag in jax.tree_util.tree_leaves_with_path(mask)
    }
    assert decayed["lm_head/kernel"] and decayed["backbone/inner/main/blocks/0/mlp/fc1/kernel"]
    assert not decayed["embedding/embedding"]
    no_decay = [name for name, flag in decayed.items() if not flag]
    for suffix in ("A_log", "dt_bias", "D", "norm/weight"):
        assert any(name.endswith(suffix) for name in no_decay), suffix
    assert all(not decayed[name] for name in decayed if name.endswith(("A_log", "dt_bias", "/D", "bias")))


def test_stage_of_counts_inner_links_and_multipliers_follow_it():
    params = {
        "embedding": jnp.zeros((4, 2)),
        "backbone": {"encoder": jnp.zeros((2, 2)), "inner": {"main": jnp.zeros((2, 2))}},
        "lm_head": jnp.zeros((2, 4)),
    }
    factors = optim.stage_multipliers(params, (3.0, 1.5))
    assert float(factors["embedding"]) == float(factors["lm_head"]) == float(factors["backbone"]["encoder"]) == 3.0
    assert float(factors["backbone"]["inner"]["main"]) == 1.5


def test_make_optimizer_is_clipped_adamw_with_masked_decay_and_stage_learning_rates():
    """One update by hand: clip to norm 1, Adam's first step (a unit step in the gradient's sign),
    decoupled decay on the matrix only, times -lr(0) and the stage's multiplier."""
    train = dataclasses.replace(TRAIN, warmup_frac=0.0, weight_decay=0.5, stage_lr_multipliers=(2.0, 1.0))
    params = {"outer": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.ones(2)}, "inner": {"kernel": jnp.ones((2, 2))}}
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 10.0), params)  # norm 10 sqrt(10): clipped
    optimizer, schedule = optim.make_optimizer(train, params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    lr = float(schedule(0))
    assert lr == pytest.approx(1e-2)
    adam = 1.0 / (1.0 + 1e-8 / 1.0)  # m / (sqrt(v) + eps) at step 1, any gradient of this sign
    np.testing.assert_allclose(updates["outer"]["kernel"], -lr * 2.0 * (adam + 0.5 * 2.0), rtol=1e-5)
    np.testing.assert_allclose(updates["outer"]["bias"], -lr * 2.0 * adam, rtol=1e-5)  # 1-D: no decay
    np.testing.assert_allclose(updates["inner"]["kernel"], -lr * 1.0 * (adam + 0.5 * 1.0), rtol=1e-5)
    # The clip is global (all ten gradient entries together, norm 10 sqrt(10), scaled to norm 1),
    # and Adam's moments see the clipped gradient.
    _, state = optimizer.update(grads, optimizer.init(params), params)
    adam_state = state[1]
    assert isinstance(adam_state, optax.ScaleByAdamState)
    expected_mu = (1 - train.b1) * 10.0 / np.sqrt(10 * 10.0**2)
    np.testing.assert_allclose(adam_state.mu["inner"]["kernel"], expected_mu, rtol=1e-5)
