"""Benchmarks on the current JAX device.

    python -m hnet.bench train                                   # configs/run_tiny.json
    python -m hnet.bench train --config configs/run_tiny.json --set train.batch_size=16 --steps 20
    python -m hnet.bench train --json                            # one JSON object instead of a table

`train` times the real training step (hnet.train_loop's jitted train_step, optimizer included) on
synthetic random bytes, so no corpus is needed: the first call (compile + one step) is reported
separately, then `--warmup` untimed steps, then the median of `--steps` timed steps, each waited
for with jax.block_until_ready.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def model_config_name(config_path: str | Path | None) -> str:
    """The model config a run config names ("hnet_1stage_tiny"), or "inline"."""
    from hnet.run_config import DEFAULT_RUN

    try:
        model = json.loads(Path(config_path or DEFAULT_RUN).read_text()).get("model")
    except (OSError, json.JSONDecodeError, AttributeError):
        return "?"
    if isinstance(model, dict):
        model = model.get("config")
    return Path(model).stem if isinstance(model, str) else "inline"


def bench_train(config_path: str | None, overrides: list[str], steps: int, warmup: int) -> dict:
    """Time the training step of a run config; returns a dict of results (see `format_table`)."""
    import jax
    import numpy as np

    from hnet.run_config import load_run_config
    from hnet.train_loop import init_state

    run = load_run_config(config_path, overrides)
    train = run.train
    _, state, step_fns = init_state(run)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state["params"]))

    # The shapes train.py feeds: (grad_accum, batch / grad_accum, seq_len) int32 micro-batches.
    shape = (train.grad_accum, train.batch_size // train.grad_accum, train.seq_len)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, size=shape[:-1] + (train.seq_len + 1,), dtype=np.int32)
    input_ids, targets = jax.device_put(tokens[..., :-1]), jax.device_put(tokens[..., 1:])

    def one_step(state):
        state, metrics = step_fns.train_step(state, input_ids, targets)
        jax.block_until_ready((state, metrics))
        return state

    start = time.perf_counter()
    state = one_step(state)  # traces, compiles and runs once
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        state = one_step(state)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state = one_step(state)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)

    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    peak = (stats or {}).get("peak_bytes_in_use")
    return {
        "benchmark": "train",
        "device": f"{device.device_kind} ({device.platform})",
        "device_count": jax.device_count(),
        "model_config": model_config_name(config_path),
        "dtype": run.model.get("dtype"),
        "params": n_params,
        "batch_size": train.batch_size,
        "grad_accum": train.grad_accum,
        "seq_len": train.seq_len,
        "compile_s": compile_s,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "step_s_median": step_s,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "bytes_per_sec": train.batch_size * train.seq_len / step_s,
        "peak_memory_bytes": peak,
    }


def format_table(result: dict) -> str:
    """Two aligned columns, human units."""
    peak = result["peak_memory_bytes"]
    rows = [
        ("device", result["device"]),
        ("model config", f"{result['model_config']} ({result['dtype']})"),
        ("parameters", f"{result['params']:,}"),
        ("global batch", f"{result['batch_size']} sequences (grad_accum {result['grad_accum']})"),
        ("sequence length", f"{result['seq_len']} bytes"),
        ("compile (first step)", f"{result['compile_s']:.2f} s"),
        (f"step time (median of {result['timed_steps']})",
         f"{result['step_s_median'] * 1e3:.1f} ms (min {result['step_s_min'] * 1e3:.1f}, max {result['step_s_max'] * 1e3:.1f})"),
        ("throughput", f"{result['bytes_per_sec']:,.0f} bytes/s"),
        ("peak device memory", "n/a" if peak is None else f"{peak / 2**20:,.1f} MiB"),
    ]
    width = max(len(name) for name, _ in rows) + 2
    return "\n".join(f"{name:<{width}}{value}" for name, value in rows)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m hnet.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser("train", help="time the training step of a run config")
    train.add_argument("--config", help="run config JSON (default: configs/run_tiny.json)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a run-config value, e.g. train.batch_size=16 (repeatable)")
    train.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
    train.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (default: 2)")
    train.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    """Run the chosen benchmark, print it, and return its result dict (None on a config error)."""
    args = parse_args(argv)
    from hnet.config import ConfigError

    try:
        if args.command == "train":
            result = bench_train(args.config, args.overrides, args.steps, args.warmup)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return None
    print(json.dumps(result) if args.json else format_table(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 2)
