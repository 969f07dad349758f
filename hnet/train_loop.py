"""The training loop: one jitted step (gradient accumulation, non-finite skip), periodic
evaluation, JSON Lines metrics, orbax checkpoints, resume and preemption handling.

The steps run over a device mesh (hnet.sharding, the run config's `mesh` section): one jit each,
with explicit shardings for the state and the batch, on one device or many processes alike.
Every process reads its own rows of each batch; process 0 alone prints and writes metrics.

Loss = next-byte cross-entropy (nats) + ratio_loss_weight * sum over stages of the ratio loss.
A token run (data.tokenizer, a flat Transformer) predicts BPE tokens instead of bytes; its bits per
byte are the summed token NLL / (ln 2 x the bytes those tokens cover), see hnet.data.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from hnet import checkpoint as checkpoint_lib
from hnet import data as data_lib
from hnet import sharding
from hnet import tokenizer as tokenizer_lib
from hnet.checkpoint import Checkpointer
from hnet.model import build_model, cross_entropy
from hnet.optim import make_optimizer
from hnet.run_config import RunConfig, run_config_from_dict

LN2 = math.log(2.0)


class RunError(RuntimeError):
    """A run-level problem (run folder, resume, divergence), reported as one line."""


# --------------------------------------------------------------------------------------------
# Jitted step functions
# --------------------------------------------------------------------------------------------


def loss_and_metrics(model, input_ids, targets, mask, ratio_loss_weight: float):
    """Scalar loss and a metrics dict for one (micro-)batch; mask (B, L) marks scored bytes."""
    out = model(input_ids)
    nll = cross_entropy(out.logits, targets)
    count = jnp.maximum(mask.sum(), 1.0)
    ce = jnp.sum(nll * mask) / count
    ratio = sum((stage.ratio_loss for stage in out.stages), jnp.zeros((), jnp.float32))
    metrics = {"ce": ce, "ratio_loss": ratio}
    for s, stage in enumerate(out.stages):
        metrics[f"stage{s}_bytes_per_chunk"] = stage.bytes_per_chunk
        metrics[f"stage{s}_dropped_rate"] = stage.dropped / jnp.maximum(stage.boundary_count, 1.0)
    return ce + ratio_loss_weight * ratio, metrics


@dataclass
class StepFunctions:
    """The jitted steps of one run, laid out over `mesh` (see hnet.sharding).

    Arrays in and out are global: the train state is sharded by `state_shardings` (parameters and
    optimizer state by their logical axes), batches are split over data x fsdp.
    """

    train_step: callable   # (state, input_ids (A, b, L), targets (A, b, L)) -> (state, metrics)
    eval_step: callable    # (params, input_ids (B, L), targets, mask) -> sums
    init: callable         # () -> a fresh train state, already sharded
    schedule: callable
    tx: optax.GradientTransformation
    mesh: Mesh
    state_shardings: Any            # NamedSharding leaves, structured like the train state
    abstract_state: Any             # ShapeDtypeStructs with those shardings (checkpoint restore)
    micro_batch_sharding: NamedSharding   # (A, b, L) train inputs
    batch_sharding: NamedSharding         # (B, L) eval inputs

    def place_train_batch(self, local: np.ndarray) -> jax.Array:
        """This process's (A, b / P, L) rows -> the global (A, b, L) array (no cross-host traffic)."""
        return sharding.place_local_batch(local, self.micro_batch_sharding, batch_dim=1)

    def place_eval_batch(self, full: np.ndarray) -> jax.Array:
        """A (B, L) batch that every process holds in full -> the global array."""
        return sharding.place_global_batch(full, self.batch_sharding)


_STEP_FUNCTIONS: dict[tuple, StepFunctions] = {}


def _abstract_model(run: RunConfig):
    """-> (graphdef, abstract params): shapes and logical axes only, nothing allocated."""
    config, seed = run.model_config, run.train.seed
    return nnx.split(nnx.eval_shape(lambda: build_model(config, seed=seed)), nnx.Param)


def run_mesh(run: RunConfig) -> Mesh:
    """The mesh of run.mesh over all devices of all processes, checked against the run's batch.

    Raises ConfigError (one line) when the sizes do not fit the devices or the batch.
    """
    _, abstract_params = _abstract_model(run)
    mesh = sharding.make_mesh(**dataclasses.asdict(run.mesh), param_count=sharding.param_count(abstract_params))
    sharding.check_batch(mesh, run.train.batch_size // run.train.grad_accum)
    return mesh


def make_step_functions(run: RunConfig, mesh: Mesh | None = None) -> tuple[Any, StepFunctions]:
    """-> (graphdef, StepFunctions) for a run on `mesh` (default: run_mesh(run)).

    Cached per model, train config and mesh, so that a resumed or repeated run in the same process
    reuses the compiled steps instead of compiling again.
    """
    graphdef, abstract_params = _abstract_model(run)
    if mesh is None:
        mesh = run_mesh(run)
    key = (json.dumps({"model": run.model, "train": run.to_dict()["train"]}, sort_keys=True), mesh)
    if key not in _STEP_FUNCTIONS:
        _STEP_FUNCTIONS[key] = _build_step_functions(graphdef, abstract_params, run, mesh)
    return graphdef, _STEP_FUNCTIONS[key]


def _build_step_functions(graphdef, abstract_params, run: RunConfig, mesh: Mesh) -> StepFunctions:
    train = run.train
    config = run.model_config
    tx, schedule = make_optimizer(train, abstract_params)

    def fresh_state(params):
        return {
            "params": params,
            "opt_state": tx.init(params),
            "nonfinite_run": jnp.zeros((), jnp.int32),
            "nonfinite_total": jnp.zeros((), jnp.int32),
        }

    abstract_state = jax.eval_shape(fresh_state, abstract_params)
    state_shardings = sharding.tree_shardings(abstract_state, mesh)
    replicated = sharding.replicated(mesh)
    micro_batch_sharding = sharding.named_sharding(mesh, sharding.MICRO_BATCH_AXES, (1, train.batch_size // train.grad_accum, 1))
    batch_sharding = sharding.named_sharding(mesh, sharding.BATCH_AXES, (train.batch_size, 1))

    def on_mesh(fn):
        """Trace `fn` with the mesh active, so the model's activation constraints apply."""
        @functools.wraps(fn)
        def traced(*args):
            with sharding.use_mesh(mesh):
                return fn(*args)
        return traced

    def micro_grads(params, input_ids, targets):
        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            return loss_and_metrics(model, input_ids, targets, jnp.ones(targets.shape, jnp.float32), train.ratio_loss_weight)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, {"loss": loss, **metrics}

    def train_step(state, input_ids, targets):
        """input_ids, targets: (A, b, L) micro-batches; gradients averaged over A."""
        params = state["params"]
        if input_ids.shape[0] == 1:
            grads, metrics = micro_grads(params, input_ids[0], targets[0])
        else:
            def accumulate(carry, micro):
                grads, metrics = micro_grads(params, *micro)
                return jax.tree_util.tree_map(jnp.add, carry, (grads, metrics)), None

            zeros = jax.eval_shape(micro_grads, params, input_ids[0], targets[0])
            zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
            (grads, metrics), _ = jax.lax.scan(accumulate, zeros, (input_ids, targets))
            scale = 1.0 / input_ids.shape[0]
            grads, metrics = jax.tree_util.tree_map(lambda x: x * scale, (grads, metrics))
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        updates, new_opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        # A non-finite step leaves params and optimizer state untouched and is counted.
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = {
            "params": keep(new_params, params),
            "opt_state": keep(new_opt_state, state["opt_state"]),
            "nonfinite_run": jnp.where(finite, 0, state["nonfinite_run"] + 1),
            "nonfinite_total": state["nonfinite_total"] + (~finite).astype(jnp.int32),
        }
        metrics = {**metrics, "grad_norm": grad_norm, "finite": finite, "nonfinite_run": new_state["nonfinite_run"]}
        return new_state, metrics

    def eval_step(params, input_ids, targets, mask):
        """Sums over the batch, so that evaluation can add batches up exactly."""
        model = nnx.merge(graphdef, params)
        out = model(input_ids)
        nll = cross_entropy(out.logits, targets)
        sums = {"nll": jnp.sum(nll * mask), "bytes": jnp.sum(mask)}
        for s, stage in enumerate(out.stages):
            sums[f"stage{s}_boundaries"] = stage.boundary_count
            sums[f"stage{s}_chunks"] = stage.chunk_count
            sums[f"stage{s}_dropped"] = stage.dropped
        return sums

    init_from_params = jax.jit(fresh_state, out_shardings=state_shardings)
    init_in_place = jax.jit(lambda: fresh_state(nnx.state(build_model(config, seed=train.seed), nnx.Param)),
                            out_shardings=state_shardings)

    def init():
        if mesh.size == 1:
            # Built eagerly: the parameters are bit-identical to hnet.build_model(config, seed).
            return init_from_params(nnx.state(build_model(config, seed=train.seed), nnx.Param))
        # Built inside one jit: each device materialises only its own shards.
        return init_in_place()

    params_shardings = state_shardings["params"]
    return StepFunctions(
        train_step=jax.jit(on_mesh(train_step), donate_argnums=(0,),
                           in_shardings=(state_shardings, micro_batch_sharding, micro_batch_sharding),
                           out_shardings=(state_shardings, replicated)),
        eval_step=jax.jit(on_mesh(eval_step), in_shardings=(params_shardings,) + (batch_sharding,) * 3,
                          out_shardings=replicated),
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


def evaluate(steps: StepFunctions, params, corpus, split: str, run: RunConfig, max_batches: int | None) -> dict:
    """Bits per byte and chunk statistics over the first `max_batches` batches of a split."""
    train = run.train
    max_sequences = None if max_batches is None else max_batches * train.batch_size
    totals: dict[str, float] = {}
    covered_bytes = 0  # text bytes the scored targets stand for (= targets for a byte corpus)
    for batch in data_lib.eval_batches(corpus, split, train.seq_len, train.batch_size, max_sequences=max_sequences):
        sums = steps.eval_step(params, *(steps.place_eval_batch(batch[k]) for k in ("input_ids", "targets", "mask")))
        for key, value in jax.device_get(sums).items():
            totals[key] = totals.get(key, 0.0) + float(value)
        covered_bytes += int(np.sum(corpus.bytes_per_id[batch["targets"]] * (batch["mask"] > 0)))
    totals["tokens"], totals["bytes"] = totals["bytes"], covered_bytes  # eval_step's "bytes" counts targets
    return summarize_eval(totals, run.model_config.depth)


def summarize_eval(totals: dict, depth: int) -> dict:
    result = {"bpb": totals["nll"] / (LN2 * totals["bytes"]), "nats_per_byte": totals["nll"] / totals["bytes"],
              "bytes": int(totals["bytes"]), "tokens": int(totals["tokens"])}
    for s in range(depth):
        result[f"stage{s}_bytes_per_chunk"] = totals["bytes"] / max(totals[f"stage{s}_chunks"], 1.0)
        result[f"stage{s}_dropped_rate"] = totals[f"stage{s}_dropped"] / max(totals[f"stage{s}_boundaries"], 1.0)
    return result


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class _StopFlag:
    """Set by SIGTERM/SIGINT: the loop finishes its step, saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def open_corpus(run: RunConfig, verbose: bool):
    """The run's byte corpus (a token run tokenizes it afterwards, see train())."""
    if run.data.corpus == "default":
        return data_lib.ensure_default_corpus(verbose=verbose)
    corpus = data_lib.PreparedCorpus(run.data.corpus)
    if corpus.is_tokens:
        raise data_lib.DataError(f"data.corpus {corpus.path} holds tokens; give the byte corpus and set data.tokenizer")
    return corpus


def prepare_run_dir(workdir: Path, run: RunConfig | None, resume: bool) -> RunConfig:
    """Check the run folder against the request; returns the run config to use.

    New run: the folder must not hold another run. Resume: the folder must hold a run, and a
    given run config must use the same model config.
    """
    config_path = workdir / "config.json"
    if resume:
        if not config_path.is_file():
            raise RunError(f"--resume: {workdir} holds no run (no config.json)")
        saved = run_config_from_dict(json.loads(config_path.read_text()))
        if run is not None and run.model != saved.model:
            changed = sorted(k for k in set(run.model) | set(saved.model) if run.model.get(k) != saved.model.get(k))
            raise RunError(f"--resume: {workdir} was trained with a different model config (differs in: {', '.join(changed)})")
        return run if run is not None else saved
    if config_path.exists() or (workdir / "checkpoints").exists() or (workdir / tokenizer_lib.RUN_TOKENIZER_FILE).exists():
        raise RunError(f"{workdir} already holds a run; pass --resume to continue it or choose another --workdir")
    _sync_processes("hnet: run folder checked")  # every process checks before process 0 writes
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        config_path.write_text(json.dumps(run.to_dict(), indent=2) + "\n")
    return run


def train(run: RunConfig | None, workdir: str | Path, *, resume: bool = False, progress: bool = True,
          max_steps: int | None = None, verbose: bool = True) -> dict:
    """Train (or resume) a run in `workdir`. Returns a summary dict.

    max_steps: stop after this many steps in this call (checkpointing there), as if preempted.
    """
    workdir = Path(workdir)
    mesh = run_mesh(run) if run is not None else None  # a layout error stops before the run folder is made
    run = prepare_run_dir(workdir, run, resume)
    train_cfg = run.train
    is_main = jax.process_index() == 0  # only process 0 prints and writes metrics
    verbose = verbose and is_main
    log = print if verbose else (lambda *a, **k: None)
    corpus = open_corpus(run, verbose)
    tokenizer = tokenizer_lib.setup_run_tokenizer(run.data.tokenizer, workdir, corpus, run.data.train_split, log)
    if tokenizer is not None:
        if tokenizer.vocab_size != run.model["vocab_size"]:
            raise RunError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {run.model['vocab_size']}")
        corpus = tokenizer_lib.tokenize_corpus(corpus, tokenizer, verbose=verbose)
    if corpus.bos_id != run.model_config.bos_id:
        raise RunError(f"the corpus starts documents with id {corpus.bos_id} but the model's bos_id is {run.model_config.bos_id}")
    process_count, process_index = jax.process_count(), jax.process_index()
    iterator = data_lib.make_dataset(
        corpus, run.data.train_split, train_cfg.seq_len, train_cfg.batch_size // process_count,
        seed=train_cfg.seed, process_index=process_index, process_count=process_count,
    )
    data_lib.PackedSequences(corpus, run.data.eval_split, train_cfg.seq_len)  # fail early if missing

    graphdef, steps = make_step_functions(run, mesh)
    log(f"mesh: {sharding.describe(steps.mesh)}")
    state = None if resume else steps.init()
    checkpointer = Checkpointer(workdir, keep=train_cfg.keep_checkpoints, primary=is_main)
    metrics_path = workdir / "metrics.jsonl"
    start_step, bytes_seen = 0, 0
    if resume:
        state, data_state, meta = resume_state(checkpointer, run, steps, is_main)
        iterator.set_state(data_lib.iterator_state_from_json(data_state["iterator"]))
        start_step, bytes_seen = int(meta["step"]), int(meta["bytes_seen"])
        if is_main:
            _truncate_metrics(metrics_path, start_step)
        log(f"resumed {workdir} at step {start_step} ({bytes_seen:,d} bytes seen)")

    def save(step: int):
        checkpointer.save(
            step, state, {"iterator": data_lib.iterator_state_to_json(iterator.get_state())},
            {"step": step, "bytes_seen": bytes_seen, "model": run.model, "run": run.to_dict()},
        )

    bar = _progress_bar(train_cfg.steps, start_step, progress and process_index == 0)
    accum, micro = train_cfg.grad_accum, train_cfg.batch_size // process_count // train_cfg.grad_accum
    tokens_per_step = train_cfg.batch_size * train_cfg.seq_len  # targets per step, all processes
    pending: list[tuple[int, dict, int]] = []  # (step, device metrics, bytes this process covered)
    last_eval: dict = {}
    status = "completed"
    end_step = train_cfg.steps if max_steps is None else min(train_cfg.steps, start_step + max_steps)
    interval_start = time.perf_counter()
    warmup_steps = int(round(train_cfg.warmup_frac * train_cfg.steps))
    warned_dropped = False
    with _StopFlag() as stop, open(metrics_path if is_main else os.devnull, "a") as metrics_file:
        step = start_step
        while step < end_step:
            batch = next(iterator)
            shape = (accum, micro, train_cfg.seq_len)
            state, metrics = steps.train_step(state, steps.place_train_batch(batch["input_ids"].reshape(shape)),
                                              steps.place_train_batch(batch["targets"].reshape(shape)))
            step += 1
            # Text bytes this process's targets cover (batch_size / P * seq_len for bytes).
            local_bytes = int(np.sum(corpus.bytes_per_id[batch["targets"]]))
            pending.append((step, metrics, local_bytes))
            is_last = step == end_step
            stopping = _stop_agreed(stop.signal, at_sync_point=step % train_cfg.log_every == 0 or is_last)
            # Flushed before every eval and save too, so that bytes_seen is exact there.
            if (step % train_cfg.log_every == 0 or step % train_cfg.eval_every == 0
                    or step % train_cfg.checkpoint_every == 0 or is_last or stopping):
                step_bytes = _sum_over_processes(np.array([b for _, _, b in pending], dtype=np.int64))
                rows = _flush_metrics(pending, step_bytes, steps.schedule, tokens_per_step, start_bytes=bytes_seen)
                bytes_seen += int(step_bytes.sum())
                elapsed = time.perf_counter() - interval_start  # after the transfer: steps run asynchronously
                throughput = int(step_bytes.sum()) / max(elapsed, 1e-9)
                for row in rows:
                    row["bytes_per_sec"] = throughput
                    metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                pending, interval_start = [], time.perf_counter()
                _update_bar(bar, rows[-1], throughput, step)
                if not warned_dropped:
                    warned_dropped = _warn_dropped(rows, warmup_steps, run.model_config, bar.write if is_main else None)
                if rows[-1]["nonfinite_run"] >= train_cfg.max_nonfinite_steps:
                    checkpointer.wait()
                    good = checkpointer.latest_step()
                    where = checkpointer.path(good) if good is not None else "none saved yet"
                    bar.close()
                    raise RunError(f"{rows[-1]['nonfinite_run']} non-finite steps in a row at step {step}; "
                                   f"last good checkpoint: {where}")
            if step % train_cfg.eval_every == 0 or step == train_cfg.steps:
                last_eval = evaluate(steps, state["params"], corpus, run.data.eval_split, run, train_cfg.eval_batches)
                record = {"step": step, "bytes_seen": bytes_seen, "split": run.data.eval_split,
                          **{f"eval_{k}": v for k, v in last_eval.items()}}
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                if is_main:
                    bar.write(f"step {step}: {run.data.eval_split} bpb {last_eval['bpb']:.4f}" + "".join(
                        f", stage {s} bytes/chunk {last_eval[f'stage{s}_bytes_per_chunk']:.2f}" for s in range(run.model_config.depth)))
            if stopping:
                status = f"stopped by {stop.signal or 'a signal to another process'}"
                break
            if step % train_cfg.checkpoint_every == 0 and step != end_step:
                save(step)
        if checkpointer.latest_step() != step:
            save(step)
        checkpointer.close()
    bar.close()
    return {"status": status, "step": step, "bytes_seen": bytes_seen, "eval": last_eval,
            "checkpoint": str(checkpointer.path(step)), "workdir": str(workdir)}


def resume_state(checkpointer: Checkpointer, run: RunConfig, steps: StepFunctions, is_main: bool):
    """Restore the newest usable checkpoint of a run -> (state, data-iterator state, meta).

    Damaged or incomplete newer checkpoints are skipped with one warning line each and moved to
    RUN_DIR/skipped_checkpoints (the run saves those steps again). Process 0 hashes the files; the
    other processes check sizes and follow its verdict, so that all restore the same step.
    Raises RunError (one line) when no checkpoint is usable.
    """
    def restore(step: int):
        meta = checkpointer.read_meta(step)
        if meta.get("model") != run.model:
            raise RunError(f"--resume: the checkpoint at step {step} was saved from a different model config")
        return checkpointer.restore(step, steps.abstract_state)  # onto this run's mesh, whatever mesh saved it

    try:
        restored = checkpoint_lib.restore_newest(checkpointer.run_dir, restore, hash_files=is_main,
                                                 all_agree=_all_processes_agree, passthrough=(RunError,))
    except checkpoint_lib.CheckpointError as err:
        raise RunError(f"--resume: {err}") from None
    moved = dict(checkpointer.set_aside_newer_than(restored.step))
    _sync_processes("hnet: skipped checkpoints moved aside")
    checkpointer.reload()
    if is_main:
        for status in restored.skipped:  # all newer than the restored step, so all moved
            print(f"warning: {status.describe()}; skipped, moved to {moved[status.step]}", file=sys.stderr)
        if restored.status.state == "unverified":
            print(f"warning: {restored.status.describe()}; restoring it anyway", file=sys.stderr)
    if restored.status.state == "good":
        checkpointer.mark_good(restored.step)
    return restored.value


def _all_processes_agree(ok: bool) -> bool:
    """True iff `ok` is True on every process (identity with one process)."""
    return int(_sum_over_processes(np.array([0 if ok else 1], dtype=np.int64))[0]) == 0


def _flush_metrics(pending, step_bytes, schedule, tokens_per_step, start_bytes) -> list[dict]:
    """Pull a window of step metrics to the host (one transfer) and make JSON rows.

    pending: (step, device metrics, _) per step; step_bytes: int64 (steps,) text bytes each step's
    targets covered, all processes. bpb = ce x targets / (ln 2 x bytes): per byte, also for tokens.
    """
    host = jax.device_get([m for _, m, _ in pending])
    rows = []
    bytes_seen = start_bytes
    for (step, _, _), metrics, num_bytes in zip(pending, host, step_bytes):
        bytes_seen += int(num_bytes)
        row = {"step": step, "bytes_seen": bytes_seen, "lr": float(schedule(step - 1))}
        for key, value in metrics.items():
            row[key] = bool(value) if key == "finite" else (int(value) if key == "nonfinite_run" else float(value))
        row["bpb"] = row["ce"] * tokens_per_step / (LN2 * int(num_bytes))
        rows.append(row)
    return rows


def _sum_over_processes(local: np.ndarray) -> np.ndarray:
    """Element-wise sum of a small host array over all processes (identity with one process)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local)).sum(axis=0)


def _stop_agreed(signal_name: str | None, at_sync_point: bool) -> bool:
    """Whether to stop after this step, the same answer on every process.

    One process: as soon as a signal arrived. Several: only at sync points (log steps), where the
    processes compare flags, so that all of them stop at the same step and save together.
    """
    if jax.process_count() == 1:
        return signal_name is not None
    if not at_sync_point:
        return False
    return bool(_sum_over_processes(np.array([signal_name is not None], dtype=np.int64))[0])


def _sync_processes(name: str) -> None:
    """Barrier across processes (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric rows past the restored step (they are recomputed identically)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step")


DROPPED_WARNING = 0.01  # warn (once) when a step after warmup drops more than this share of a stage's boundaries


def _warn_dropped(rows: list[dict], warmup_steps: int, config, write) -> bool:
    """Print one warning for the first row after warmup whose dropped-boundary rate exceeds
    DROPPED_WARNING; returns whether it warned."""
    for row in rows:
        if row["step"] <= warmup_steps:
            continue
        for s in range(config.depth):
            rate = row.get(f"stage{s}_dropped_rate", 0.0)
            if rate > DROPPED_WARNING:
                if write is not None:
                    write(f"warning: step {row['step']}: stage {s} dropped {rate:.1%} of its boundaries under the chunk "
                          f"capacity rule (capacity_slack {config.capacity_slack}, burst {config.capacity_burst}); "
                          f"a larger model.capacity_slack drops fewer (logged as stage{s}_dropped_rate)")
                return True
    return False


def _update_bar(bar, row: dict, throughput: float, step: int) -> None:
    postfix = {"loss": f"{row['loss']:.3f}", "bpb": f"{row['bpb']:.3f}", "B/s": f"{throughput:,.0f}"}
    for key, value in row.items():
        if key.endswith("_bytes_per_chunk"):
            postfix[key.split("_")[0] + " B/chunk"] = f"{value:.2f}"
        if key.endswith("_dropped_rate") and value > 0:
            postfix[key.split("_")[0] + " dropped"] = f"{value:.1%}"
    bar.set_postfix(postfix, refresh=False)
    bar.update(step - bar.n)
