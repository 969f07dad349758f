#!/usr/bin/env bash
# Headline comparison (issue #8): four compute-matched S-family runs on Project Gutenberg English
#   hnet1  H-Net 1-stage (N = 6)         configs/run_headline_hnet1.json
#   hnet2  H-Net 2-stage (N = 3, 3)      configs/run_headline_hnet2.json
#   bpe    BPE Transformer (vocab 32768, tokenizer trained on pg_en_train by train.py)
#   byte   byte-level Transformer
# Same bytes per step (32 x 8192 bytes; BPE 32 x 2083 tokens ~ 8192 bytes at 3.933 bytes/token),
# same 800 steps (~210 MB, about one pass over pg_en_train), same wsd schedule, lr 1.5e-3.
# Training FLOPs per byte are equal within 5% (python -m hnet.flops --family S).
#
# Time per run: an ESTIMATE, not measured (written on a CPU-only machine). The S models train at
# ~212 M FLOPs/byte; at an assumed 20-30% MFU of an H100's ~989 TFLOP/s bf16 peak that is
# 0.9-1.4 M bytes/s, so 800 steps x 262,144 bytes = 210 MB take ~150-230 s, plus compilation and
# 4 evaluations: at most ~5 minutes each. Measure the first run and adjust train.steps (same for
# all four) if it is off. The BPE run first trains its tokenizer on the train split (not counted).
# The whole script (prepare, 4 runs, evaluations) should take ~30-40 minutes on one H100.
#
#   bash scripts/headline.sh                 # real run (needs a GPU), results in runs/headline
#   SMOKE=1 bash scripts/headline.sh         # tiny models, 2 MB of train, 5 steps: checks the pipeline on CPU
# Environment: OUT (output folder), DATA_DIR (folder with pg_en_*.txt.xz etc., default ../shared/data),
# PYTHON (default python).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
SMOKE=${SMOKE:-0}
DATA_DIR=${DATA_DIR:-../shared/data}
RUNS=(hnet1 hnet2 bpe byte)
START=$SECONDS

if [ "$SMOKE" = 1 ]; then
    OUT=${OUT:-runs/headline_smoke}
    PREPARE_ARGS=(--max-train-bytes 2000000)
    EVAL_ARGS=(--max-bytes 8000 --batch-size 4)
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
else
    OUT=${OUT:-runs/headline}
    PREPARE_ARGS=()
    EVAL_ARGS=()
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

# 3. Train the four runs (an existing run folder is resumed, so the script can be re-run).
for run in "${RUNS[@]}"; do
    dir=$OUT/$run
    run_set=()
    if [ -n "${RUN_SET[$run]:-}" ]; then run_set=(--set "${RUN_SET[$run]}"); fi
    if [ "$SMOKE" = 1 ] && [ "$run" = bpe ]; then
        run_set+=(--set 'data.tokenizer={"vocab_size": 4096}' --set train.seq_len=147)
    fi
    t0=$SECONDS
    if [ -f "$dir/config.json" ]; then
        echo "== training $run: resuming $dir"
        $PY train.py --workdir "$dir" --resume --no-progress
    else
        echo "== training $run"
        $PY train.py --config "configs/run_headline_$run.json" --workdir "$dir" --no-progress \
            --set data.corpus="$CORPUS" "${COMMON_SET[@]}" "${run_set[@]}"
    fi
    echo "== $run trained in $((SECONDS - t0)) s"
done

CHECKPOINTS=()
for run in "${RUNS[@]}"; do CHECKPOINTS+=(--checkpoint "$OUT/$run"); done

# 4. pg_en test (the reported number) and validation (model selection), all four on the same bytes.
for split in test validation; do
    echo "== evaluating on pg_en $split"
    $PY eval.py "${CHECKPOINTS[@]}" --data "$CORPUS" --split "$split" "${EVAL_ARGS[@]}" --json > "$EVAL/pg_en_$split.json"
done

# 5. Out-of-domain sets.
for file in "$OOD"/*.txt; do
    name=$(basename "$file" .txt)
    echo "== evaluating on $name"
    $PY eval.py "${CHECKPOINTS[@]}" --data "$file" --doc-separator '\x00' "${EVAL_ARGS[@]}" --json > "$EVAL/$name.json"
done

# 6. Robustness to noisy text (pg_en test), chunk boundaries on a fixed excerpt, training comparison.
echo "== robustness"
$PY eval.py --robustness "${CHECKPOINTS[@]}" --data "$CORPUS" --split test "${ROBUST_ARGS[@]}" > "$OUT/robustness.md"
$PY - "$CORPUS" "$OUT/excerpt.txt" <<'PYEOF'
import sys
from hnet.data import PreparedCorpus
from hnet.evaluate import corpus_documents
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

# 7. One table of bits per byte: rows = data sets, columns = runs.
$PY - "$EVAL" "${RUNS[@]}" > "$OUT/results.md" <<'PYEOF'
import json, sys
from pathlib import Path
folder, runs = Path(sys.argv[1]), sys.argv[2:]
print("| data | bytes | " + " | ".join(runs) + " | xz -9e |")
print("|---|---:|" + "---:|" * (len(runs) + 1))
for path in sorted(folder.glob("*.json"), key=lambda p: (not p.stem.startswith("pg_en"), p.stem)):
    result = json.loads(path.read_text())
    bpb = {Path(m["checkpoint"]).name: m["bpb"] for m in result["models"]}
    xz = result.get("compressors", {}).get("xz -9e")
    print(f"| {path.stem} | {result['bytes']:,d} | " + " | ".join(f"{bpb[r]:.4f}" for r in runs)
          + f" | {'-' if xz is None else f'{xz:.4f}'} |")
PYEOF
cat "$OUT/results.md"
echo
echo "== done in $((SECONDS - START)) s. Results in $OUT:"
echo "   results.md (bpb table), eval/*.json (full eval output), robustness.md, boundaries.html,"
echo "   boundaries.txt, compare/ (compare.md, compare.png), and the run folders ${RUNS[*]}"
