#!/usr/bin/env bash
# Training-step efficiency check on one GPU (issue #16): the four headline S models at 8192 bytes
# in bf16 (configs/run_headline_{hnet1,hnet2,bpe,byte}.json; BPE at 2083 tokens).
#   1. bench train: the largest micro-batch that fits, from MICRO_BATCHES (descending). A size
#      whose compiled memory estimate exceeds the device's limit is skipped without running it
#      (and so is every larger one the estimate's per-sequence temporaries predict will not fit);
#      a run that still fails with RESOURCE_EXHAUSTED tries the next size.
#   2. bench memory of every size compiled in 1 (the same compilations: no extra cost).
#   3. bench decode of the byte-level S models at batch 1 and 32.
#   4. bench components (SSD scan, attention, chunking alone) of each model at its micro-batch.
# Results: $OUT/gpu_check.json (everything, rewritten after each item) and $OUT/gpu_check.md.
# A time budget (BUDGET_S, default 450 s of the script's 8 minutes) is checked before each item:
# an item starts only if one as long as the longest so far still fits, the rest are listed as
# skipped. Needs jax with CUDA; no corpus and no grain. The timings of a GPU run are estimates
# until measured: this script was written on a CPU-only machine.
#
#   bash scripts/gpu_check.sh               # on the GPU machine, results in runs/gpu_check
#   SMOKE=1 bash scripts/gpu_check.sh       # the same steps on CPU: tiny configs, seq_len 256, 2 steps
# Environment: OUT (output folder), PYTHON (default python), BUDGET_S, MICRO_BATCHES ("16 8 4 2 1"),
# RUNS (a subset of "hnet1 hnet2 bpe byte"), DEVICE_BYTES_LIMIT (bytes; default the device's limit).
# Exits 0 when every item ran (skips for the time budget included), 1 when one failed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
    OUT=${OUT:-runs/gpu_check_smoke}
    export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
    MICRO_BATCHES=${MICRO_BATCHES:-"2 1"}
    BUDGET_S=${BUDGET_S:-3600}
else
    OUT=${OUT:-runs/gpu_check}
    MICRO_BATCHES=${MICRO_BATCHES:-"16 8 4 2 1"}
    BUDGET_S=${BUDGET_S:-450}
    # Let XLA use most of the GPU for the largest micro-batch (JAX preallocates 75% by default).
    export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
fi
mkdir -p "$OUT"
echo "== gpu check into $OUT (SMOKE=$SMOKE, micro-batches $MICRO_BATCHES, budget ${BUDGET_S}s)"

$PY - "$OUT" "$SMOKE" "$MICRO_BATCHES" "$BUDGET_S" "${RUNS:-hnet1 hnet2 bpe byte}" "${DEVICE_BYTES_LIMIT:-}" <<'PYEOF'
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import jax

from hnet.perf import bench

out, smoke, budget_s = Path(sys.argv[1]), sys.argv[2] == "1", float(sys.argv[4])
micro_batches = sorted({int(b) for b in sys.argv[3].split()}, reverse=True)
deadline = time.monotonic() + budget_s
ALL_RUNS = ("hnet1", "hnet2", "bpe", "byte")
unknown = sorted(set(sys.argv[5].split()) - set(ALL_RUNS))
if unknown:
    print(f"error: RUNS: unknown run(s) {', '.join(unknown)} (known: {' '.join(ALL_RUNS)})", file=sys.stderr)
    sys.exit(2)
RUNS = {name: f"configs/run_headline_{name}.json" for name in ALL_RUNS if name in sys.argv[5].split()}
if smoke:
    # The tiny configs with one block per layout letter and small widths (the same stages, layers
    # and routing; compiling the train steps dominates this run), float32, 256 positions.
    SSM = {"d_state": 8, "d_conv": 4, "expand": 2, "chunk_size": 16, "head_dim": 16}

    def attention(windows):
        return {"num_heads": [2] * len(windows), "rotary_emb_dim": [8] * len(windows), "window_size": windows}

    SMOKE_MODELS = {
        "hnet1": {"config": "hnet_1stage_tiny.json", "arch_layout": ["m1", ["T1"], "m1"], "d_model": [32, 48],
                  "d_intermediate": [0, 64], "ssm_cfg": SSM, "attn_cfg": attention([7, -1]), "capacity_multiple": 8},
        "hnet2": {"config": "hnet_2stage_tiny.json", "arch_layout": ["m1", ["t1", ["T1"], "t1"], "m1"],
                  "d_model": [32, 32, 48], "d_intermediate": [0, 0, 64], "ssm_cfg": SSM,
                  "attn_cfg": attention([7, 7, -1]), "capacity_multiple": 8},
        "bpe": {"config": "transformer_bpe_tiny.json", "arch_layout": ["T1"], "d_model": [32], "d_intermediate": [64],
                "attn_cfg": attention([-1])},
        "byte": {"config": "transformer_byte_tiny.json", "arch_layout": ["T1"], "d_model": [32], "d_intermediate": [64],
                 "attn_cfg": attention([-1])},
    }
    RUN_SET = {name: [f"model={json.dumps({**model, 'dtype': 'float32'})}", "train.seq_len=256"]
               for name, model in SMOKE_MODELS.items()}
    RUN_SET["bpe"] += ['data.tokenizer={"vocab_size": 4096}', "data.corpus=default"]  # a known bytes/token
    # Decode reads model config files: the small 1-stage H-Net, written next to the results.
    from hnet.training.run_config import load_run_config
    decode_config = out / "smoke_hnet_1stage.json"
    decode_config.write_text(json.dumps(load_run_config("configs/run_headline_hnet1.json", RUN_SET["hnet1"]).model))
    TRAIN = {"steps": 2, "warmup": 0}
    DECODE = {"models": {"hnet1": str(decode_config)}, "batch_sizes": [1, 32], "new_bytes": 8, "prompt_bytes": 32}
    COMPONENT_STEPS = 1
else:
    RUN_SET = {name: [] for name in RUNS}
    TRAIN = {"steps": 5, "warmup": 2}
    # Generation is for byte-level models: the model configs of the byte runs.
    DECODE = {"models": {"hnet1": "configs/hnet_1stage_S.json", "hnet2": "configs/hnet_2stage_S.json",
                         "byte": "configs/transformer_byte_S.json"}, "batch_sizes": [1, 32], "new_bytes": 256,
              "prompt_bytes": 1000}
    COMPONENT_STEPS = 5

device = jax.devices()[0]
limit = ((device.memory_stats() if hasattr(device, "memory_stats") else None) or {}).get("bytes_limit")
limit = int(sys.argv[6]) if sys.argv[6] else limit  # DEVICE_BYTES_LIMIT, e.g. to leave room for others
report = {"device": bench.describe_device(), "smoke": smoke, "micro_batches": micro_batches, "budget_s": budget_s,
          "device_bytes_limit": limit, "train": [], "memory": [], "decode": [], "components": [], "skipped": [],
          "failures": [], "item_seconds": {}}
started = time.monotonic()


def save():
    report["elapsed_s"] = time.monotonic() - started
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")


longest_item_s = 0.0  # the longest item so far: one that long must still fit in the budget


def in_budget(item: str) -> bool:
    if time.monotonic() + longest_item_s < deadline:
        return True
    report["skipped"].append({"item": item, "reason": f"time budget of {budget_s:.0f} s spent"})
    return False


def item_done(item: str, item_started: float) -> None:
    global longest_item_s
    report["item_seconds"][item] = time.monotonic() - item_started
    longest_item_s = max(longest_item_s, report["item_seconds"][item])
    save()


def failed(item: str, err: Exception) -> None:
    print(f"== {item} failed: {type(err).__name__}: {err}", file=sys.stderr)
    traceback.print_exc()
    report["failures"].append({"item": item, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:500]}"})


def is_out_of_memory(err: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower()


def batch_set(name: str, micro: int) -> list[str]:
    return RUN_SET[name] + [f"train.batch_size={micro}", "train.grad_accum=1"]


def train_attempt(name: str, config: str, micro: int):
    """Compile (bench memory), then time (bench train) one micro-batch size if it fits.

    -> ("ran", train result) | ("over", (fixed bytes, temp bytes per sequence)) when the compiled
    estimate exceeds the device limit | ("oom", None) when running it ran out of memory.
    """
    memory = bench.bench_memory(config, batch_set(name, micro))
    report["memory"].append({"run": name, **memory})
    if limit and memory["peak_bytes"] > limit:
        return "over", (memory["peak_bytes"] - memory["temp_bytes"], memory["temp_bytes_per_sequence"])
    try:
        return "ran", bench.bench_train(config, batch_set(name, micro), **TRAIN)
    except Exception as err:  # noqa: BLE001
        if is_out_of_memory(err):
            return "oom", None
        raise


# 1 and 2: train at the largest micro-batch that fits; memory of every compiled size.
chosen = {}
for name, config in RUNS.items():
    too_big = None  # (fixed bytes, temp bytes per sequence) of a size over the limit
    for micro in micro_batches:
        item = f"train {name} micro-batch {micro}"
        if too_big and too_big[0] + too_big[1] * micro > limit:
            report["skipped"].append({"item": item, "reason": "predicted over the device limit"})
            continue
        if not in_budget(item):
            break
        print(f"== {item}", flush=True)
        item_started = time.monotonic()
        try:
            outcome, value = train_attempt(name, config, micro)
        except Exception as err:  # noqa: BLE001  (one failed item must not stop the check)
            failed(item, err)
            break
        finally:
            item_done(item, item_started)
        if outcome == "ran":
            report["train"].append({"run": name, "micro_batch": micro, **value})
            chosen[name] = micro
            save()
            break
        if outcome == "over":
            too_big = value
            estimate = report["memory"][-1]["peak_bytes"]
            report["skipped"].append({"item": item, "reason": f"estimate {estimate / 2**30:.1f} GiB "
                                                              f"> limit {limit / 2**30:.1f} GiB"})
        else:
            report["skipped"].append({"item": item, "reason": "out of memory when run"})
            gc.collect()  # the failed attempt's buffers

def run_item(item: str, rows: list, make_rows) -> None:
    """Extend `rows` with make_rows() unless the budget is spent; a failure is recorded, not raised."""
    if not in_budget(item):
        return
    print(f"== {item}", flush=True)
    item_started = time.monotonic()
    try:
        rows.extend(make_rows())
    except Exception as err:  # noqa: BLE001
        failed(item, err)
    item_done(item, item_started)


# 3: decode.
for path in (path for name, path in DECODE["models"].items() if name in RUNS):
    run_item(f"decode {Path(path).stem}", report["decode"], lambda: bench.bench_decode(
        [path], DECODE["batch_sizes"], DECODE["new_bytes"], DECODE["prompt_bytes"])["rows"])

# 4: components at each model's micro-batch.
for name, micro in chosen.items():
    run_item(f"components {name}", report["components"], lambda: (
        {"run": name, "micro_batch": micro, **row}
        for row in bench.bench_components(RUNS[name], batch_set(name, micro), COMPONENT_STEPS)["rows"]))


def gib(n_bytes):
    return "-" if n_bytes is None else f"{n_bytes / 2**30:.2f}"


def pct(fraction):
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def rate(per_sec):
    return "-" if per_sec is None else f"{per_sec:,.0f}"


lines = [f"# GPU check: {report['device']}", "", f"{'smoke run (CPU, tiny configs); ' if smoke else ''}"
         f"elapsed {time.monotonic() - started:.0f} s; micro-batches tried {micro_batches}", "",
         "## Train step (grad_accum 1)", "",
         "| run | model | micro-batch | seq_len | step ms | bytes/s | tokens/s | MFU | executed util | executed / model "
         "| XLA temp GiB | temp / seq GiB | peak in use GiB | compile s |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
for r in report["train"]:
    lines.append(f"| {r['run']} | {r['model_config']} | {r['micro_batch']} | {r['seq_len']} {r['seq_unit']} "
                 f"| {r['step_s_median'] * 1e3:.1f} | {rate(r['bytes_per_sec'])} | {rate(r['tokens_per_sec'])} "
                 f"| {pct(r['mfu'])} | {pct(r['executed_flops_utilization'])} | {r['executed_over_model_flops']:.2f} "
                 f"| {gib(r['xla_temp_bytes'])} | {gib(r['xla_temp_bytes'] / r['micro_batch'])} "
                 f"| {gib(r['peak_memory_bytes'])} | {r['compile_s']:.0f} |")
lines += ["", "## Memory (compiled, not run)", "",
          "| run | micro-batch | temp GiB | temp / seq GiB | peak estimate GiB | executed / model | compile s |",
          "|---|---|---|---|---|---|---|"]
for r in report["memory"]:
    lines.append(f"| {r['run']} | {r['micro_batch']} | {gib(r['temp_bytes'])} | {gib(r['temp_bytes_per_sequence'])} "
                 f"| {gib(r['peak_bytes'])} | {r['executed_over_model_flops']:.2f} | {r['compile_s']:.0f} |")
lines += ["", "## Decode", "", "| config | dtype | batch | bytes/s | time to first byte ms |", "|---|---|---|---|---|"]
for r in report["decode"]:
    first = f"{r['time_to_first_byte_s'] * 1e3:.1f} ({r['prompt_bytes']} B)" if "time_to_first_byte_s" in r else "-"
    lines.append(f"| {r['config']} | {r['dtype']} | {r['batch']} | {rate(r['bytes_per_sec'])} | {first} |")
lines += ["", "## Components (forward + backward, one call)", "",
          "| run | stage | piece | layers | fwd ms | fwd+bwd ms | x layers ms | shapes |", "|---|---|---|---|---|---|---|---|"]
for r in report["components"]:
    lines.append(f"| {r['run']} | {r['stage']} | {r['piece']} | {r['layers']} | {r['forward_s'] * 1e3:.2f} "
                 f"| {r['forward_backward_s'] * 1e3:.2f} | {r['layers'] * r['forward_backward_s'] * 1e3:.1f} | {r['shapes']} |")
if report["skipped"] or report["failures"]:
    lines += ["", "## Skipped and failed", ""]
    lines += [f"- skipped {s['item']}: {s['reason']}" for s in report["skipped"]]
    lines += [f"- FAILED {f['item']}: {f['error']}" for f in report["failures"]]
save()
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(1 if report["failures"] else 0)
PYEOF
