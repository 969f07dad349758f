"""Benchmarks on the current JAX device.

    python -m hnet.perf.bench train                                   # configs/run_tiny.json
    python -m hnet.perf.bench train --config configs/run_tiny.json --set train.batch_size=16 --steps 20
    python -m hnet.perf.bench train --json                            # one JSON object instead of a table
    python -m hnet.perf.bench memory --config configs/run_headline_hnet1.json --set train.batch_size=8 --set train.grad_accum=1
    python -m hnet.perf.bench components --config configs/run_headline_hnet1.json --set train.batch_size=8
    python -m hnet.perf.bench decode                                  # tiny and S configs, batch 1 and 32
    python -m hnet.perf.bench decode --configs configs/hnet_1stage_tiny.json --batch-sizes 1 --new-bytes 128

`train` times the real training step (hnet.training.train_step.train_step jitted, optimizer included) on
synthetic random bytes (token ids for a BPE model), so no corpus is needed: trace and compile are
reported separately, then the first step, `--warmup` untimed steps, and the median of `--steps`
timed steps, each waited for with jax.block_until_ready. Model FLOPs per step come from
hnet.flops at the lengths the stages compute: an inner stage has seq_len / (bytes per chunk the
step measured) positions, at most its static capacity (hnet.chunking.stage_lengths). MFU = model
FLOPs / (step time x device count x peak), with the dense bf16 peak of known accelerators (H100
SXM: 989 TFLOP/s) or --peak-tflops. Beside it: the executed matmul FLOPs of the step's jaxpr
(hnet.perf.xla_stats: padded chunk slots, full attention blocks, recomputation included). A token run
reports tokens/s and bytes/s = tokens/s x bytes per token, from --bytes-per-token or, for a
tokenizer the run trains ({"vocab_size": V}) on a corpus with a measured ratio
(KNOWN_TOKENIZER_RATIOS, configs/families.json), that ratio.

`memory` lowers and compiles the same train step on abstract arguments without running it or
allocating the model, and prints XLA's memory analysis (arguments, outputs, aliased donations,
temporaries, peak estimate = arguments + outputs + temporaries - aliased; temporaries per
sequence of a micro-batch), the executed matmul FLOPs per step counted from its jaxpr, and the
model FLOPs per step (hnet.flops at the routing targets N, or --bytes-per-chunk) with their
ratio. A token model's FLOPs are per token sequence (seq_len counts tokens).

`components` times single pieces of the model at the run's shapes, forward and forward +
backward (hnet.perf.bench_components): the SSD scan, attention, and chunking (layout, gather, dechunk)
of each stage that has them.

`decode` times generation (hnet.inference.decode.Generator: jitted prefill, then a lax.scan sampling loop)
with randomly initialised weights in the config's dtype: bytes/s = batch x new bytes / time of the
whole loop after a compile-and-run warm-up (EOS disabled, so every row generates every byte), and
time to first byte = prefill of a `--prompt-bytes` prompt plus the first decode step, batch 1.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hnet.flops import human  # no JAX: `--help` stays fast
from hnet.training.run_config import add_override_argument
from hnet.stage_metrics import stage_metric


def model_config_name(config_path: str | Path | None, overrides: list[str] = ()) -> str:
    """The model config a run config names ("hnet_1stage_tiny"), after any model=... override;
    "inline" for an inline model, "?" when unreadable."""
    from hnet.training.run_config import DEFAULT_RUN

    model = None
    for text in overrides:
        key, _, value = text.partition("=")
        if key.strip() == "model":
            try:
                model = json.loads(value)
            except json.JSONDecodeError:
                model = value
    if model is None:
        try:
            model = json.loads(Path(config_path or DEFAULT_RUN).read_text()).get("model")
        except (OSError, json.JSONDecodeError, AttributeError):
            return "?"
    if isinstance(model, dict):
        model = model.get("config")
    return Path(model).stem if isinstance(model, str) else "inline"


# Measured bytes per token of the tokenizer a run config trains at its start ({"vocab_size": V}),
# by (corpus folder name, V): entries of configs/families.json "measurements".
KNOWN_TOKENIZER_RATIOS = {("default", 4096): "stdlib_bpe4096", ("pg_en", 32768): "pg_en_bpe32768"}


def known_bytes_per_token(run) -> tuple[float, str] | None:
    """(bytes per token, where it comes from) of a token run's tokenizer when measured, else None."""
    from hnet.config import read_json
    from hnet.flops import FAMILIES_FILE

    spec = run.data.tokenizer
    if not isinstance(spec, dict):
        return None
    name = KNOWN_TOKENIZER_RATIOS.get((Path(run.data.corpus).name, spec["vocab_size"]))
    if name is None:
        return None
    return float(read_json(FAMILIES_FILE, "families file")["measurements"][name]["value"]), f"families.json {name}"


@dataclass
class CompiledStep:
    """The jitted train step of a run, traced and compiled for its batch shape, not yet run.

    executable: (state, input_ids (A, b, L), targets (A, b, L)) -> (state, metrics), A = grad_accum,
    b = batch_size / A; jaxpr: the step's; matmuls: dot_general FLOPs of its jaxpr
    (hnet.perf.xla_stats), every slot ladder at its largest branch; memory: XLA's memory analysis.
    """

    run: object
    graphdef: object
    step_fns: object
    executable: object
    jaxpr: object
    matmuls: object
    memory: object
    trace_s: float
    compile_s: float

    @property
    def micro_batch(self) -> int:
        return self.run.train.batch_size // self.run.train.grad_accum


_COMPILED_STEPS: dict[str, CompiledStep] = {}


def compile_train_step(run) -> CompiledStep:
    """Trace, lower and compile the real train step on abstract arguments (nothing is allocated).

    Cached per run config, so that `bench memory` and `bench train` of the same run in one process
    compile once.
    """
    import jax
    import jax.numpy as jnp

    from hnet.perf.xla_stats import matmul_flops, memory_estimate
    from hnet.training.train_step import make_step_functions

    key = json.dumps(run.to_dict(), sort_keys=True)
    if key in _COMPILED_STEPS:
        return _COMPILED_STEPS[key]
    train = run.train
    graphdef, step_fns = make_step_functions(run)
    batch = jax.ShapeDtypeStruct(
        (train.grad_accum, train.batch_size // train.grad_accum, train.seq_len),
        jnp.int32,
        sharding=step_fns.micro_batch_sharding,
    )
    start = time.perf_counter()
    traced = step_fns.train_step.trace(step_fns.abstract_state, batch, batch)
    matmuls = matmul_flops(traced.jaxpr)
    trace_s = time.perf_counter() - start
    start = time.perf_counter()
    executable = traced.lower().compile()
    compile_s = time.perf_counter() - start
    compiled = CompiledStep(
        run, graphdef, step_fns, executable, traced.jaxpr, matmuls, memory_estimate(executable), trace_s, compile_s
    )
    _COMPILED_STEPS[key] = compiled
    return compiled


def ladder_weights(lengths: dict[int, list[int]]):
    """xla_stats branch weights from the slot-ladder lengths a batch's groups run on: lengths[s]
    lists one length per group (all micro-batches) for chunking stage s. A cond of stage s's
    ladder counts each branch by the share of groups that ran on its length."""
    from hnet.slots import branch_scope

    def weights(names):
        for stage, taken in lengths.items():
            if any(name is not None and name.startswith(f"stage{stage}_slots") for name in names):
                return [sum(1 for n in taken if branch_scope(stage, n) == name) / len(taken) for name in names]
        return None

    return weights


def taken_lengths(compiled: CompiledStep, params, input_ids) -> dict[int, list[int]]:
    """The slot-ladder length each group of rows runs on, per chunking stage, for micro-batches
    input_ids (A, b, L) under `params` (one device's grouping: hnet.slots.group_lengths)."""
    import jax
    from flax import nnx

    from hnet.slots import group_lengths, slot_ladder

    config, seq_len = compiled.run.model_config, input_ids.shape[-1]
    forward = jax.jit(
        lambda params, ids: [s.chunk_mask.sum(axis=1) for s in nnx.merge(compiled.graphdef, params)(ids).stages]
    )
    taken: dict[int, list[int]] = {s: [] for s in range(config.depth)}
    for micro in input_ids:
        for s, counts in enumerate(jax.device_get(forward(params, micro))):
            taken[s] += group_lengths(counts, slot_ladder(config, s, seq_len), config.slot_groups)
    return taken


def uniform_lengths(config, seq_len: int, micro_batch: int, stage_lengths_real) -> dict[int, list[int]]:
    """Slot-ladder lengths when every row of a micro-batch keeps the same chunks: stage s's rows
    hold stage_lengths_real[s + 1] chunks each (hnet.training.throughput.computed_stage_lengths)."""
    from hnet.slots import group_lengths, slot_ladder

    return {
        s: group_lengths(
            [math.ceil(stage_lengths_real[s + 1])] * micro_batch, slot_ladder(config, s, seq_len), config.slot_groups
        )
        for s in range(config.depth)
    }


def backward_pass(run) -> dict:
    """What the run's train step keeps for its backward pass on this backend: the remat policy
    (train.remat resolved) and, for an H-Net, how its slot ladder gets its residuals
    (train.slot_residuals resolved)."""
    import jax

    from hnet.training.train_step import remat_policy, slot_residual_mode

    config, train = run.model_config, run.train
    return {
        "remat": remat_policy(train.remat, config, train.seq_len),
        "slot_residuals": slot_residual_mode(train.slot_residuals, jax.default_backend()) if config.depth else None,
    }


def describe_device() -> str:
    import jax

    device = jax.devices()[0]
    return f"{device.device_kind} ({device.platform}), jax {jax.__version__}"


def bench_memory(config_path: str | None, overrides: list[str], bytes_per_chunk=None) -> dict:
    """Memory and FLOPs of a run's train step from compilation alone (see `format_memory_table`).

    Model FLOPs at the routing targets, or at `bytes_per_chunk` (one cumulative value per
    chunking stage), capped by the capacity (computed_stage_lengths).
    """
    import jax
    import numpy as np

    from hnet import chunking
    from hnet.training import throughput
    from hnet.training.run_config import load_run_config

    from hnet.perf.xla_stats import matmul_flops

    run = load_run_config(config_path, overrides)
    config, train = run.model_config, run.train
    model_flops, lengths = throughput.model_flops_per_step(config, train.batch_size, train.seq_len, bytes_per_chunk)
    compiled = compile_train_step(run)
    memory = compiled.memory
    # What runs for a batch whose rows all keep the chunks the model FLOPs count.
    taken = uniform_lengths(config, train.seq_len, compiled.micro_batch, lengths)
    executed = matmul_flops(compiled.jaxpr, ladder_weights(taken)) if config.depth else compiled.matmuls
    params = compiled.step_fns.abstract_state["params"]
    return {
        "benchmark": "memory",
        "device": describe_device(),
        "device_count": jax.device_count(),
        "model_config": model_config_name(config_path, overrides),
        "dtype": config.dtype,
        "params": sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)),
        "batch_size": train.batch_size,
        "grad_accum": train.grad_accum,
        "micro_batch": compiled.micro_batch,
        "seq_len": train.seq_len,
        "seq_unit": "bytes" if config.is_byte_model else "tokens",
        **backward_pass(run),
        "trace_s": compiled.trace_s,
        "compile_s": compiled.compile_s,
        **memory.to_dict(),
        "temp_bytes_per_sequence": memory.temp_bytes / compiled.micro_batch,
        "stage_lengths": lengths,
        "static_stage_lengths": chunking.stage_lengths(config, train.seq_len),
        "slot_lengths": {str(s): n for s, n in taken.items()},
        "slot_utilisation": [
            min(
                1.0,
                lengths[s + 1] * compiled.micro_batch / sum(n * compiled.micro_batch / len(taken[s]) for n in taken[s]),
            )
            for s in range(config.depth)
        ],
        "executed_matmul_flops_per_step": executed.flops,
        "executed_at_static_cap_flops_per_step": compiled.matmuls.flops,
        "executed_backward_share": executed.backward_flops / max(executed.flops, 1.0),
        "executed_float32_operand_share": executed.float32_operand_flops / max(executed.flops, 1.0),
        "executed_matmul_by_source": executed.to_dict()["by_source"],
        "executed_notes": sorted(executed.notes),
        "model_flops_per_step": model_flops,
        "executed_over_model_flops": executed.flops / model_flops,
        "executed_at_static_cap_over_model_flops": compiled.matmuls.flops / model_flops,
    }


def bench_train(
    config_path: str | None,
    overrides: list[str],
    steps: int,
    warmup: int,
    peak_tflops: float | None = None,
    bytes_per_token: float | None = None,
    checkpoint: str | None = None,
    data: str | None = None,
) -> dict:
    """Time the training step of a run config; returns a dict of results (see `format_table`).

    bytes_per_token: a token run's bytes per token, for bytes/s (default: the measured ratio of
    the run's tokenizer when known, KNOWN_TOKENIZER_RATIOS). Raises FlopsError when given for a
    byte model.
    checkpoint: a run or export folder of the same model whose parameters the timed steps start
    from (a trained router chunks as training does; a fresh one marks about half the bytes);
    data: a prepared byte corpus whose training rows the steps use ("default": the default
    corpus; with a checkpoint and no data, the default corpus; otherwise random bytes).
    """
    import jax
    import numpy as np

    from hnet import chunking
    from hnet.errors import FlopsError
    from hnet.training import throughput
    from hnet.training.run_config import load_run_config

    run = load_run_config(config_path, overrides)
    train, config = run.train, run.model_config
    if config.is_byte_model and bytes_per_token is not None:
        raise FlopsError("--bytes-per-token is for token runs; this model reads bytes")
    bytes_per_token_source = "--bytes-per-token" if bytes_per_token is not None else None
    if bytes_per_token is None and not config.is_byte_model:
        bytes_per_token, bytes_per_token_source = known_bytes_per_token(run) or (None, None)
    compiled = compile_train_step(run)
    state = compiled.step_fns.init()
    if checkpoint is not None:
        state = {**state, "params": _trained_params(checkpoint, config, state["params"])}
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state["params"]))

    # The shapes train.py feeds: (grad_accum, batch / grad_accum, seq_len) int32 micro-batches.
    shape = (train.grad_accum, compiled.micro_batch, train.seq_len)
    rng = np.random.default_rng(0)
    if data is None and checkpoint is not None:
        data = "default"
    if data is not None:
        if not config.is_byte_model:
            raise FlopsError("--data gives byte rows; a token run's bench uses random token ids")
        tokens = _corpus_rows(data, int(np.prod(shape[:-1])), train.seq_len, rng).reshape(
            shape[:-1] + (train.seq_len + 1,)
        )
    else:
        tokens = rng.integers(0, min(config.vocab_size, 256), size=shape[:-1] + (train.seq_len + 1,), dtype=np.int32)
    place = compiled.step_fns.place_train_batch
    input_ids, targets = place(tokens[..., :-1]), place(tokens[..., 1:])
    last_metrics = {}

    def one_step(state):
        state, metrics = compiled.executable(state, input_ids, targets)
        jax.block_until_ready((state, metrics))
        last_metrics.update(metrics)
        return state

    start = time.perf_counter()
    state = one_step(state)
    first_step_s = time.perf_counter() - start
    for _ in range(warmup):
        state = one_step(state)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state = one_step(state)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)

    device = jax.devices()[0]
    peak = throughput.peak_memory_bytes([device])
    # Model FLOPs at the chunks this step kept (averaged over micro-batches), at most the capacity.
    bytes_per_chunk = [float(last_metrics[stage_metric(s, "bytes_per_chunk")]) for s in range(config.depth)]
    step_flops, lengths = throughput.model_flops_per_step(config, train.batch_size, train.seq_len, bytes_per_chunk)
    executed = compiled.matmuls.flops
    if config.depth:  # the ladder lengths this batch's groups ran on (the parameters after the last step)
        from hnet.perf.xla_stats import matmul_flops

        executed = matmul_flops(
            compiled.jaxpr, ladder_weights(taken_lengths(compiled, state["params"], np.asarray(tokens[..., :-1])))
        ).flops
    peak_flops = throughput.peak_flops(device, peak_tflops)
    device_flops = step_s * peak_flops * jax.device_count() if peak_flops else None
    positions_per_sec = train.batch_size * train.seq_len / step_s
    if config.is_byte_model:
        bytes_per_sec = positions_per_sec
    else:
        bytes_per_sec = positions_per_sec * bytes_per_token if bytes_per_token else None
    return {
        "benchmark": "train",
        "device": describe_device(),
        "device_count": jax.device_count(),
        "model_config": model_config_name(config_path, overrides),
        "dtype": config.dtype,
        "params": n_params,
        "batch_size": train.batch_size,
        "grad_accum": train.grad_accum,
        "seq_len": train.seq_len,
        "seq_unit": "bytes" if config.is_byte_model else "tokens",
        **backward_pass(run),
        "trace_s": compiled.trace_s,
        "compile_s": compiled.compile_s,
        "first_step_s": first_step_s,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "step_s_median": step_s,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "bytes_per_sec": bytes_per_sec,
        "tokens_per_sec": None if config.is_byte_model else positions_per_sec,
        "bytes_per_token": bytes_per_token,
        "bytes_per_token_source": bytes_per_token_source,
        "bytes_per_chunk": bytes_per_chunk,
        "slot_utilisation": [float(last_metrics[stage_metric(s, "slot_utilisation")]) for s in range(config.depth)],
        "checkpoint": checkpoint,
        "rows": "random bytes" if data is None else f"training rows of the {data} corpus",
        "stage_lengths": lengths,
        "static_stage_lengths": chunking.stage_lengths(config, train.seq_len),
        "model_flops_per_step": step_flops,
        "executed_matmul_flops_per_step": executed,
        "executed_over_model_flops": executed / step_flops,
        "peak_flops": peak_flops,
        "mfu": step_flops / device_flops if device_flops else None,
        "executed_flops_utilization": executed / device_flops if device_flops else None,
        "peak_memory_bytes": peak,
        **{f"xla_{name}": value for name, value in compiled.memory.to_dict().items()},
    }


def _trained_params(checkpoint: str, config, params):
    """The parameters of a run or export folder, placed like `params` (the train state's); the
    folder's model must have the run config's parameters (settings such as the capacity rule or
    the slot ladder may differ)."""
    import jax

    from hnet.errors import FlopsError
    from hnet.inference.load import load_model

    from flax import nnx

    loaded = load_model(checkpoint)
    trained = nnx.split(loaded.model, nnx.Param)[1]
    shapes = lambda tree: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    if loaded.config.arch_layout != config.arch_layout or shapes(trained) != shapes(params):
        raise FlopsError(f"--checkpoint {checkpoint} holds another model than the run config's")
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, params)
    return jax.device_put(trained, shardings)


def _corpus_rows(data: str, rows: int, seq_len: int, rng):
    """`rows` random training windows of seq_len + 1 bytes of a prepared corpus ("default": the
    default corpus) -> int32 (rows, seq_len + 1)."""
    import numpy as np

    from hnet.io import data as data_lib

    corpus = data_lib.ensure_default_corpus(verbose=False) if data == "default" else data_lib.PreparedCorpus(data)
    source = data_lib.PackedSequences(corpus, "train", seq_len)
    index = rng.choice(len(source), size=rows, replace=len(source) < rows)
    return np.stack([source[int(i)] for i in index]).astype(np.int32)


def bench_components(config_path: str | None, overrides: list[str], steps: int) -> dict:
    """The model's pieces timed alone at the run's shapes (hnet.perf.bench_components)."""
    import jax

    from hnet.perf.bench_components import time_components
    from hnet.training.run_config import load_run_config

    run = load_run_config(config_path, overrides)
    train = run.train
    return {
        "benchmark": "components",
        "device": describe_device(),
        "device_count": jax.device_count(),
        "model_config": model_config_name(config_path, overrides),
        "dtype": run.model_config.dtype,
        "micro_batch": train.batch_size // train.grad_accum,
        "seq_len": train.seq_len,
        "timed_calls": steps,
        "rows": time_components(run, steps),
    }


LADDER_KEYS = ("slot_ladder", "slot_groups")


def ladder_overrides(config, overrides: list[str]):
    """A checkpoint's model config with --set model.slot_ladder / model.slot_groups applied (they
    change only which lengths the rows would run on, so bench chunks can try another ladder on a
    trained router); any other --set is a ConfigError, since the model is the checkpoint's."""
    from hnet.config import config_from_dict
    from hnet.errors import ConfigError
    from hnet.training.run_config import parse_override

    changes = {}
    for text in overrides:
        path, value = parse_override(text)
        if len(path) != 2 or path[0] != "model" or path[1] not in LADDER_KEYS:
            raise ConfigError(
                f"--set {text}: with --checkpoint the model is the checkpoint's; only "
                + " and ".join(f"model.{key}" for key in LADDER_KEYS)
                + " may change"
            )
        changes[path[1]] = value
    return config_from_dict({**config.to_dict(), **changes}) if changes else config


def bench_chunks(
    checkpoint: str | None,
    config_path: str | None,
    overrides: list[str],
    data: str | None,
    split: str,
    seq_len: int,
    batch_size: int,
    batches: int,
    seed: int = 0,
) -> dict:
    """Chunks each stage keeps per row and per micro-batch, on real rows of a corpus.

    The model is a run or export folder (`checkpoint`, its trained router) or a run config's model
    freshly initialised. Rows are `batches` x `batch_size` random windows of `seq_len` bytes of
    `split` (packed documents, as training sees them). Per stage: the router's boundaries and the
    chunks kept per row (mean, percentiles, max), the largest row of each micro-batch over its
    mean, the stage's static chunk slots, and the slot utilisation of the step (hnet.slots: each
    group of rows at its ladder length) against that of the static cap.
    """
    import jax
    import numpy as np

    from hnet import chunking
    from hnet.io import data as data_lib
    from hnet.training.run_config import load_run_config

    if checkpoint is not None:
        from hnet.inference.load import load_model

        loaded = load_model(checkpoint)
        model, config = loaded.model, ladder_overrides(loaded.config, overrides)
    else:
        from hnet.model import build_model

        config = load_run_config(config_path, overrides).model_config
        model = build_model(config)
    if not config.is_hierarchical:
        from hnet.errors import FlopsError

        raise FlopsError("bench chunks needs an H-Net (a model with chunking stages)")
    corpus = (
        data_lib.ensure_default_corpus(verbose=False) if data in (None, "default") else data_lib.PreparedCorpus(data)
    )
    source = data_lib.PackedSequences(corpus, split, seq_len)
    rng = np.random.default_rng(seed)
    from flax import nnx

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids).stages)
    boundaries = [[] for _ in range(config.depth)]  # per stage: (rows,) router boundaries
    kept = [[] for _ in range(config.depth)]
    for _ in range(batches):
        index = rng.choice(len(source), size=batch_size, replace=False)
        ids = np.stack([source[int(i)][:-1] for i in index]).astype(np.int32)
        stages = jax.device_get(forward(state, ids))
        for s, stage in enumerate(stages):
            boundaries[s].append(stage.boundary_mask.sum(axis=1))
            kept[s].append(stage.chunk_mask.sum(axis=1))
    static = chunking.stage_lengths(config, seq_len)
    from hnet.slots import group_lengths, model_ladders

    ladders = model_ladders(config, seq_len)
    result = {
        "benchmark": "chunks",
        "model": str(checkpoint or model_config_name(config_path, overrides)),
        "corpus": str(corpus.path),
        "split": split,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "batches": batches,
        "stages": [],
    }
    for s in range(config.depth):
        rows_kept = np.stack(kept[s]).astype(np.float64)  # (batches, batch_size)
        rows_wanted = np.stack(boundaries[s]).astype(np.float64)
        per_batch_max, per_batch_mean = rows_kept.max(axis=1), rows_kept.mean(axis=1)
        # What the step computes (hnet.slots): each group of similar rows at its ladder length.
        ladder_slots = sum(
            sum(group_lengths(row, ladders[s], config.slot_groups))
            * batch_size
            / len(group_lengths(row, ladders[s], config.slot_groups))
            for row in rows_kept
        )
        flat = rows_kept.ravel()
        result["stages"].append(
            {
                "stage": s,
                "static_slots": static[s + 1],
                "input_length": static[s],
                "boundaries_per_row_mean": float(rows_wanted.mean()),
                "kept_per_row": {
                    name: float(np.percentile(flat, q))
                    for name, q in (("min", 0), ("p10", 10), ("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
                },
                "kept_per_row_mean": float(flat.mean()),
                "kept_per_row_std": float(flat.std()),
                "dropped_share": float(1.0 - rows_kept.sum() / max(rows_wanted.sum(), 1.0)),
                "batch_max_over_mean": {
                    name: float(np.percentile(per_batch_max / per_batch_mean, q))
                    for name, q in (("p50", 50), ("p90", 90), ("max", 100))
                },
                "batch_max_over_static": {
                    name: float(np.percentile(per_batch_max / static[s + 1], q))
                    for name, q in (("p50", 50), ("p90", 90), ("max", 100))
                },
                "static_slot_utilisation": float(flat.mean() / static[s + 1]),
                "ladder": list(ladders[s]),
                "slot_groups": config.slot_groups,
                "ladder_slot_utilisation": float(rows_kept.sum() / ladder_slots),
                "kept_rows": rows_kept.astype(int).tolist(),
            }
        )
    return result


def format_chunks_table(result: dict) -> str:
    rows = [
        ("model", result["model"]),
        (
            "rows",
            f"{result['batches']} x {result['batch_size']} of {result['seq_len']} "
            f"bytes from {result['corpus']} ({result['split']})",
        ),
    ]
    for stage in result["stages"]:
        s, kept = stage["stage"], stage["kept_per_row"]
        rows += [
            (f"stage {s} input / static slots", f"{stage['input_length']} / {stage['static_slots']}"),
            (
                f"stage {s} kept per row",
                f"mean {stage['kept_per_row_mean']:.1f} (std {stage['kept_per_row_std']:.1f}); "
                + ", ".join(f"{k} {v:.0f}" for k, v in kept.items()),
            ),
            (
                f"stage {s} router boundaries per row",
                f"mean {stage['boundaries_per_row_mean']:.1f}; dropped {stage['dropped_share']:.2%}",
            ),
            (
                f"stage {s} micro-batch max / mean",
                ", ".join(f"{k} {v:.3f}" for k, v in stage["batch_max_over_mean"].items()),
            ),
            (
                f"stage {s} micro-batch max / static",
                ", ".join(f"{k} {v:.3f}" for k, v in stage["batch_max_over_static"].items()),
            ),
            (
                f"stage {s} slot utilisation",
                f"{stage['ladder_slot_utilisation']:.3f} on the ladder {stage['ladder']} "
                f"({stage['slot_groups']} groups), {stage['static_slot_utilisation']:.3f} "
                f"on the static cap",
            ),
        ]
    return format_aligned(rows)


def bench_decode(config_paths: list[str], batch_sizes: list[int], new_bytes: int, prompt_bytes: int) -> dict:
    """Decode throughput per (config, batch size) and time to first byte per config."""
    import numpy as np

    import hnet
    from hnet.inference.decode import Generator, SamplingConfig

    sampling = SamplingConfig(temperature=1.0, seed=0)
    rows = []
    for path in config_paths:
        config = hnet.load_config(path)
        model = hnet.build_model(config, seed=0)
        rng = np.random.default_rng(0)
        for batch in batch_sizes:
            generator = Generator(model, chunk_steps=32)
            prompts = [bytes(rng.integers(32, 127, size=16, dtype=np.uint8)) for _ in range(batch)]
            run = lambda: generator.generate(prompts, max_new_bytes=new_bytes, sampling=sampling, eos_id=-1)
            start = time.perf_counter()
            run()
            compile_s = time.perf_counter() - start
            start = time.perf_counter()
            result = run()
            elapsed = time.perf_counter() - start
            generated = sum(len(out) for out in result.outputs)
            rows.append(
                {
                    "config": Path(path).stem,
                    "dtype": config.dtype,
                    "batch": batch,
                    "new_bytes": new_bytes,
                    "seconds": elapsed,
                    "bytes_per_sec": generated / elapsed,
                    "compile_s": compile_s,
                }
            )
        # Time to first byte: prefill of a long prompt and one decode step.
        generator = Generator(model, chunk_steps=1)
        prompt = bytes(rng.integers(32, 127, size=prompt_bytes, dtype=np.uint8))
        first = lambda: next(iter(generator.stream([prompt], max_new_bytes=1, sampling=sampling, eos_id=-1)))
        first()  # compile
        start = time.perf_counter()
        first()
        rows[-1]["time_to_first_byte_s"] = time.perf_counter() - start
        rows[-1]["prompt_bytes"] = prompt_bytes
    return {"benchmark": "decode", "device": describe_device(), "rows": rows}


def format_decode_table(result: dict) -> str:
    header = f"device: {result['device']}\n"
    lines = [f"{'config':<22}{'dtype':<10}{'batch':>6}{'bytes/s':>12}{'compile s':>11}{'time to first byte':>24}"]
    for row in result["rows"]:
        first = (
            f"{row['time_to_first_byte_s'] * 1e3:.1f} ms ({row['prompt_bytes']} B)"
            if "time_to_first_byte_s" in row
            else ""
        )
        lines.append(
            f"{row['config']:<22}{row['dtype']:<10}{row['batch']:>6}{row['bytes_per_sec']:>12,.0f}"
            f"{row['compile_s']:>11.1f}{first:>24}"
        )
    return header + "\n".join(lines)


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


def format_sources(by_source: dict, total: float, top: int = 6) -> str:
    """The largest matmul sources as "layers/kernels/attention.py:attend 41%, ..."."""
    items = sorted(by_source.items(), key=lambda item: -item[1])[:top]
    return ", ".join(f"{name} {flops / total:.0%}" for name, flops in items) if total else "-"


def stage_lengths_text(result: dict) -> str:
    """'computed 8192, 1365; static 8192, 2944': each stage's length at the chunking counted, and the
    static length it is compiled for."""
    computed = ", ".join(f"{n:.0f}" for n in result["stage_lengths"])
    return f"computed {computed}; static " + ", ".join(str(n) for n in result["static_stage_lengths"])


def format_aligned(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows) + 2
    return "\n".join(f"{name:<{width}}{value}" for name, value in rows)


def backward_pass_text(result: dict) -> str:
    """ "remat block, slot ladder keeps its residuals" from backward_pass's fields."""
    text = f"remat {result['remat']}"
    if result["slot_residuals"] is not None:
        text += ", slot ladder " + (
            "keeps its residuals" if result["slot_residuals"] == "keep" else "recomputes its forward"
        )
    return text


def format_memory_table(result: dict) -> str:
    """Two aligned columns, human units."""
    executed, model = result["executed_matmul_flops_per_step"], result["model_flops_per_step"]
    rows = [
        ("device", result["device"]),
        ("model config", f"{result['model_config']} ({result['dtype']}), {result['params']:,} parameters"),
        (
            "global batch",
            f"{result['batch_size']} sequences (grad_accum {result['grad_accum']}, "
            f"micro-batch {result['micro_batch']})",
        ),
        ("sequence length", f"{result['seq_len']} {result['seq_unit']}"),
        ("stage lengths", stage_lengths_text(result)),
        ("trace / compile", f"{result['trace_s']:.1f} s / {result['compile_s']:.1f} s"),
        ("backward pass", backward_pass_text(result)),
        (
            "arguments",
            f"{mib(result['argument_bytes'])} (outputs {mib(result['output_bytes'])}, "
            f"aliased {mib(result['alias_bytes'])})",
        ),
        ("temporaries", f"{mib(result['temp_bytes'])} ({mib(result['temp_bytes_per_sequence'])} per sequence)"),
        ("peak estimate", mib(result["peak_bytes"])),
        (
            "executed matmul FLOPs",
            f"{human(executed)}FLOP per step (backward {result['executed_backward_share']:.0%}, "
            f"a float32 operand {result['executed_float32_operand_share']:.0%})",
        ),
        ("matmuls by source", format_sources(result["executed_matmul_by_source"], executed)),
        ("model FLOPs", f"{human(model)}FLOP per step (hnet.flops, training)"),
        (
            "executed / model",
            f"{result['executed_over_model_flops']:.3f}"
            + (
                f" (at the static cap {result['executed_at_static_cap_over_model_flops']:.3f})"
                if result["slot_lengths"]
                else ""
            ),
        ),
    ]
    if result["slot_lengths"]:
        rows.insert(
            5,
            (
                "chunk slots",
                "; ".join(
                    f"stage {s}: groups on {', '.join(map(str, lengths))}, utilisation {u:.3f}"
                    for (s, lengths), u in zip(result["slot_lengths"].items(), result["slot_utilisation"])
                ),
            ),
        )
    rows += [("note", note) for note in result["executed_notes"]]
    return format_aligned(rows)


def format_table(result: dict) -> str:
    """Two aligned columns, human units."""
    peak = result["peak_memory_bytes"]
    if result["bytes_per_sec"] is None:
        speed = f"{result['tokens_per_sec']:,.0f} tokens/s (bytes/s: pass --bytes-per-token)"
    elif result["tokens_per_sec"] is None:
        speed = f"{result['bytes_per_sec']:,.0f} bytes/s"
    else:
        speed = (
            f"{result['tokens_per_sec']:,.0f} tokens/s = {result['bytes_per_sec']:,.0f} bytes/s at "
            f"{result['bytes_per_token']:g} bytes/token ({result['bytes_per_token_source']})"
        )
    if result["mfu"] is None:
        mfu = "n/a (unknown device peak; pass --peak-tflops)"
    else:
        mfu = (
            f"{100 * result['mfu']:.1f}% of {result['peak_flops'] / 1e12:,.0f} TFLOP/s per device "
            f"(executed matmuls: {100 * result['executed_flops_utilization']:.1f}%)"
        )
    rows = [
        ("device", result["device"]),
        ("model config", f"{result['model_config']} ({result['dtype']})"),
        ("parameters", f"{result['params']:,}"),
        ("global batch", f"{result['batch_size']} sequences (grad_accum {result['grad_accum']})"),
        ("sequence length", f"{result['seq_len']} {result['seq_unit']}"),
        (
            "trace / compile / first step",
            f"{result['trace_s']:.1f} s / {result['compile_s']:.1f} s / {result['first_step_s']:.2f} s",
        ),
        ("backward pass", backward_pass_text(result)),
        (
            f"step time (median of {result['timed_steps']})",
            f"{result['step_s_median'] * 1e3:.1f} ms (min {result['step_s_min'] * 1e3:.1f}, max {result['step_s_max'] * 1e3:.1f})",
        ),
        ("throughput", speed),
        ("rows", result["rows"] + (f", parameters from {result['checkpoint']}" if result["checkpoint"] else "")),
        ("bytes per chunk (this step)", ", ".join(f"{b:.2f}" for b in result["bytes_per_chunk"]) or "-"),
        ("slot utilisation (this step)", ", ".join(f"{u:.3f}" for u in result["slot_utilisation"]) or "-"),
        ("stage lengths", stage_lengths_text(result)),
        ("model FLOPs per step", f"{human(result['model_flops_per_step'])}FLOP (hnet.flops, training)"),
        (
            "executed matmul FLOPs",
            f"{human(result['executed_matmul_flops_per_step'])}FLOP "
            f"({result['executed_over_model_flops']:.2f} x model)",
        ),
        ("MFU", mfu),
        ("XLA temporaries", f"{mib(result['xla_temp_bytes'])} (peak estimate {mib(result['xla_peak_bytes'])})"),
        ("peak device memory", "n/a" if peak is None else mib(peak)),
    ]
    return format_aligned(rows)


def run_arguments(parser) -> None:
    """--config and --set, shared by the commands that build a run's train step."""
    parser.add_argument("--config", help="run config JSON (default: configs/run_tiny.json)")
    add_override_argument(parser, "train.batch_size=16")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m hnet.perf.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser("train", help="time the training step of a run config")
    run_arguments(train)
    train.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
    train.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (default: 2)")
    train.add_argument(
        "--peak-tflops", type=float, help="device peak for MFU (default: known bf16 peak, e.g. 989 for H100)"
    )
    train.add_argument(
        "--bytes-per-token",
        type=float,
        help="a token run's bytes per token, for bytes/s (default: its tokenizer's measured ratio, when known)",
    )
    train.add_argument("--checkpoint", help="start from this run or export folder's parameters (a trained router)")
    train.add_argument(
        "--data",
        help="training rows of this prepared byte corpus, or 'default' (default: random "
        "bytes; the default corpus with --checkpoint)",
    )
    memory = commands.add_parser("memory", help="compile the training step without running it: memory and FLOPs")
    run_arguments(memory)
    memory.add_argument(
        "--bytes-per-chunk",
        type=float,
        nargs="+",
        help="cumulative bytes per chunk, one per chunking stage, for the model FLOPs (default: targets N)",
    )
    components = commands.add_parser("components", help="time the SSD scan, attention and chunking alone")
    run_arguments(components)
    components.add_argument("--steps", type=int, default=10, help="timed calls per piece (default: 10)")
    chunks = commands.add_parser("chunks", help="chunks kept per row and per micro-batch on real rows")
    run_arguments(chunks)
    chunks.add_argument(
        "--checkpoint",
        help="run or export folder whose router to use (default: --config's model, untrained); with it, "
        "--set may change only model.slot_ladder and model.slot_groups (another ladder on that router)",
    )
    chunks.add_argument("--data", help="prepared byte corpus folder (default: the default corpus)")
    chunks.add_argument("--split", default="train", help="(default: train)")
    chunks.add_argument("--seq-len", type=int, default=512, help="row length in bytes (default: 512)")
    chunks.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch (default: 8)")
    chunks.add_argument("--batches", type=int, default=50, help="micro-batches to sample (default: 50)")
    decode = commands.add_parser("decode", help="time generation: bytes/s and time to first byte")
    decode.add_argument(
        "--configs",
        nargs="+",
        default=["configs/hnet_1stage_tiny.json", "configs/hnet_1stage_S.json"],
        help="model configs (default: the tiny and S 1-stage H-Nets)",
    )
    decode.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="(default: 1 32)")
    decode.add_argument("--new-bytes", type=int, default=256, help="bytes generated per row (default: 256)")
    decode.add_argument(
        "--prompt-bytes", type=int, default=1000, help="prompt length for time to first byte (default: 1000)"
    )
    decode.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.command == "train" and (args.steps < 1 or args.warmup < 0):
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.command == "train" and args.bytes_per_token is not None and not args.bytes_per_token > 0:
        parser.error("--bytes-per-token must be positive")
    if args.command == "components" and args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.command == "decode" and (min(args.batch_sizes) < 1 or args.new_bytes < 1 or args.prompt_bytes < 1):
        parser.error("--batch-sizes, --new-bytes and --prompt-bytes must be >= 1")
    return args


def run_command(args) -> tuple[dict, str]:
    """-> (result dict, its table) of the parsed command."""
    if args.command == "train":
        result = bench_train(
            args.config,
            args.overrides,
            args.steps,
            args.warmup,
            args.peak_tflops,
            args.bytes_per_token,
            args.checkpoint,
            args.data,
        )
        return result, format_table(result)
    if args.command == "memory":
        result = bench_memory(args.config, args.overrides, args.bytes_per_chunk)
        return result, format_memory_table(result)
    if args.command == "components":
        from hnet.perf.bench_components import format_components_table

        result = bench_components(args.config, args.overrides, args.steps)
        return result, format_components_table(result)
    if args.command == "chunks":
        result = bench_chunks(
            args.checkpoint,
            args.config,
            args.overrides,
            args.data,
            args.split,
            args.seq_len,
            args.batch_size,
            args.batches,
        )
        return result, format_chunks_table(result)
    result = bench_decode(args.configs, args.batch_sizes, args.new_bytes, args.prompt_bytes)
    return result, format_decode_table(result)


def main(argv: list[str] | None = None) -> dict | None:
    """Run the chosen benchmark, print it, and return its result dict (None on bad input)."""
    args = parse_args(argv)
    from hnet.errors import HNetError, report

    try:
        result, table = run_command(args)
    except HNetError as err:
        report(err)
        return None
    print(json.dumps(result) if args.json else table)
    return result


if __name__ == "__main__":
    from hnet.host_memory import use_huge_pages

    use_huge_pages()  # as train.py: the timed steps fault their memory in 2 MiB at a time
    sys.exit(0 if main() is not None else 2)
