"""One training step, top to bottom: the loss of a micro-batch, the step (gradient accumulation,
AdamW update, non-finite skip), the evaluation step; then StepFunctions, those steps jitted over
a device mesh with explicit shardings.

Loss = next-byte cross-entropy (nats) + ratio_loss_weight * sum over stages of the ratio loss.
A token run (a flat Transformer over BPE tokens) predicts tokens instead of bytes.

The train state is a dict: params (nnx.Param state), opt_state (optax), nonfinite_run (steps in a
row whose loss or gradient was not finite) and nonfinite_total.

docs/ARCHITECTURE.md section 3 shows where the step sits in the data flow.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from hnet import logical_axes
from hnet.config import parse_layout
from hnet.layers.isotropic import rematerialise
from hnet.model import build_model, cross_entropy
from hnet.parallel import sharding
from hnet.slots import ladder_residuals
from hnet.stage_metrics import stage_metric
from hnet.training.optim import make_optimizer
from hnet.training.run_config import RunConfig


def loss_and_metrics(model, input_ids, targets, mask, ratio_loss_weight: float):
    """Scalar loss and a metrics dict for one (micro-)batch: input_ids, targets (B, L) int32,
    mask (B, L) float32 marking the scored targets."""
    out = model(input_ids)
    nll = cross_entropy(out.logits, targets)
    count = jnp.maximum(mask.sum(), 1.0)
    ce = jnp.sum(nll * mask) / count
    ratio = sum((stage.ratio_loss for stage in out.stages), jnp.zeros((), jnp.float32))
    metrics = {"ce": ce, "ratio_loss": ratio}
    for s, stage in enumerate(out.stages):
        metrics[stage_metric(s, "bytes_per_chunk")] = stage.bytes_per_chunk
        metrics[stage_metric(s, "dropped_rate")] = stage.dropped / jnp.maximum(stage.boundary_count, 1.0)
        metrics[stage_metric(s, "slot_utilisation")] = stage.chunk_count / jnp.maximum(stage.chunk_slots, 1.0)
    return ce + ratio_loss_weight * ratio, metrics


def micro_grads(
    params,
    input_ids,
    targets,
    *,
    graphdef,
    ratio_loss_weight: float,
    remat: str = "none",
    slot_residuals: str = "keep",
):
    """Gradients of one micro-batch (b, L) -> (grads like params, metrics including "loss").
    remat: a rematerialisation policy name (hnet.layers.isotropic.REMAT_POLICIES); slot_residuals:
    "keep" or "recompute" (hnet.slots.ladder_residuals)."""

    def loss_fn(params):
        model = nnx.merge(graphdef, params)
        with rematerialise(remat), ladder_residuals(slot_residuals):
            return loss_and_metrics(model, input_ids, targets, jnp.ones(targets.shape, jnp.float32), ratio_loss_weight)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, {"loss": loss, **metrics}


def train_step(
    state: dict,
    input_ids,
    targets,
    *,
    graphdef,
    tx: optax.GradientTransformation,
    ratio_loss_weight: float,
    remat: str = "none",
    slot_residuals: str = "keep",
):
    """One optimizer step. input_ids, targets: (A, b, L) micro-batches; gradients averaged over A.

    A step whose loss or gradient norm is not finite leaves params and optimizer state untouched
    and is counted. Returns (new state, metrics of the step).
    """
    params = state["params"]
    grads_of = functools.partial(
        micro_grads, graphdef=graphdef, ratio_loss_weight=ratio_loss_weight, remat=remat, slot_residuals=slot_residuals
    )
    if input_ids.shape[0] == 1:
        grads, metrics = grads_of(params, input_ids[0], targets[0])
    else:
        # Gradients are summed in the carry (shaped like params); each micro-batch's metrics come
        # out of the scan and are summed after it in the same order. Nothing asks for the metrics'
        # shapes beforehand: jax.eval_shape would trace the whole forward and backward pass a
        # second time, doubling a deep model's trace time.
        def accumulate(grad_sum, micro):
            grads, metrics = grads_of(params, *micro)
            return jax.tree_util.tree_map(jnp.add, grad_sum, grads), metrics

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        grads, per_micro = jax.lax.scan(accumulate, zeros, (input_ids, targets))
        metrics = jax.tree_util.tree_map(lambda m: functools.reduce(jnp.add, m, jnp.zeros_like(m[0])), per_micro)
        scale = 1.0 / input_ids.shape[0]
        grads, metrics = jax.tree_util.tree_map(lambda x: x * scale, (grads, metrics))
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    updates, new_opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {
        "params": keep(new_params, params),
        "opt_state": keep(new_opt_state, state["opt_state"]),
        "nonfinite_run": jnp.where(finite, 0, state["nonfinite_run"] + 1),
        "nonfinite_total": state["nonfinite_total"] + (~finite).astype(jnp.int32),
    }
    metrics = {**metrics, "grad_norm": grad_norm, "finite": finite, "nonfinite_run": new_state["nonfinite_run"]}
    return new_state, metrics


def eval_step(params, input_ids, targets, mask, *, graphdef) -> dict:
    """Sums over a (B, L) batch, so that evaluation adds batches up exactly: NLL, scored targets,
    and per stage the router's boundaries, the chunks, the dropped boundaries and the chunk slots
    computed."""
    out = nnx.merge(graphdef, params)(input_ids)
    nll = cross_entropy(out.logits, targets)
    sums = {"nll": jnp.sum(nll * mask), "bytes": jnp.sum(mask)}
    for s, stage in enumerate(out.stages):
        sums[stage_metric(s, "boundaries")] = stage.boundary_count
        sums[stage_metric(s, "chunks")] = stage.chunk_count
        sums[stage_metric(s, "dropped")] = stage.dropped
        sums[stage_metric(s, "slots")] = stage.chunk_slots
    return sums


# train.remat = "auto", by how many values the residual streams of one sequence hold (sequence
# length x the widths of all blocks, ignoring chunking): below 2^24 (the tiny models) nothing is
# rematerialised; below 2^26 (the S and M Transformers at 8192 bytes) "dots", which keeps every
# matmul output and recomputes only elementwise work; from 2^26 (the H-Nets from S up) "block".
# At 8192 bytes on XLA's CPU analysis "dots" keeps 1.1 (byte) and 1.8 (BPE) GiB per S sequence,
# against 2.9 and 3.9 GiB for the 1- and 2-stage S H-Nets (docs/PERFORMANCE.md).
REMAT_AUTO_MIN_VALUES = 1 << 24
REMAT_DOTS_MAX_VALUES = 1 << 26


def remat_policy(remat: str, config, seq_len: int) -> str:
    """train.remat -> the policy name the step uses (hnet.layers.isotropic.REMAT_POLICIES)."""
    if remat != "auto":
        return remat
    widths = sum(
        count * config.d_model[stage]
        for stage in range(config.depth + 1)
        for layout in config.stage_layout(stage)
        for _, count in parse_layout(layout)
    )
    values = seq_len * widths
    return "none" if values < REMAT_AUTO_MIN_VALUES else "dots" if values < REMAT_DOTS_MAX_VALUES else "block"


# XLA's CPU compiler removes optimization barriers before its last common-subexpression pass, so
# the forward that jax.checkpoint recomputes for the backward pass is merged back into the first
# forward and every block's activations are kept after all (GPU and TPU remove the barriers only
# after scheduling). Keeping the pass off on CPU makes rematerialisation real there too; the
# barriers compute nothing, so values are unchanged.
CPU_REMAT_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def slot_residual_mode(slot_residuals: str, platform: str) -> str:
    """train.slot_residuals -> "keep" or "recompute" (hnet.slots.ladder_residuals) on `platform`.

    auto: recompute on CPU, where padding the taken branch's residuals to the cap and stacking them
    over the row groups is memory traffic that costs more than the inner stacks' forward (the
    default run's step: docs/PERFORMANCE.md); keep on GPU and TPU, whose memory bandwidth makes
    those copies cheap next to a second forward of the inner stacks.
    """
    if slot_residuals != "auto":
        return slot_residuals
    return "recompute" if platform == "cpu" else "keep"


def step_compiler_options(policy: str, platform: str) -> dict | None:
    """XLA options for the jitted train step under remat `policy` on `platform` ("cpu", "gpu", ...)."""
    return CPU_REMAT_COMPILER_OPTIONS if policy != "none" and platform == "cpu" else None


def fresh_state(params, tx: optax.GradientTransformation) -> dict:
    """The train state at step 0 for these parameters."""
    return {
        "params": params,
        "opt_state": tx.init(params),
        "nonfinite_run": jnp.zeros((), jnp.int32),
        "nonfinite_total": jnp.zeros((), jnp.int32),
    }


# --------------------------------------------------------------------------------------------
# The steps jitted over a mesh
# --------------------------------------------------------------------------------------------


@dataclass
class StepFunctions:
    """The jitted steps of one run, laid out over `mesh` (see hnet.parallel.sharding).

    Arrays in and out are global: the train state is sharded by `state_shardings` (parameters and
    optimizer state by their logical axes), batches are split over data x fsdp.
    """

    train_step: callable  # (state, input_ids (A, b, L), targets (A, b, L)) -> (state, metrics)
    eval_step: callable  # (params, input_ids (B, L), targets, mask) -> sums
    init: callable  # () -> a fresh train state, already sharded
    schedule: callable
    tx: optax.GradientTransformation
    mesh: Mesh
    state_shardings: Any  # NamedSharding leaves, structured like the train state
    abstract_state: Any  # ShapeDtypeStructs with those shardings (checkpoint restore)
    micro_batch_sharding: NamedSharding  # (A, b, L) train inputs
    batch_sharding: NamedSharding  # (B, L) eval inputs

    def place_train_batch(self, local: np.ndarray) -> jax.Array:
        """This process's (A, b / P, L) rows -> the global (A, b, L) array (no cross-host traffic)."""
        return sharding.place_local_batch(local, self.micro_batch_sharding, batch_dim=1)

    def place_eval_batch(self, full: np.ndarray) -> jax.Array:
        """A (B, L) batch that every process holds in full -> the global array."""
        return sharding.place_global_batch(full, self.batch_sharding)


_STEP_FUNCTIONS: dict[tuple, StepFunctions] = {}


def make_step_functions(run: RunConfig, mesh: Mesh | None = None) -> tuple[Any, StepFunctions]:
    """-> (graphdef, StepFunctions) for a run on `mesh`; by default the mesh of run.mesh over all
    devices of all processes, checked against the run's batch (ConfigError, one line, when the
    sizes do not fit the devices or the batch).

    The one place that builds the run's model abstractly (graphdef and parameter shapes with their
    logical axes, nothing allocated) and its mesh. Cached per model, train config and mesh, so that
    a resumed or repeated run in the same process reuses the compiled steps instead of compiling
    again.
    """
    graphdef, abstract_params = nnx.split(
        nnx.eval_shape(lambda: build_model(run.model_config, seed=run.train.seed)), nnx.Param
    )
    if mesh is None:
        mesh = sharding.make_mesh(**dataclasses.asdict(run.mesh), param_count=sharding.param_count(abstract_params))
        sharding.check_batch(mesh, run.train.batch_size // run.train.grad_accum)
    key = (json.dumps({"model": run.model, "train": run.to_dict()["train"]}, sort_keys=True), mesh)
    if key not in _STEP_FUNCTIONS:
        _STEP_FUNCTIONS[key] = _jit_step_functions(graphdef, abstract_params, run, mesh)
    return graphdef, _STEP_FUNCTIONS[key]


def _jit_step_functions(graphdef, abstract_params, run: RunConfig, mesh: Mesh) -> StepFunctions:
    train, config = run.train, run.model_config
    tx, schedule = make_optimizer(train, abstract_params)
    abstract_state = jax.eval_shape(functools.partial(fresh_state, tx=tx), abstract_params)
    state_shardings = sharding.tree_shardings(abstract_state, mesh)
    replicated = sharding.replicated(mesh)
    micro_batch_sharding = logical_axes.named_sharding(
        mesh, logical_axes.MICRO_BATCH_AXES, (1, train.batch_size // train.grad_accum, 1)
    )
    batch_sharding = logical_axes.named_sharding(mesh, logical_axes.BATCH_AXES, (train.batch_size, 1))

    def on_mesh(fn):
        """Trace `fn` with the mesh active, so the model's activation constraints apply."""

        @functools.wraps(fn)
        def traced(*args):
            with logical_axes.use_mesh(mesh):
                return fn(*args)

        return traced

    remat = remat_policy(train.remat, config, train.seq_len)
    platform = mesh.devices.flat[0].platform
    step = functools.partial(
        train_step,
        graphdef=graphdef,
        tx=tx,
        ratio_loss_weight=train.ratio_loss_weight,
        remat=remat,
        slot_residuals=slot_residual_mode(train.slot_residuals, platform),
    )
    init_from_params = jax.jit(functools.partial(fresh_state, tx=tx), out_shardings=state_shardings)
    init_in_place = jax.jit(
        lambda: fresh_state(nnx.state(build_model(config, seed=train.seed), nnx.Param), tx),
        out_shardings=state_shardings,
    )

    def init():
        if mesh.size == 1:
            # Built eagerly: the parameters are bit-identical to hnet.build_model(config, seed).
            return init_from_params(nnx.state(build_model(config, seed=train.seed), nnx.Param))
        # Built inside one jit: each device materialises only its own shards.
        return init_in_place()

    return StepFunctions(
        train_step=jax.jit(
            on_mesh(step),
            donate_argnums=(0,),
            in_shardings=(state_shardings, micro_batch_sharding, micro_batch_sharding),
            out_shardings=(state_shardings, replicated),
            compiler_options=step_compiler_options(remat, platform),
        ),
        eval_step=jax.jit(
            on_mesh(functools.partial(eval_step, graphdef=graphdef)),
            in_shardings=(state_shardings["params"],) + (batch_sharding,) * 3,
            out_shardings=replicated,
        ),
        init=init,
        schedule=schedule,
        tx=tx,
        mesh=mesh,
        state_shardings=state_shardings,
        abstract_state=sharding.abstract_with_shardings(abstract_state, state_shardings),
        micro_batch_sharding=micro_batch_sharding,
        batch_sharding=batch_sharding,
    )


def init_state(run: RunConfig, mesh: Mesh | None = None):
    """Fresh model parameters and optimizer state -> (graphdef, state dict, StepFunctions)."""
    graphdef, steps = make_step_functions(run, mesh)
    return graphdef, steps.init(), steps
