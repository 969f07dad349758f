"""The training loop: one jitted step (gradient accumulation, non-finite skip), periodic
evaluation, JSON Lines metrics, orbax checkpoints, resume and preemption handling.

Loss = next-byte cross-entropy (nats) + ratio_loss_weight * sum over stages of the ratio loss.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hnet import data as data_lib
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
        metrics[f"stage{s}_overflow_rate"] = stage.overflow / jnp.maximum(stage.boundary_count, 1.0)
    return ce + ratio_loss_weight * ratio, metrics


@dataclass
class StepFunctions:
    train_step: callable   # (state, input_ids (A, b, L), targets (A, b, L)) -> (state, metrics)
    eval_step: callable    # (params, input_ids, targets, mask) -> sums
    schedule: callable
    tx: optax.GradientTransformation


_STEP_FUNCTIONS: dict[str, StepFunctions] = {}


def make_step_functions(graphdef, params, run: RunConfig) -> StepFunctions:
    """The jitted train and eval steps for a model split as (graphdef, params).

    Cached per model and train config, so that a resumed or repeated run in the same process
    reuses the compiled steps instead of compiling again.
    """
    key = json.dumps({"model": run.model, "train": run.to_dict()["train"]}, sort_keys=True)
    if key not in _STEP_FUNCTIONS:
        _STEP_FUNCTIONS[key] = _build_step_functions(graphdef, params, run)
    return _STEP_FUNCTIONS[key]


def _build_step_functions(graphdef, params, run: RunConfig) -> StepFunctions:
    train = run.train
    tx, schedule = make_optimizer(train, params)

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
            sums[f"stage{s}_overflow"] = stage.overflow.astype(jnp.float32)
        return sums

    return StepFunctions(
        train_step=jax.jit(train_step, donate_argnums=(0,)),
        eval_step=jax.jit(eval_step),
        schedule=schedule,
        tx=tx,
    )


def init_state(run: RunConfig):
    """Fresh model parameters and optimizer state -> (graphdef, state dict, StepFunctions)."""
    model = build_model(run.model_config, seed=run.train.seed)
    graphdef, params = nnx.split(model, nnx.Param)
    steps = make_step_functions(graphdef, params, run)
    state = {
        "params": params,
        "opt_state": steps.tx.init(params),
        "nonfinite_run": jnp.zeros((), jnp.int32),
        "nonfinite_total": jnp.zeros((), jnp.int32),
    }
    return graphdef, state, steps


def evaluate(steps: StepFunctions, params, corpus, split: str, run: RunConfig, max_batches: int | None) -> dict:
    """Bits per byte and chunk statistics over the first `max_batches` batches of a split."""
    train = run.train
    max_sequences = None if max_batches is None else max_batches * train.batch_size
    totals: dict[str, float] = {}
    for batch in data_lib.eval_batches(corpus, split, train.seq_len, train.batch_size, max_sequences=max_sequences):
        sums = steps.eval_step(params, batch["input_ids"], batch["targets"], batch["mask"])
        for key, value in jax.device_get(sums).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return summarize_eval(totals, run.model_config.depth)


def summarize_eval(totals: dict, depth: int) -> dict:
    result = {"bpb": totals["nll"] / (LN2 * totals["bytes"]), "nats_per_byte": totals["nll"] / totals["bytes"],
              "bytes": int(totals["bytes"])}
    for s in range(depth):
        boundaries = totals[f"stage{s}_boundaries"]
        result[f"stage{s}_bytes_per_chunk"] = totals["bytes"] / max(boundaries, 1.0)
        result[f"stage{s}_overflow_rate"] = totals[f"stage{s}_overflow"] / max(boundaries, 1.0)
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
    if run.data.corpus == "default":
        return data_lib.ensure_default_corpus(verbose=verbose)
    return data_lib.PreparedCorpus(run.data.corpus)


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
    if config_path.exists() or (workdir / "checkpoints").exists():
        raise RunError(f"{workdir} already holds a run; pass --resume to continue it or choose another --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(run.to_dict(), indent=2) + "\n")
    return run


def train(run: RunConfig | None, workdir: str | Path, *, resume: bool = False, progress: bool = True,
          max_steps: int | None = None, verbose: bool = True) -> dict:
    """Train (or resume) a run in `workdir`. Returns a summary dict.

    max_steps: stop after this many steps in this call (checkpointing there), as if preempted.
    """
    workdir = Path(workdir)
    run = prepare_run_dir(workdir, run, resume)
    train_cfg = run.train
    log = print if verbose else (lambda *a, **k: None)
    corpus = open_corpus(run, verbose)
    process_count, process_index = jax.process_count(), jax.process_index()
    iterator = data_lib.make_dataset(
        corpus, run.data.train_split, train_cfg.seq_len, train_cfg.batch_size // process_count,
        seed=train_cfg.seed, process_index=process_index, process_count=process_count,
    )
    data_lib.PackedSequences(corpus, run.data.eval_split, train_cfg.seq_len)  # fail early if missing

    graphdef, state, steps = init_state(run)
    checkpointer = Checkpointer(workdir, keep=train_cfg.keep_checkpoints)
    metrics_path = workdir / "metrics.jsonl"
    start_step, bytes_seen = 0, 0
    if resume:
        latest = checkpointer.latest_step()
        if latest is None:
            raise RunError(f"--resume: {workdir} has no complete checkpoint")
        meta = checkpointer.read_meta(latest)
        if meta.get("model") != run.model:
            raise RunError(f"--resume: the checkpoint at step {latest} was saved from a different model config")
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        try:
            state, data_state, meta = checkpointer.restore(latest, abstract)
        except Exception as err:  # orbax raises many types; report one line
            raise RunError(f"--resume: cannot restore checkpoint {checkpointer.path(latest)}: {str(err).splitlines()[0]}") from None
        iterator.set_state(data_lib.iterator_state_from_json(data_state["iterator"]))
        start_step, bytes_seen = int(meta["step"]), int(meta["bytes_seen"])
        _truncate_metrics(metrics_path, start_step)
        log(f"resumed {workdir} at step {start_step} ({bytes_seen:,d} bytes seen)")

    def save(step: int):
        checkpointer.save(
            step, state, {"iterator": data_lib.iterator_state_to_json(iterator.get_state())},
            {"step": step, "bytes_seen": bytes_seen, "model": run.model, "run": run.to_dict()},
        )

    bar = _progress_bar(train_cfg.steps, start_step, progress and process_index == 0)
    accum, micro = train_cfg.grad_accum, train_cfg.batch_size // process_count // train_cfg.grad_accum
    bytes_per_step = train_cfg.batch_size * train_cfg.seq_len
    pending: list[tuple[int, dict]] = []
    last_eval: dict = {}
    status = "completed"
    end_step = train_cfg.steps if max_steps is None else min(train_cfg.steps, start_step + max_steps)
    interval_start, interval_steps = time.perf_counter(), 0
    with _StopFlag() as stop, open(metrics_path, "a") as metrics_file:
        step = start_step
        while step < end_step:
            batch = next(iterator)
            shape = (accum, micro, train_cfg.seq_len)
            state, metrics = steps.train_step(state, batch["input_ids"].reshape(shape), batch["targets"].reshape(shape))
            step += 1
            bytes_seen += bytes_per_step
            interval_steps += 1
            pending.append((step, metrics))
            is_last = step == end_step
            if step % train_cfg.log_every == 0 or is_last or stop.signal:
                rows = _flush_metrics(pending, steps.schedule, bytes_per_step, start_bytes=bytes_seen - len(pending) * bytes_per_step)
                elapsed = time.perf_counter() - interval_start  # after the transfer: steps run asynchronously
                throughput = interval_steps * bytes_per_step / max(elapsed, 1e-9)
                for row in rows:
                    row["bytes_per_sec"] = throughput
                    metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                pending, interval_start, interval_steps = [], time.perf_counter(), 0
                _update_bar(bar, rows[-1], throughput, step)
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
                bar.write(f"step {step}: {run.data.eval_split} bpb {last_eval['bpb']:.4f}" + "".join(
                    f", stage {s} bytes/chunk {last_eval[f'stage{s}_bytes_per_chunk']:.2f}" for s in range(run.model_config.depth)))
            if stop.signal:
                status = f"stopped by {stop.signal}"
                break
            if step % train_cfg.checkpoint_every == 0 and step != end_step:
                save(step)
        if checkpointer.latest_step() != step:
            save(step)
        checkpointer.close()
    bar.close()
    return {"status": status, "step": step, "bytes_seen": bytes_seen, "eval": last_eval,
            "checkpoint": str(checkpointer.path(step)), "workdir": str(workdir)}


def _flush_metrics(pending, schedule, bytes_per_step, start_bytes) -> list[dict]:
    """Pull a window of step metrics to the host (one transfer) and make JSON rows."""
    host = jax.device_get([m for _, m in pending])
    rows = []
    for i, ((step, _), metrics) in enumerate(zip(pending, host)):
        row = {"step": step, "bytes_seen": start_bytes + (i + 1) * bytes_per_step,
               "lr": float(schedule(step - 1))}
        for key, value in metrics.items():
            row[key] = bool(value) if key == "finite" else (int(value) if key == "nonfinite_run" else float(value))
        row["bpb"] = row["ce"] / LN2
        rows.append(row)
    return rows


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric rows past the restored step (they are recomputed identically)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step")


def _update_bar(bar, row: dict, throughput: float, step: int) -> None:
    postfix = {"loss": f"{row['loss']:.3f}", "bpb": f"{row['bpb']:.3f}", "B/s": f"{throughput:,.0f}"}
    for key, value in row.items():
        if key.endswith("_bytes_per_chunk"):
            postfix[key.split("_")[0] + " B/chunk"] = f"{value:.2f}"
    bar.set_postfix(postfix, refresh=False)
    bar.update(step - bar.n)
