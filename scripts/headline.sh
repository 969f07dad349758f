#!/usr/bin/env bash
# Headline comparison: H-Net 1-stage and 2-stage against BPE and byte Transformers on Project
# Gutenberg English, at matched training FLOPs per byte, same bytes seen, same bytes per sequence
# and the same schedule shape. Two scales:
#
# SCALE=S (default, issue #8; needs a GPU): the S family, configs/run_headline_{hnet1,hnet2,bpe,byte}.json
#   32 x 8192 bytes per step (BPE 32 x 2083 tokens at 3.933 bytes/token), 800 steps (~210 MB),
#   wsd, lr 1.5e-3. Time per run is an ESTIMATE (written on a CPU-only machine): ~212 M FLOPs/byte
#   at 20-30% MFU of an H100 is 0.9-1.4 M bytes/s, so ~5 minutes a run and ~30-40 minutes in all.
#
# SCALE=cpu (issue #19; two CPU cores): the "cpu" family of configs/families.json, run configs
#   configs/run_cpu_{hnet1,hnet2,bpe,byte}.json: the tiny models, 512-byte sequences (BPE 155
#   tokens at 3.302 bytes/token, vocabulary 4096 trained here on the 20 MB training split),
#   8 sequences per step, 600 steps = 2,457,600 bytes each, wsd; H-Nets with per-stage LR
#   multipliers. Also a second seed of hnet1 and bpe (seed-to-seed spread). Evaluation bytes are
#   capped (below) so that the whole script fits in 100 minutes (75 measured on two cores); docs/RESULTS.md has the results.
#   TUNE=1 runs the learning-rate sweep instead: each model at LRS (default "1e-3 2e-3 4e-3") for
#   120 steps (a fifth of the run, same schedule shape), scored on 32 batches of pg_en validation;
#   it writes $OUT/tune/tune.md (all sweep runs so far). TUNE_RUNS="bpe byte" LRS=3e-3 adds points.
#
#   bash scripts/headline.sh                 # S scale (GPU), results in runs/headline
#   SCALE=cpu bash scripts/headline.sh       # CPU scale, results in runs/headline_cpu
#   SMOKE=1 bash scripts/headline.sh         # tiny models, 2 MB of train, 5 steps: checks the pipeline on CPU
# Every stage resumes: a prepared corpus, a trained tokenizer, a run folder (train.py --resume) are reused.
# Environment: OUT (output folder), DATA_DIR (folder with pg_en_*.txt.xz etc., default ../shared/data),
# PYTHON (default python).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
SMOKE=${SMOKE:-0}
SCALE=${SCALE:-S}
TUNE=${TUNE:-0}
DATA_DIR=${DATA_DIR:-../shared/data}
RUNS=(hnet1 hnet2 bpe byte)      # the four models; EXTRA_RUNS adds second seeds
EXTRA_RUNS=()
CONFIG_PREFIX=run_headline
TOKENIZER_VOCAB=0                # > 0: train the BPE tokenizer first with python -m hnet.io.tokenizer
START=$SECONDS

if [ "$SMOKE" = 1 ]; then
    OUT=${OUT:-runs/headline_smoke}
    PREPARE_ARGS=(--max-train-bytes 2000000)
    EVAL_ARGS=(--max-bytes 8000 --batch-size 4)
    TEST_ARGS=("${EVAL_ARGS[@]}")
    OOD_ARGS=("${EVAL_ARGS[@]}")
    ROBUST_ARGS=(--max-bytes 2000 --rates 0.05 --kinds drop,swap --batch-size 4)
    COMMON_SET=(--set train.steps=5 --set train.batch_size=4 --set train.grad_accum=1 --set train.seq_len=512
                --set train.eval_every=5 --set train.eval_batches=1 --set train.checkpoint_every=5
                --set train.log_every=1)
    declare -A RUN_SET=(
        [hnet1]='model={"config": "hnet_1stage_tiny.json", "dtype": "float32"}'
        [hnet2]='model={"config": "hnet_2stage_tiny.json", "dtype": "float32"}'
        [bpe]='model={"config": "transformer_bpe_tiny.json", "dtype": "float32"}'
        [byte]='model={"config": "transformer_byte_tiny.json", "dtype": "float32"}'
    )
elif [ "$SCALE" = cpu ]; then
    OUT=${OUT:-runs/headline_cpu}
    CONFIG_PREFIX=run_cpu
    TOKENIZER_VOCAB=4096
    EXTRA_RUNS=(hnet1_seed1 bpe_seed1)
    PREPARE_ARGS=(--max-train-bytes 20000000)
    # pg_en: the first 1,000,000 bytes of test and 500,000 of validation (in book order), scored
    # by every run; out-of-domain files: their first 250,000 bytes, the four models only.
    TEST_ARGS=(--max-bytes 1000000 --batch-size 16)
    EVAL_ARGS=(--max-bytes 500000 --batch-size 16)
    OOD_ARGS=(--max-bytes 250000 --batch-size 16)
    ROBUST_ARGS=(--max-bytes 100000 --batch-size 16)
    COMMON_SET=()
    declare -A RUN_SET=()
else
    OUT=${OUT:-runs/headline}
    PREPARE_ARGS=()
    EVAL_ARGS=()
    TEST_ARGS=()
    OOD_ARGS=()
    ROBUST_ARGS=()
    COMMON_SET=()
    declare -A RUN_SET=()
fi
CORPUS=$OUT/pg_en
OOD=$OUT/ood
EVAL=$OUT/eval
mkdir -p "$OUT" "$OOD" "$EVAL"
echo "== headline comparison into $OUT (SMOKE=$SMOKE)"

# 1. Prepare pg_en exactly as a user would (one document per book, sha256-checked).
if [ -f "$CORPUS/meta.json" ]; then
    echo "== $CORPUS already prepared"
else
    $PY -m data.prepare pg_en --data-dir "$DATA_DIR" --out "$CORPUS" "${PREPARE_ARGS[@]}"
fi

# 2. Out-of-domain evaluation texts, as plain files for eval.py --data FILE. Documents inside a
#    file are separated by a NUL byte (checked absent from the texts) and scored from BOS each.
#    enwiki: the test split of SOURCES.md, bytes [N - 5,000,000, N), one document.
#    code_<lang>: one document per source file.  zh_four_classics: one document.
#    udhr: one document per language (bpb over all 387 languages' bytes together).
$PY - "$DATA_DIR" "$OOD" <<'PYEOF'
import json, lzma, sys
from pathlib import Path

data_dir, ood = Path(sys.argv[1]), Path(sys.argv[2])
def need(name):
    path = data_dir / name
    if not path.is_file():
        sys.exit(f"error: {path} does not exist")
    return path
def write(name, docs):
    if any(b"\0" in d for d in docs):
        sys.exit(f"error: {name}: a document contains a NUL byte, the separator")
    (ood / name).write_bytes(b"\0".join(docs))
if not (ood / "enwiki_test.txt").exists():
    with lzma.open(need("enwiki_extract.txt.xz")) as f:
        f.seek(57_113_290 - 5_000_000)
        write("enwiki_test.txt", [f.read()])
if not (ood / "zh_four_classics.txt").exists():
    with lzma.open(need("zh_four_classics.txt.xz")) as f:
        write("zh_four_classics.txt", [f.read()])
if not (ood / "udhr_multilingual.txt").exists():
    with lzma.open(need("udhr_multilingual.jsonl.xz"), "rt", encoding="utf-8") as f:
        write("udhr_multilingual.txt", [json.loads(line)["text"].encode() for line in f if line.strip()])
if not (ood / "code_python.txt").exists():
    code = {}
    with lzma.open(need("code_multilang.jsonl.xz"), "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                code.setdefault(row["lang"], []).append(row["text"].encode())
    for lang, docs in sorted(code.items()):
        write(f"code_{lang}.txt", docs)
print("out-of-domain files:", ", ".join(sorted(p.name for p in ood.glob("*.txt"))))
PYEOF

# 3. The BPE tokenizer (CPU scale: trained once here with the same recipe a run uses for
#    data.tokenizer = {"vocab_size": V}, so that its bytes per token, which sets the
#    BPE run's seq_len, is the one in configs/families.json), then the runs. An existing run folder
#    is resumed, so the script can be re-run.
TOKENIZER_SET=()
if [ "$TOKENIZER_VOCAB" -gt 0 ]; then
    if [ -f "$OUT/tokenizer.json" ]; then
        echo "== $OUT/tokenizer.json already trained"
    else
        $PY -m hnet.io.tokenizer --corpus "$CORPUS" --vocab-size "$TOKENIZER_VOCAB" --out "$OUT/tokenizer.json"
    fi
    TOKENIZER_SET=(--set data.tokenizer="$OUT/tokenizer.json")
fi

# train DIR BASE_RUN [--set ...]: one run of configs/${CONFIG_PREFIX}_BASE_RUN.json into DIR (resumed if there).
train() {
    local dir=$1 base=$2
    shift 2
    local run_set=()
    if [ -n "${RUN_SET[$base]:-}" ]; then run_set=(--set "${RUN_SET[$base]}"); fi
    if [ "$base" = bpe ]; then
        run_set+=("${TOKENIZER_SET[@]}")
        if [ "$SMOKE" = 1 ]; then run_set+=(--set 'data.tokenizer={"vocab_size": 4096}' --set train.seq_len=147); fi
    fi
    local t0=$SECONDS rows_before=0
    if [ -f "$dir/metrics.jsonl" ]; then rows_before=$(wc -l < "$dir/metrics.jsonl"); fi
    if [ -f "$dir/config.json" ]; then
        echo "== training $dir: resuming"
        $PY train.py --workdir "$dir" --resume --no-progress
    else
        echo "== training $dir"
        $PY train.py --config "configs/${CONFIG_PREFIX}_$base.json" --workdir "$dir" --no-progress \
            --set data.corpus="$CORPUS" "${COMMON_SET[@]}" "${run_set[@]}" "$@"
    fi
    echo "== $dir trained in $((SECONDS - t0)) s"
    # Wall time of the invocations that trained (a finished run's resume logs nothing new).
    if [ "$(wc -l < "$dir/metrics.jsonl")" -gt "$rows_before" ]; then
        printf '%s\t%s\n' "$(basename "$dir")" "$((SECONDS - t0))" >> "$(dirname "$dir")/wall_seconds.tsv"
    fi
}

if [ "$TUNE" = 1 ]; then
    # Learning-rate sweep: short runs (a fifth of the steps, same schedule shape), final
    # validation bpb on 32 batches. The chosen lr goes into configs/${CONFIG_PREFIX}_RUN.json by hand.
    LRS=(${LRS:-1e-3 2e-3 4e-3})
    TUNE_STEPS=${TUNE_STEPS:-120}
    TUNE_RUNS=(${TUNE_RUNS:-${RUNS[*]}})
    mkdir -p "$OUT/tune"
    for run in "${TUNE_RUNS[@]}"; do
        for lr in "${LRS[@]}"; do
            train "$OUT/tune/${run}_lr$lr" "$run" --set train.lr="$lr" --set train.steps="$TUNE_STEPS" \
                --set train.eval_every="$TUNE_STEPS" --set train.eval_batches=32 --set train.checkpoint_every="$TUNE_STEPS"
        done
    done
    $PY - "$OUT/tune" > "$OUT/tune/tune.md" <<'PYEOF'
import json, sys
from pathlib import Path
rows = {}
for run_dir in sorted(Path(sys.argv[1]).glob("*_lr*")):
    run, lr = run_dir.name.rsplit("_lr", 1)
    evals = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval_bpb"' in l]
    rows.setdefault(run, {})[float(lr)] = evals[-1]["eval_bpb"] if evals else None
lrs = sorted({lr for r in rows.values() for lr in r})
print("| run | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best |")
print("|---|" + "---:|" * (len(lrs) + 1))
for run, r in rows.items():
    best = min((v, lr) for lr, v in r.items() if v is not None)[1]
    print(f"| {run} | " + " | ".join("-" if r.get(lr) is None else f"{r[lr]:.4f}" for lr in lrs) + f" | {best:g} |")
PYEOF
    cat "$OUT/tune/tune.md"
    echo "== sweep done in $((SECONDS - START)) s"
    exit 0
fi

for run in "${RUNS[@]}"; do train "$OUT/$run" "$run"; done
for run in "${EXTRA_RUNS[@]}"; do
    train "$OUT/$run" "${run%_seed*}" --set train.seed="${run##*_seed}"
done

CHECKPOINTS=()
for run in "${RUNS[@]}"; do CHECKPOINTS+=(--checkpoint "$OUT/$run"); done
ALL_CHECKPOINTS=("${CHECKPOINTS[@]}")
for run in "${EXTRA_RUNS[@]}"; do ALL_CHECKPOINTS+=(--checkpoint "$OUT/$run"); done

# 4. pg_en test (the reported number) and validation (model selection), every run on the same bytes.
#    An evaluation already written is kept (delete its JSON to redo it).
evaluate() {
    local out=$1
    shift
    if [ -s "$out" ]; then echo "== $out already written"; return; fi
    $PY eval.py "$@" --json > "$out.tmp"
    mv "$out.tmp" "$out"
}
echo "== evaluating on pg_en test and validation"
evaluate "$EVAL/pg_en_test.json" "${ALL_CHECKPOINTS[@]}" --data "$CORPUS" --split test "${TEST_ARGS[@]}"
evaluate "$EVAL/pg_en_validation.json" "${ALL_CHECKPOINTS[@]}" --data "$CORPUS" --split validation "${EVAL_ARGS[@]}"
# The H-Nets' chunking on training text: the bytes per chunk that configs/families.json counts FLOPs at.
HNET_CHECKPOINTS=(--checkpoint "$OUT/hnet1" --checkpoint "$OUT/hnet2")
evaluate "$EVAL/chunks_pg_en_train.json" "${HNET_CHECKPOINTS[@]}" --data "$CORPUS" --split train "${EVAL_ARGS[@]}" --no-compressors

# 5. Out-of-domain sets.
for file in "$OOD"/*.txt; do
    name=$(basename "$file" .txt)
    echo "== evaluating on $name"
    evaluate "$EVAL/$name.json" "${CHECKPOINTS[@]}" --data "$file" --doc-separator '\x00' "${OOD_ARGS[@]}"
done

# 6. Robustness to noisy text (pg_en test), chunk boundaries on a fixed excerpt, training comparison.
echo "== robustness"
if [ -s "$OUT/robustness.md" ]; then
    echo "== $OUT/robustness.md already written"
else
    $PY eval.py --robustness "${CHECKPOINTS[@]}" --data "$CORPUS" --split test "${ROBUST_ARGS[@]}" > "$OUT/robustness.md.tmp"
    mv "$OUT/robustness.md.tmp" "$OUT/robustness.md"
fi
$PY - "$CORPUS" "$OUT/excerpt.txt" <<'PYEOF'
import sys
from hnet.io.data import PreparedCorpus
from hnet.evaluation.evaluate import corpus_documents
docs = corpus_documents(PreparedCorpus(sys.argv[1]), "test", 20_000).docs
text = docs[0][4_000:5_500]           # a fixed 1,500-byte stretch of the first test book
text = text[text.index(b"\n") + 1 : text.rindex(b"\n")]   # whole lines only
open(sys.argv[2], "wb").write(text)
PYEOF
echo "== chunk boundaries"
$PY eval.py --show-boundaries --checkpoint "$OUT/hnet1" --checkpoint "$OUT/hnet2" --text-file "$OUT/excerpt.txt" \
    --html "$OUT/boundaries.html" --no-color > "$OUT/boundaries.txt"
echo "== compare"
mkdir -p "$OUT/compare"
$PY eval.py --compare "${RUNS[@]/#/$OUT/}" --out "$OUT/compare" > "$OUT/compare/compare.txt" 2>&1 || {
    cat "$OUT/compare/compare.txt" >&2; exit 1; }

# 7. The results tables (results.md): pg_en per run, all data sets per model, chunking per stage.
$PY - "$OUT" "${RUNS[@]}" -- "${EXTRA_RUNS[@]}" > "$OUT/results.md" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
from hnet.evaluation.report import summarize_run
out = Path(sys.argv[1]); split = sys.argv.index("--")
runs, extra = sys.argv[2:split], sys.argv[split + 1:]
evals = {p.stem: json.loads(p.read_text()) for p in sorted((out / "eval").glob("*.json"))}
train_chunks = evals.pop("chunks_pg_en_train", None)
def bpb(data):
    return {Path(m["checkpoint"]).name: m for m in evals[data]["models"]}
wall = {}
if (out / "wall_seconds.tsv").exists():
    for line in (out / "wall_seconds.tsv").read_text().splitlines():
        name, seconds = line.split("\t")
        wall[name] = wall.get(name, 0) + int(seconds)
test, valid = bpb("pg_en_test"), bpb("pg_en_validation")
print(f"## pg_en (test: first {evals['pg_en_test']['bytes']:,d} bytes, validation: first {evals['pg_en_validation']['bytes']:,d})\n")
print("| run | test bpb | validation bpb | bytes seen | train FLOPs/byte (measured chunking) | parameters | step time total | wall time (train.py) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for run in runs + extra:
    summary = summarize_run(out / run)
    rows = [json.loads(l) for l in (out / run / "metrics.jsonl").read_text().splitlines()]
    step_seconds = sum(r["step_time_s"] for r in rows if "step_time_s" in r)
    fpb = "-" if summary.flops_per_byte is None else f"{summary.flops_per_byte / 1e6:.2f} M"
    print(f"| {run} | {test[run]['bpb']:.4f} | {valid[run]['bpb']:.4f} | {summary.bytes_seen:,d} | {fpb} | "
          f"{summary.params:,d} | {step_seconds:.0f} s | {wall.get(run, '-')} s |")
for base in runs:
    seeds = [r for r in [base] + extra if r == base or r.startswith(base + "_seed")]
    if len(seeds) > 1:
        values = [test[r]["bpb"] for r in seeds]
        print(f"\n{base}: test bpb over seeds {', '.join(seeds)}: mean {statistics.mean(values):.4f}, "
              f"spread (max - min) {max(values) - min(values):.4f}")
print("\n## Bits per byte on every data set (the four models; compressors: each document alone / concatenated)\n")
print("| data | bytes | documents | " + " | ".join(runs) + " | xz -9e per doc | xz -9e concat | gzip -9 per doc |")
print("|---|---:|---:|" + "---:|" * (len(runs) + 3))
for name, result in sorted(evals.items(), key=lambda kv: (not kv[0].startswith("pg_en"), kv[0])):
    models = bpb(name)
    comp, concat = result.get("compressors", {}), result.get("compressors_concatenated", {})
    fmt = lambda v: "-" if v is None else f"{v:.4f}"
    print(f"| {name} | {result['bytes']:,d} | {models[runs[0]]['documents']:,d} | " + " | ".join(fmt(models[r]['bpb']) for r in runs)
          + f" | {fmt(comp.get('xz -9e'))} | {fmt(concat.get('xz -9e'))} | {fmt(comp.get('gzip -9'))} |")
print("\n## Chunking per stage: pg_en test (and the training split's first bytes)\n")
print("| run | stage | bytes per chunk | on train | boundaries after whitespace/punctuation | at one (chunk begins with it) | dropped |")
print("|---|---:|---:|---:|---:|---:|---:|")
on_train = {} if train_chunks is None else {Path(m["checkpoint"]).name: m for m in train_chunks["models"]}
for run in runs:
    for s, stage in enumerate(test[run]["stages"]):
        train_value = on_train[run]["stages"][s]["bytes_per_chunk"] if run in on_train else float("nan")
        at = stage.get("share_on_separator")
        print(f"| {run} | {s} | {stage['bytes_per_chunk']:.2f} | {train_value:.2f} | "
              f"{stage['share_after_separator']:.1%} | {'-' if at is None else f'{at:.1%}'} | {stage['dropped_rate']:.2%} |")
PYEOF
cat "$OUT/results.md"
echo
echo "== done in $((SECONDS - START)) s. Results in $OUT:"
echo "   results.md (bpb table), eval/*.json (full eval output), robustness.md, boundaries.html,"
echo "   boundaries.txt, compare/ (compare.md, compare.png), and the run folders ${RUNS[*]}"
