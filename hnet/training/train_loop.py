"""The training loop around hnet.training.train_step: data, periodic evaluation, JSON Lines metrics with
step time, throughput and MFU (hnet.training.throughput) and their TensorBoard scalars (hnet.training.tensorboard),
orbax checkpoints, resume and preemption handling, and jax.profiler traces of chosen steps
(hnet.training.profiling), in a run folder (hnet.io.run_dir).

The steps run over a device mesh (hnet.parallel.sharding, the run config's `mesh` section), on one device
or many processes alike. Every process reads its own rows of each batch; process 0 alone prints
and writes metrics. A token run (data.tokenizer, a flat Transformer) predicts BPE tokens; its bits
per byte are the summed token NLL / (ln 2 x the bytes those tokens cover), see hnet.io.data.

docs/ARCHITECTURE.md section 3 shows the data flow around the loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np

from hnet.errors import RunError, RunWriteError, describe_write_failure
from hnet.io import checkpoint as checkpoint_lib
from hnet.io import data as data_lib
from hnet.io import tokenizer as tokenizer_lib
from hnet.io.checkpoint import Checkpointer
from hnet.io.run_dir import RunDir
from hnet.model import bits_per_byte
from hnet.parallel import multihost, sharding
from hnet.stage_metrics import stage_metric, stage_values
from hnet.training import throughput
from hnet.training.compile_cache import cache_folder, persistent_compile_cache
from hnet.training import tensorboard as tensorboard_lib
from hnet.training.profiling import ProfileSteps, StepProfiler
from hnet.training.run_config import RunConfig, run_config_from_dict
from hnet.training.run_lock import RunLock
from hnet.training.train_step import StepFunctions, make_step_functions


def train(
    run: RunConfig | None,
    workdir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    max_steps: int | None = None,
    verbose: bool = True,
    peak_tflops: float | None = None,
    profile: ProfileSteps | None = None,
) -> dict:
    """Train (or resume) a run in `workdir`. Returns a summary dict.

    max_steps: stop after this many steps in this call (checkpointing there), as if preempted.
    peak_tflops: peak TFLOP/s per device for MFU (default: the known peak of the device, if any;
    see hnet.training.throughput).
    profile: trace these steps with jax.profiler into RUN_DIR/profile (hnet.training.profiling).
    """
    run_dir = RunDir(workdir)
    # The run's steps; a mesh that does not fit the devices or the batch stops before the run folder is made.
    given_steps = make_step_functions(run)[1] if run is not None else None
    if profile is not None and not resume:  # checked before the run folder is made
        profile.check(1, _end_step(run.train.steps, 0, max_steps))
    if resume and not run_dir.config.is_file():
        if run is None:
            raise RunError(f"--resume: {run_dir.path} holds no run (no {run_dir.config.name})")
        resume = False  # killed before it wrote its config, or never started: the run given starts
        if verbose and jax.process_index() == 0:
            print(f"--resume: {run_dir.path} holds no run yet; starting it")
    lock = lock_run_folder(run_dir)  # one job per run folder, for the whole run
    try:
        run_config = prepare_run_dir(run_dir, run, resume)  # the run given, or the folder's own
        with persistent_compile_cache(cache_folder(run_config.train.compile_cache, run_dir)):
            return _train(
                run_config,
                run_dir,
                given_steps,
                resume=resume,
                progress=progress,
                max_steps=max_steps,
                verbose=verbose,
                peak_tflops=peak_tflops,
                profile=profile,
            )
    finally:
        if lock is not None:
            lock.release()


def lock_run_folder(run_dir: RunDir) -> RunLock | None:
    """Process 0 takes RUN_DIR's lock (hnet.training.run_lock); every process stops with one error line
    when it could not. -> the lock on process 0, None on the others."""
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = RunLock.acquire(run_dir.lock)
        except RunError as err:
            error = err
    if not multihost.all_agree(error is None):
        if lock is not None:
            lock.release()
        raise error or RunError(f"{run_dir.path} is in use by another training job (process 0 could not lock it)")
    return lock


def _train(
    run: RunConfig,
    run_dir: RunDir,
    steps: StepFunctions | None,
    *,
    resume: bool,
    progress: bool,
    max_steps: int | None,
    verbose: bool,
    peak_tflops: float | None,
    profile: ProfileSteps | None,
) -> dict:
    """train() once the run folder is locked and checked (prepare_run_dir: `run` is the run to
    train); steps: the given run config's (None: made for the saved run's)."""
    is_main = jax.process_index() == 0  # only process 0 prints and writes metrics
    verbose = verbose and is_main
    log = print if verbose else (lambda *a, **k: None)
    if resume and not run_dir.checkpoint_steps():  # stopped before its first save: the same run, from the start
        log(f"--resume: {run_dir.path} has no checkpoint yet; starting the run from step 0")
        resume = False
        if is_main:
            _truncate_metrics(run_dir.metrics, 0)
    train_cfg = run.train
    corpus, iterator = open_training_data(run, run_dir, verbose, log)
    if steps is None:
        steps = make_step_functions(run)[1]
    log(f"mesh: {sharding.describe(steps.mesh)}")
    if tensorboard_lib.available():
        log(f"tensorboard: event files in {run_dir.tensorboard}")
    else:
        log("tensorboard: off (tensorboardX is not installed; pip install tensorboardX)")
    state = None if resume else steps.init()
    checkpointer = Checkpointer(run_dir.path, keep=train_cfg.keep_checkpoints, primary=is_main)
    start_step, bytes_seen = 0, 0
    if resume:
        state, data_state, meta = resume_state(checkpointer, run, steps, is_main)
        iterator.set_state(data_lib.iterator_state_from_json(data_state["iterator"]))
        start_step, bytes_seen = int(meta["step"]), int(meta["bytes_seen"])
        if start_step >= train_cfg.steps:
            checkpointer.close()
            log(f"{run_dir.path}: the run is complete (step {start_step} of {train_cfg.steps}); nothing to do")
            return {
                "status": "already complete",
                "step": start_step,
                "bytes_seen": bytes_seen,
                "eval": {},
                "checkpoint": str(checkpointer.path(start_step)),
                "workdir": str(run_dir.path),
            }
        if is_main:
            _truncate_metrics(run_dir.metrics, start_step)
        log(f"resumed {run_dir.path} at step {start_step} ({bytes_seen:,d} bytes seen)")
        if profile is not None:
            profile.check(start_step + 1, _end_step(train_cfg.steps, start_step, max_steps))

    bar = _progress_bar(train_cfg.steps, start_step, progress and is_main)
    shape = (
        train_cfg.grad_accum,
        train_cfg.batch_size // jax.process_count() // train_cfg.grad_accum,
        train_cfg.seq_len,
    )
    last_eval: dict = {}
    status = "completed"
    end_step = _end_step(train_cfg.steps, start_step, max_steps)
    warmup_steps = int(round(train_cfg.warmup_frac * train_cfg.steps))
    warned_dropped = False
    speed = throughput.TrainingSpeed(
        run.model_config,
        train_cfg.batch_size,
        train_cfg.seq_len,
        throughput.peak_flops(jax.devices()[0], peak_tflops),
        tuple(jax.devices()),
        tuple(jax.local_devices()),
    )
    window = MetricsWindow(steps.schedule, speed, bytes_seen)

    def save(step: int):
        checkpointer.save(
            step,
            state,
            {"iterator": data_lib.iterator_state_to_json(iterator.get_state())},
            {"step": step, "bytes_seen": window.bytes_seen, "model": run.model, "run": run.to_dict()},
        )

    with (
        _StopFlag() as stop,
        MetricsLog(run_dir, is_main, first_step=start_step + 1) as metrics_log,
        StepProfiler(profile, run_dir.profile, enabled=is_main) as profiler,
    ):
        step = start_step
        while step < end_step:
            batch = next(iterator)
            with profiler.annotate(step + 1):
                state, metrics = steps.train_step(
                    state,
                    steps.place_train_batch(batch["input_ids"].reshape(shape)),
                    steps.place_train_batch(batch["targets"].reshape(shape)),
                )
            step += 1
            profiler.finish_step(step, (state, metrics))
            # Text bytes this process's targets cover (batch_size / P * seq_len for bytes).
            window.add(step, metrics, int(np.sum(corpus.bytes_per_id[batch["targets"]])))
            is_last = step == end_step
            stopping = multihost.stop_agreed(stop.signal, at_sync_point=step % train_cfg.log_every == 0 or is_last)
            # Flushed before every eval and save too, so that bytes_seen is exact there.
            if (
                step % train_cfg.log_every == 0
                or step % train_cfg.eval_every == 0
                or step % train_cfg.checkpoint_every == 0
                or is_last
                or stopping
            ):
                rows = window.flush()
                metrics_log.write(rows)
                _update_bar(bar, rows[-1], step)
                warned_dropped = warned_dropped or _warn_dropped(
                    rows, warmup_steps, run.model_config, bar.write if is_main else None
                )
                _stop_if_not_finite(rows[-1], train_cfg.max_nonfinite_steps, checkpointer, bar)
            if step % train_cfg.eval_every == 0 or step == train_cfg.steps:
                last_eval = evaluate(steps, state["params"], corpus, run.data.eval_split, run, train_cfg.eval_batches)
                metrics_log.write(
                    [
                        {
                            "step": step,
                            "bytes_seen": window.bytes_seen,
                            "split": run.data.eval_split,
                            **{f"eval_{k}": v for k, v in last_eval.items()},
                        }
                    ]
                )
                if is_main:
                    bar.write(
                        f"step {step}: {run.data.eval_split} bpb {last_eval['bpb']:.4f}"
                        + "".join(
                            f", stage {s} bytes/chunk {value:.2f}"
                            for s, value in enumerate(stage_values(last_eval, "bytes_per_chunk"))
                        )
                    )
            if stopping:
                status = f"stopped by {stop.signal or 'a signal to another process'}"
                break
            if step % train_cfg.checkpoint_every == 0 and step != end_step:
                save(step)
            window.restart_clock_if_flushed()  # the next window's time starts after this evaluation and save
        profiler.close(state)  # a trace still running: the run stopped before the last traced step
        if checkpointer.latest_step() != step:
            save(step)
        checkpointer.close()
    bar.close()
    return {
        "status": status,
        "step": step,
        "bytes_seen": window.bytes_seen,
        "eval": last_eval,
        "checkpoint": str(checkpointer.path(step)),
        "workdir": str(run_dir.path),
    }


def open_training_data(run: RunConfig, run_dir: RunDir, verbose: bool, log):
    """The run's corpus (tokenized for a token run, with the run's tokenizer) and the iterator of
    this process's training batches -> (corpus, iterator). Checks that the corpus fits the model
    and that the evaluation split exists, so that a mistake stops before the first step."""
    corpus = open_corpus(run, verbose)
    tokenizer = tokenizer_lib.setup_run_tokenizer(run.data.tokenizer, run_dir.path, corpus, run.data.train_split, log)
    if tokenizer is not None:
        if tokenizer.vocab_size != run.model["vocab_size"]:
            raise RunError(
                f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {run.model['vocab_size']}"
            )
        corpus = tokenizer_lib.tokenize_corpus(corpus, tokenizer, verbose=verbose)
    if corpus.bos_id != run.model_config.bos_id:
        raise RunError(
            f"the corpus starts documents with id {corpus.bos_id} but the model's bos_id is {run.model_config.bos_id}"
        )
    train_cfg, process_count = run.train, jax.process_count()
    iterator = data_lib.make_dataset(
        corpus,
        run.data.train_split,
        train_cfg.seq_len,
        train_cfg.batch_size // process_count,
        seed=train_cfg.seed,
        process_index=jax.process_index(),
        process_count=process_count,
    )
    data_lib.PackedSequences(corpus, run.data.eval_split, train_cfg.seq_len)  # fail early if missing
    return corpus, iterator


def _end_step(steps: int, start_step: int, max_steps: int | None) -> int:
    """The step a call stops at: the run's last step, or max_steps after start_step."""
    return steps if max_steps is None else min(steps, start_step + max_steps)


def open_corpus(run: RunConfig, verbose: bool):
    """The run's byte corpus (a token run tokenizes it afterwards, see train())."""
    if run.data.corpus == "default":
        return data_lib.ensure_default_corpus(verbose=verbose)
    corpus = data_lib.PreparedCorpus(run.data.corpus)
    if corpus.is_tokens:
        raise data_lib.DataError(f"data.corpus {corpus.path} holds tokens; give the byte corpus and set data.tokenizer")
    return corpus


def prepare_run_dir(run_dir: RunDir, run: RunConfig | None, resume: bool) -> RunConfig:
    """Check the run folder against the request; returns the run config to use.

    New run: the folder must not hold another run. Resume: the folder must hold a run, and a
    given run config must use the same model config (and, before the run's first checkpoint, the
    same data and training settings: it then starts again from step 0).
    """
    if resume:
        if not run_dir.config.is_file():
            raise RunError(f"--resume: {run_dir.path} holds no run (no {run_dir.config.name})")
        saved = run_config_from_dict(json.loads(run_dir.config.read_text()))
        if run is not None and run.model != saved.model:
            changed = sorted(k for k in set(run.model) | set(saved.model) if run.model.get(k) != saved.model.get(k))
            raise RunError(
                f"--resume: {run_dir.path} was trained with a different model config (differs in: {', '.join(changed)})"
            )
        if run is not None and not run_dir.checkpoint_steps():  # it starts again: as the folder's config says
            given, kept = run.to_dict(), saved.to_dict()
            changed = sorted(
                f"{section}.{key}"
                for section in ("data", "train")
                for key in set(given[section]) | set(kept[section])
                if given[section].get(key) != kept[section].get(key)
            )
            if changed:
                raise RunError(
                    f"--resume: {run_dir.path} has no checkpoint yet, and its run config differs from the "
                    f"one given (in: {', '.join(changed)}); resume without --config to use the folder's"
                )
        return run if run is not None else saved
    if run_dir.holds_run():
        raise RunError(f"{run_dir.path} already holds a run; pass --resume to continue it or choose another --workdir")
    multihost.barrier("hnet: run folder checked")  # every process checks before process 0 writes
    run_dir.path.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:  # whole or not at all: a kill here leaves no half-written config
        temporary = run_dir.config.with_name(f".{run_dir.config.name}.tmp")
        temporary.write_text(json.dumps(run.to_dict(), indent=2) + "\n")
        os.replace(temporary, run_dir.config)
    return run


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
        restored = checkpoint_lib.restore_newest(
            checkpointer.run_dir, restore, hash_files=is_main, all_agree=multihost.all_agree, passthrough=(RunError,)
        )
    except checkpoint_lib.CheckpointError as err:
        raise RunError(f"--resume: {err}") from None
    moved = dict(checkpointer.set_aside_newer_than(restored.step))
    multihost.barrier("hnet: skipped checkpoints moved aside")
    checkpointer.reload()
    if is_main:
        for status in restored.skipped:  # all newer than the restored step, so all moved
            print(f"warning: {status.describe()}; skipped, moved to {moved[status.step]}", file=sys.stderr)
        if restored.status.state == "unverified":
            print(f"warning: {restored.status.describe()}; restoring it anyway", file=sys.stderr)
    if restored.status.state == "good":
        checkpointer.mark_good(restored.step)
    return restored.value


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
    result = {
        "bpb": bits_per_byte(totals["nll"], totals["bytes"]),
        "nats_per_byte": totals["nll"] / totals["bytes"],
        "bytes": int(totals["bytes"]),
        "tokens": int(totals["tokens"]),
    }
    for s in range(depth):
        chunks = totals[stage_metric(s, "chunks")]
        result[stage_metric(s, "bytes_per_chunk")] = totals["bytes"] / max(chunks, 1.0)
        result[stage_metric(s, "dropped_rate")] = totals[stage_metric(s, "dropped")] / max(
            totals[stage_metric(s, "boundaries")], 1.0
        )
        result[stage_metric(s, "slot_utilisation")] = chunks / max(totals[stage_metric(s, "slots")], 1.0)
    return result


# --------------------------------------------------------------------------------------------
# Metrics, progress and signals
# --------------------------------------------------------------------------------------------


class MetricsLog:
    """Where metrics rows go: RUN_DIR/metrics.jsonl (the record, one JSON object a line) and,
    when tensorboardX is installed, TensorBoard scalars in RUN_DIR/tensorboard (hnet.training.tensorboard).
    Only process 0 writes (`enabled`); first_step: the first step this call logs."""

    def __init__(self, run_dir: RunDir, enabled: bool, first_step: int):
        self._path = run_dir.metrics
        board_dir = run_dir.tensorboard if enabled and tensorboard_lib.available() else None
        with _write_failures_reported(self._path):
            self._file = open(self._path if enabled else os.devnull, "a")
        with _write_failures_reported(board_dir):
            self._board = tensorboard_lib.TensorBoardLog(board_dir, first_step)
        self._board_dir = board_dir

    def write(self, rows: list[dict]) -> None:
        """Append rows; RunWriteError (one line) when the disk refuses them."""
        with _write_failures_reported(self._path):
            self._file.write("".join(json.dumps(row) + "\n" for row in rows))
            self._file.flush()
        with _write_failures_reported(self._board_dir):
            self._board.write(rows)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self._file.close()
        except OSError:  # a failed flush was reported by write()
            pass
        with _write_failures_reported(self._board_dir):
            self._board.close()


@contextlib.contextmanager
def _write_failures_reported(path):
    """An OSError writing `path` (metrics, TensorBoard events) -> one RunWriteError line."""
    try:
        yield
    except OSError as err:
        raise RunWriteError(
            f"writing {path} failed: {describe_write_failure(err)}; the rows written before are "
            f"kept; make room and resume with the same command"
        ) from None


class MetricsWindow:
    """The steps since metrics were last written: their device metrics stay on the devices until
    `flush` pulls them to the host in one transfer (when the loop logs, evaluates, saves or stops),
    so that metrics add no host synchronisation to a step. The window is timed as a whole
    (throughput.TrainingSpeed), from when its first step was started to the end of its transfer.
    bytes_seen: text bytes of all processes' targets up to the last flushed step.
    """

    def __init__(self, schedule, speed: throughput.TrainingSpeed, bytes_seen: int):
        self.schedule, self.speed, self.bytes_seen = schedule, speed, bytes_seen
        self.tokens_per_step = speed.batch_size * speed.seq_len  # targets per step, all processes
        self.pending: list[tuple[int, dict, int]] = []  # (step, device metrics, bytes this process covered)
        self.start = time.perf_counter()

    def add(self, step: int, metrics: dict, local_bytes: int) -> None:
        self.pending.append((step, metrics, local_bytes))

    def flush(self) -> list[dict]:
        """The window's metrics rows, one per step: the step's metrics, lr, bytes_seen, bpb (ce x
        targets / (ln 2 x bytes): per byte, also for tokens) and the speed fields. Empties the window."""
        step_bytes = multihost.sum_over_processes(np.array([b for _, _, b in self.pending], dtype=np.int64))
        host = jax.device_get([m for _, m, _ in self.pending])
        rows = []
        for (step, _, _), metrics, num_bytes in zip(self.pending, host, step_bytes):
            self.bytes_seen += int(num_bytes)
            row = {"step": step, "bytes_seen": self.bytes_seen, "lr": float(self.schedule(step - 1))}
            for key, value in metrics.items():
                row[key] = bool(value) if key == "finite" else (int(value) if key == "nonfinite_run" else float(value))
            row["bpb"] = bits_per_byte(row["ce"] * self.tokens_per_step, int(num_bytes))
            rows.append(row)
        # Timed after the transfer, which waits for the window's steps (they run asynchronously).
        self.speed.annotate(rows, int(step_bytes.sum()), time.perf_counter() - self.start)
        self.pending = []
        return rows

    def restart_clock_if_flushed(self) -> None:
        """After a flush (and the evaluation and save that may follow it), the next window starts now."""
        if not self.pending:
            self.start = time.perf_counter()


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric rows past the restored step (they are recomputed identically), and
    a row a kill cut short."""
    if not path.exists():
        return

    def kept(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):  # the last line of a killed run may be cut short
            return False

    path.write_text("".join(line + "\n" for line in path.read_text().splitlines() if line.strip() and kept(line)))


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
        for s, rate in enumerate(stage_values(row, "dropped_rate")):
            if rate > DROPPED_WARNING:
                if write is not None:
                    write(
                        f"warning: step {row['step']}: stage {s} dropped {rate:.1%} of its boundaries under the chunk "
                        f"capacity rule (capacity_slack {config.capacity_slack}, burst {config.capacity_burst}); "
                        f"a larger model.capacity_slack drops fewer (logged as {stage_metric(s, 'dropped_rate')})"
                    )
                return True
    return False


def _stop_if_not_finite(row: dict, max_nonfinite_steps: int, checkpointer: Checkpointer, bar) -> None:
    """RunError (one line, naming the last good checkpoint) when the row's step is the
    max_nonfinite_steps-th in a row whose loss or gradient was not finite."""
    if row["nonfinite_run"] < max_nonfinite_steps:
        return
    checkpointer.wait()
    good = checkpointer.latest_step()
    where = checkpointer.path(good) if good is not None else "none saved yet"
    bar.close()
    raise RunError(
        f"{row['nonfinite_run']} non-finite steps in a row at step {row['step']}; last good checkpoint: {where}"
    )


def _update_bar(bar, row: dict, step: int) -> None:
    """Show a metrics row: loss, bpb, throughput, step time, MFU and peak memory (when known),
    bytes per chunk, and dropped boundaries when there are any."""
    postfix = {"loss": f"{row['loss']:.3f}", "bpb": f"{row['bpb']:.3f}", "B/s": f"{row['bytes_per_sec']:,.0f}"}
    if "tokens_per_sec" in row:
        postfix["tok/s"] = f"{row['tokens_per_sec']:,.0f}"
    postfix["step"] = f"{row['step_time_s'] * 1e3:.0f}ms"
    if "mfu" in row:
        postfix["MFU"] = f"{row['mfu']:.1%}"
    if "peak_memory_bytes" in row:
        postfix["mem"] = f"{row['peak_memory_bytes'] / 2**30:.1f}GiB"
    for key, value in row.items():
        if key.endswith("_bytes_per_chunk"):
            postfix[key.split("_")[0] + " B/chunk"] = f"{value:.2f}"
        if key.endswith("_dropped_rate") and value > 0:
            postfix[key.split("_")[0] + " dropped"] = f"{value:.1%}"
    bar.set_postfix(postfix, refresh=False)
    bar.update(step - bar.n)


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
