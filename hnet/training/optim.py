"""Optimizer: AdamW with global-norm clipping, a learning-rate schedule, weight-decay exclusions
and per-stage learning-rate multipliers.

The chain is  clip -> Adam moments -> decoupled weight decay (masked) -> -lr(step) -> x stage
multiplier. Scaling the final update per stage equals giving each stage its own learning rate
(weight decay included, as in PyTorch's AdamW parameter groups).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from hnet.training.run_config import TrainConfig


def learning_rate_schedule(train: TrainConfig) -> optax.Schedule:
    """Linear warmup, then wsd (constant, then linear decay over decay_frac), cosine, or constant."""
    steps = train.steps
    warmup = int(round(train.warmup_frac * steps))
    peak, floor = train.lr, train.lr * train.min_lr_frac
    warm = optax.linear_schedule(0.0 if warmup else peak, peak, max(warmup, 1))
    if train.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif train.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, max(steps - warmup, 1), alpha=train.min_lr_frac)
    else:  # wsd
        decay = int(round(train.decay_frac * steps))
        stable = steps - warmup - decay
        after = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, max(decay, 1))], [stable]
        )
    return optax.join_schedules([warm, after], [warmup])


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def weight_decay_mask(params):
    """True for weights that decay: matrices (linear kernels, conv, routing) except embeddings.

    Norms, biases, Mamba's A_log / dt_bias / D and padding vectors are 1-D and never decay.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf.ndim >= 2 and "embedding" not in _path_names(path), params
    )


def stage_of(path) -> int:
    """The stage a parameter belongs to: the number of `inner` links on its path (embedding and
    lm_head belong to stage 0)."""
    return sum(name == "inner" for name in _path_names(path))


def stage_multipliers(params, multipliers):
    """Per-leaf learning-rate multiplier pytree (float32 scalars)."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf: jnp.float32(multipliers[stage_of(path)]), params)


def scale_by_tree(factors) -> optax.GradientTransformation:
    """Multiply each update leaf by the matching leaf of `factors`."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(lambda u, f: u * f.astype(u.dtype), updates, factors), state

    return optax.GradientTransformation(init, update)


def make_optimizer(train: TrainConfig, params) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer for `params` (a pytree of float32 arrays) and its learning-rate schedule."""
    schedule = learning_rate_schedule(train)
    parts = [
        optax.clip_by_global_norm(train.grad_clip),
        optax.scale_by_adam(b1=train.b1, b2=train.b2, eps=train.eps),
        optax.add_decayed_weights(train.weight_decay, mask=weight_decay_mask(params)),
        optax.scale_by_learning_rate(schedule),
    ]
    if train.stage_lr_multipliers is not None:
        parts.append(scale_by_tree(stage_multipliers(params, train.stage_lr_multipliers)))
    return optax.chain(*parts), schedule
