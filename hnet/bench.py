"""Benchmarks on the current JAX device.

    python -m hnet.bench train                                   # configs/run_tiny.json
    python -m hnet.bench train --config configs/run_tiny.json --set train.batch_size=16 --steps 20
    python -m hnet.bench train --json                            # one JSON object instead of a table
    python -m hnet.bench decode                                  # tiny and S configs, batch 1 and 32
    python -m hnet.bench decode --configs configs/hnet_1stage_tiny.json --batch-sizes 1 --new-bytes 128

`train` times the real training step (hnet.train_step.train_step jitted, optimizer included) on
synthetic random bytes (token ids for a BPE model), so no corpus is needed: the first call
(compile + one step) is reported separately, then `--warmup` untimed steps, then the median of
`--steps` timed steps, each waited for with jax.block_until_ready. Model FLOPs per step come from
hnet.flops at the bytes per chunk the step measured; MFU = model FLOPs / (step time x device count
x peak), with the dense bf16 peak of known accelerators (hnet.throughput: H100 and H200 989 TFLOP/s,
A100 312, TPU v4 275, v5e 197, v5p 459) or --peak-tflops.

`decode` times generation (hnet.decode.Generator: jitted prefill, then a lax.scan sampling loop)
with randomly initialised weights in the config's dtype: bytes/s = batch x new bytes / time of the
whole loop after a compile-and-run warm-up (EOS disabled, so every row generates every byte), and
time to first byte = prefill of a `--prompt-bytes` prompt plus the first decode step, batch 1.
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


def bench_train(config_path: str | None, overrides: list[str], steps: int, warmup: int,
                peak_tflops: float | None = None) -> dict:
    """Time the training step of a run config; returns a dict of results (see `format_table`)."""
    import jax
    import numpy as np

    from hnet import throughput
    from hnet.run_config import load_run_config
    from hnet.train_step import init_state

    run = load_run_config(config_path, overrides)
    train = run.train
    _, state, step_fns = init_state(run)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state["params"]))

    # The shapes train.py feeds: (grad_accum, batch / grad_accum, seq_len) int32 micro-batches.
    shape = (train.grad_accum, train.batch_size // train.grad_accum, train.seq_len)
    rng = np.random.default_rng(0)
    vocab = run.model_config.vocab_size
    tokens = rng.integers(0, min(vocab, 256), size=shape[:-1] + (train.seq_len + 1,), dtype=np.int32)
    input_ids, targets = step_fns.place_train_batch(tokens[..., :-1]), step_fns.place_train_batch(tokens[..., 1:])
    last_metrics = {}

    def one_step(state):
        state, metrics = step_fns.train_step(state, input_ids, targets)
        jax.block_until_ready((state, metrics))
        last_metrics.update(metrics)
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
    # Model FLOPs at the chunk sizes this step measured (hnet.flops); MFU against the device peak.
    config = run.model_config
    host_metrics = jax.device_get(last_metrics)
    step_flops = throughput.step_model_flops(config, train.batch_size, train.seq_len, host_metrics)
    peak_flops = throughput.peak_flops(device, peak_tflops)
    positions_per_sec = train.batch_size * train.seq_len / step_s
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
        "bytes_per_sec": positions_per_sec if config.is_byte_model else None,
        "tokens_per_sec": None if config.is_byte_model else positions_per_sec,
        "bytes_per_chunk": throughput.measured_bytes_per_chunk(config, host_metrics),
        "model_flops_per_step": step_flops,
        "peak_flops": peak_flops,
        "mfu": throughput.mfu(step_flops, step_s, peak_flops, jax.device_count()),
        "peak_memory_bytes": throughput.peak_memory_bytes(jax.local_devices()),
    }


def bench_decode(config_paths: list[str], batch_sizes: list[int], new_bytes: int, prompt_bytes: int) -> dict:
    """Decode throughput per (config, batch size) and time to first byte per config."""
    import jax
    import numpy as np

    import hnet
    from hnet.decode import Generator, SamplingConfig

    device = jax.devices()[0]
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
            rows.append({"config": Path(path).stem, "dtype": config.dtype, "batch": batch, "new_bytes": new_bytes,
                         "seconds": elapsed, "bytes_per_sec": generated / elapsed, "compile_s": compile_s})
        # Time to first byte: prefill of a long prompt and one decode step.
        generator = Generator(model, chunk_steps=1)
        prompt = bytes(rng.integers(32, 127, size=prompt_bytes, dtype=np.uint8))
        first = lambda: next(iter(generator.stream([prompt], max_new_bytes=1, sampling=sampling, eos_id=-1)))
        first()  # compile
        start = time.perf_counter()
        first()
        rows[-1]["time_to_first_byte_s"] = time.perf_counter() - start
        rows[-1]["prompt_bytes"] = prompt_bytes
    return {"benchmark": "decode", "device": f"{device.device_kind} ({device.platform})", "rows": rows}


def format_decode_table(result: dict) -> str:
    header = f"device: {result['device']}\n"
    lines = [f"{'config':<22}{'dtype':<10}{'batch':>6}{'bytes/s':>12}{'compile s':>11}{'time to first byte':>24}"]
    for row in result["rows"]:
        first = f"{row['time_to_first_byte_s'] * 1e3:.1f} ms ({row['prompt_bytes']} B)" if "time_to_first_byte_s" in row else ""
        lines.append(f"{row['config']:<22}{row['dtype']:<10}{row['batch']:>6}{row['bytes_per_sec']:>12,.0f}"
                     f"{row['compile_s']:>11.1f}{first:>24}")
    return header + "\n".join(lines)


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
        ("throughput", f"{result['bytes_per_sec']:,.0f} bytes/s" if result["bytes_per_sec"] is not None
         else f"{result['tokens_per_sec']:,.0f} tokens/s"),
        ("bytes per chunk (this step)", ", ".join(f"{b:.2f}" for b in result["bytes_per_chunk"]) or "-"),
        ("model FLOPs per step", f"{result['model_flops_per_step'] / 1e12:,.3f} TFLOP (hnet.flops, training)"),
        ("MFU", "n/a (unknown device peak; pass --peak-tflops)" if result["mfu"] is None
         else f"{100 * result['mfu']:.1f}% of {result['peak_flops'] / 1e12:,.0f} TFLOP/s per device"),
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
    train.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: known bf16 peak, e.g. 989 for H100)")
    train.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    decode = commands.add_parser("decode", help="time generation: bytes/s and time to first byte")
    decode.add_argument("--configs", nargs="+", default=["configs/hnet_1stage_tiny.json", "configs/hnet_1stage_S.json"],
                        help="model configs (default: the tiny and S 1-stage H-Nets)")
    decode.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="(default: 1 32)")
    decode.add_argument("--new-bytes", type=int, default=256, help="bytes generated per row (default: 256)")
    decode.add_argument("--prompt-bytes", type=int, default=1000, help="prompt length for time to first byte (default: 1000)")
    decode.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.command == "train" and (args.steps < 1 or args.warmup < 0):
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.command == "decode" and (min(args.batch_sizes) < 1 or args.new_bytes < 1 or args.prompt_bytes < 1):
        parser.error("--batch-sizes, --new-bytes and --prompt-bytes must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    """Run the chosen benchmark, print it, and return its result dict (None on a config error)."""
    args = parse_args(argv)
    from hnet.errors import ConfigError

    try:
        if args.command == "train":
            result = bench_train(args.config, args.overrides, args.steps, args.warmup, args.peak_tflops)
            table = format_table(result)
        else:
            result = bench_decode(args.configs, args.batch_sizes, args.new_bytes, args.prompt_bytes)
            table = format_decode_table(result)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return None
    print(json.dumps(result) if args.json else table)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 2)
