"""Evaluate H-Net, byte Transformer and BPE Transformer checkpoints on the same bytes.

    python eval.py --checkpoint RUN_DIR                       # bpb on the run's validation split
    python eval.py --checkpoint RUN_DIR --data prepared/web --split test --json
    python eval.py --checkpoint RUN_DIR --data notes.txt --max-bytes 100000
    python eval.py --checkpoint RUN_A --checkpoint RUN_B --show-boundaries --text "Hello, world" --html b.html
    python eval.py --checkpoint RUN_A --checkpoint RUN_B --robustness --rates 0.01,0.05,0.1
    python eval.py --compare RUN_A RUN_B --out reports/ab
    python eval.py --checkpoint RUN_DIR --tasks lambada_openai,hellaswag,piqa --limit 500 --results r.json

A checkpoint is a training run folder (its newest usable checkpoint, or --step; a damaged or
incomplete one is skipped with a warning, see hnet/io/checkpoint.py) or an export folder.
Data: the run's own evaluation corpus and split by default; --data takes a prepared corpus folder
or a plain text file (one document, or split with --doc-separator). Every document is scored
from a BOS; long documents with sliding windows (see hnet/evaluation/evaluate.py). Bad input prints one
line starting with "error:" and exits 2.
"""

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="DIR",
        help="run or export folder, or hf://OWNER/NAME for a published checkpoint (repeatable: several models "
        "side by side)",
    )
    parser.add_argument(
        "--step", type=int, help="checkpoint step of a run (default: the newest; one --checkpoint only)"
    )
    what = parser.add_argument_group("data")
    what.add_argument("--data", help="prepared corpus folder or text file (default: the run's eval corpus)")
    what.add_argument("--split", help="split of a prepared corpus (default: the run's eval split, or validation)")
    what.add_argument(
        "--doc-separator", help="split a --data text file into documents on this string (escapes like \\n allowed)"
    )
    what.add_argument(
        "--max-bytes",
        type=int,
        help="score only the first N bytes of the documents (in order); --robustness defaults to 65536, 0 = all",
    )
    scoring = parser.add_argument_group("scoring")
    scoring.add_argument(
        "--window", type=int, help="positions per model pass (default: the run's train.seq_len; 1024 for exports)"
    )
    scoring.add_argument(
        "--stride", type=int, help="new positions scored per window of a long document (default: window // 2)"
    )
    scoring.add_argument("--batch-size", type=int, default=8, help="windows per model call (default 8)")
    scoring.add_argument(
        "--capacity-slack",
        type=_capacity_slack,
        metavar="SLACK",
        help="override the H-Net's chunk capacity slack (a number >= 1, or 'exact': nothing dropped); "
        "default: the model's own, as trained",
    )
    scoring.add_argument("--no-compressors", action="store_true", help="skip the gzip/bzip2/xz/zstd reference lines")
    modes = parser.add_argument_group("modes (default: evaluate)")
    modes.add_argument(
        "--show-boundaries", action="store_true", help="print text with each stage's chunk boundaries marked"
    )
    modes.add_argument("--text", help="--show-boundaries: the text (default: the start of the first document)")
    modes.add_argument("--text-file", help="--show-boundaries: read the text from this file")
    modes.add_argument("--html", metavar="FILE", help="--show-boundaries: also write a self-contained HTML page here")
    modes.add_argument("--no-color", action="store_true", help="--show-boundaries: '|' markers instead of colours")
    modes.add_argument(
        "--robustness",
        action="store_true",
        help="bpb on perturbed text (hnet/evaluation/perturb.py) for each checkpoint",
    )
    modes.add_argument("--kinds", help="--robustness: comma-separated perturbation kinds (default: all)")
    modes.add_argument(
        "--rates", default="0.01,0.05,0.1", help="--robustness: comma-separated rates (default %(default)s)"
    )
    modes.add_argument("--seed", type=int, default=0, help="--robustness: perturbation seed (document i uses seed + i)")
    modes.add_argument(
        "--tasks",
        help="zero-shot downstream tasks, comma-separated (hnet/evaluation/tasks.py): lambada_openai, hellaswag, "
        "piqa, arc_easy, arc_challenge, winogrande, openbookqa",
    )
    modes.add_argument("--limit", type=int, help="--tasks: score only the first N examples of each task")
    modes.add_argument(
        "--task-data",
        metavar="DIR",
        help="--tasks: read DIR/<task>/<split>.jsonl (or .json, .parquet, .csv) instead of the Hub datasets",
    )
    modes.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="compare training runs from their metrics.jsonl")
    modes.add_argument("--out", help="--compare: folder for compare.md and compare.png (default: the current folder)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--results", metavar="FILE", help="also write that JSON object to FILE")
    return parser.parse_args(argv)


class UsageError(ValueError):
    """A bad combination of options (one-line message)."""


def _capacity_slack(text: str):
    """--capacity-slack: 'exact' or a number."""
    if text == "exact":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 1 or 'exact', got {text!r}") from None


def check_args(args) -> None:
    modes = [name for name in ("show_boundaries", "robustness", "compare", "tasks") if getattr(args, name)]
    if len(modes) > 1:
        raise UsageError("choose one of --show-boundaries, --robustness, --compare, --tasks")
    if args.tasks:
        from hnet.evaluation.tasks import parse_tasks

        parse_tasks(args.tasks)
    if (args.limit is not None or args.task_data) and not args.tasks:
        raise UsageError("--limit and --task-data go with --tasks")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be positive, got {args.limit}")
    if args.compare:
        if args.checkpoint:
            raise UsageError("--compare takes run folders itself; drop --checkpoint")
        return
    if not args.checkpoint:
        raise UsageError("give --checkpoint DIR (a run or export folder), or --compare RUN_DIR ...")
    if args.step is not None and len(args.checkpoint) > 1:
        raise UsageError("--step needs a single --checkpoint")
    if args.text is not None and args.text_file:
        raise UsageError("give --text or --text-file, not both")
    if args.doc_separator and not args.data:
        raise UsageError("--doc-separator goes with --data FILE")
    if (args.text is not None or args.text_file or args.html) and not args.show_boundaries:
        raise UsageError("--text, --text-file and --html go with --show-boundaries")
    for name in ("window", "stride", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.max_bytes is not None and args.max_bytes < 0:
        raise UsageError(f"--max-bytes must be >= 0, got {args.max_bytes}")


# --------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------


class Checkpoint:
    """A loaded model with its run config (None for an export) and tokenizer (None for bytes)."""

    def __init__(self, path: str, step=None):
        from hnet.inference.hub import load_model
        from hnet.io.run_dir import RunDir

        self.loaded = load_model(path, step)
        self.path = self.loaded.path  # a hf:// checkpoint's converted folder
        self.name = path.rstrip("/").split("/")[-1] if path.startswith("hf://") else self.path.resolve().name
        self.run = json.loads(RunDir(self.path).config.read_text()) if self.loaded.kind == "run" else None
        self.tokenizer = self.loaded.tokenizer

    @property
    def config(self):
        return self.loaded.config

    def window(self, args) -> int:
        if args.window:
            return args.window
        seq_len = (self.run or {}).get("train", {}).get("seq_len")
        return int(seq_len) if seq_len else 1024

    def scorer(self, args):
        from hnet.evaluation.evaluate import Scorer

        return Scorer(
            self.loaded.model,
            window=self.window(args),
            stride=args.stride,
            batch_size=args.batch_size,
            tokenizer=self.tokenizer,
            capacity_slack=args.capacity_slack,
        )

    def describe(self) -> str:
        import jax
        from flax import nnx

        config = self.config
        params = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(self.loaded.model, nnx.Param)))
        if config.depth:
            kind = (
                f"H-Net, {config.depth} chunking stage{'s' if config.depth > 1 else ''} ({', '.join(config.routing)})"
            )
        else:
            kind = f"BPE Transformer ({config.vocab_size} tokens)" if self.tokenizer else "byte Transformer"
        return f"{self.path} ({self.loaded.kind}, step {self.loaded.step}): {kind}, {params:,d} parameters"


def load_documents(args, checkpoints, max_bytes):
    """The documents to score: --data, else the first run's eval corpus and split."""
    from hnet.evaluation.evaluate import corpus_documents, text_file_documents
    from hnet.io.data import PreparedCorpus, ensure_default_corpus

    if args.data:
        path = Path(args.data)
        if path.is_dir():
            return corpus_documents(PreparedCorpus(path), args.split or "validation", max_bytes)
        if args.split:
            raise UsageError("--split applies to a prepared corpus folder, not a text file")
        separator = None
        if args.doc_separator:
            from data.text.prepare import parse_separator

            separator = parse_separator(args.doc_separator)
        return text_file_documents(path, separator, max_bytes)
    run = next((c.run for c in checkpoints if c.run), None)
    if run is None:
        raise UsageError("export folders carry no data settings: give --data")
    data = run.get("data", {})
    corpus_name = data.get("corpus", "default")
    corpus = ensure_default_corpus(verbose=False) if corpus_name == "default" else PreparedCorpus(corpus_name)
    return corpus_documents(corpus, args.split or data.get("eval_split", "validation"), max_bytes)


# --------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------


def _progress(total: int, enabled: bool, unit: str = "B", desc: str | None = None):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=True, desc=desc, disable=not enabled, leave=False, file=sys.stderr)


def run_evaluate(args, checkpoints) -> dict:
    from hnet.evaluation.boundaries import format_histogram, format_separator_shares

    documents = load_documents(args, checkpoints, args.max_bytes or None)
    if not documents.docs:
        raise UsageError(f"no bytes to score in {documents.description}")
    out = {"data": documents.description, "bytes": documents.num_bytes, "documents": len(documents.docs), "models": []}
    show = not args.json
    if show:
        print(
            f"data: {documents.description}; scoring {documents.num_bytes:,d} bytes in {len(documents.docs):,d} documents"
        )
    for checkpoint in checkpoints:
        scorer = checkpoint.scorer(args)
        bar = _progress(documents.num_bytes, show and sys.stderr.isatty())
        result = scorer.evaluate(documents, progress=bar.update)
        bar.close()
        entry = {
            "checkpoint": str(checkpoint.path),
            "kind": checkpoint.loaded.kind,
            "step": checkpoint.loaded.step,
            "description": checkpoint.describe(),
            **result.to_dict(),
        }
        out["models"].append(entry)
        if show:
            print(f"\n{entry['description']}")
            slack = ""
            if result.capacity_slack is not None:
                slack = f", capacity slack {result.capacity_slack}"
                if result.capacity_slack != result.trained_capacity_slack:
                    slack += f" (overridden: trained with {result.trained_capacity_slack})"
            unit = "tokens" if checkpoint.tokenizer else "bytes"
            print(f"  window {result.window} {unit}, stride {result.stride}{slack}")
            print(f"  bits per byte     {result.bpb:.4f}")
            print(f"  perplexity/byte   {result.perplexity:.3f}")
            print(f"  nats per byte     {result.nats_per_byte:.4f}")
            if checkpoint.tokenizer:
                print(f"  bytes per token   {result.bytes / max(result.positions, 1):.3f}")
            for s, stats in enumerate(result.stages):
                print(
                    f"  stage {s}: {stats.bytes_per_chunk:.2f} bytes/chunk, dropped boundaries {stats.dropped_rate:.2%}, "
                    f"{format_separator_shares(stats)}"
                )
                print(f"           chunk lengths (bytes): {format_histogram(stats.histogram)}")
            print(
                f"  {result.seconds:.1f} s incl. compilation ({result.bytes / max(result.seconds, 1e-9):,.0f} bytes/s)"
            )
    if not args.no_compressors:
        from hnet.evaluation.compress import compressor_bpb, compressor_bpb_per_document

        # The models score each document from its own BOS, so the comparable compressor line
        # compresses each document alone; the concatenation (documents back to back) is beside it.
        out["compressors"] = compressor_bpb_per_document(documents.docs)
        out["compressors_concatenated"] = compressor_bpb(b"".join(documents.docs))
        if show:
            for label, key in (
                ("each of the %d documents alone" % len(documents.docs), "compressors"),
                ("the documents concatenated", "compressors_concatenated"),
            ):
                print(
                    f"\ncompressors on the same {documents.num_bytes:,d} bytes, {label} (bits per byte): "
                    + ", ".join(
                        f"{name} {'unavailable' if bpb is None else f'{bpb:.4f}'}" for name, bpb in out[key].items()
                    )
                )
    if show and len(checkpoints) > 1:
        depth = max(len(m["stages"]) for m in out["models"])
        print("\n| " + " | ".join(["checkpoint", "bpb"] + [f"stage {s} bytes/chunk" for s in range(depth)]) + " |")
        print("|---|---:|" + "---:|" * depth)
        for m in out["models"]:
            chunks = [f"{st['bytes_per_chunk']:.2f}" for st in m["stages"]] + ["-"] * (depth - len(m["stages"]))
            print("| " + " | ".join([m["checkpoint"], f"{m['bpb']:.4f}"] + chunks) + " |")
    return out


def run_show_boundaries(args, checkpoints) -> dict:
    from hnet.evaluation.boundaries import (
        ShownModel,
        format_histogram,
        format_separator_shares,
        render_html,
        render_terminal,
    )
    from hnet.evaluation.evaluate import take_prefix

    if args.text is not None:
        text = args.text.encode("utf-8")
    elif args.text_file:
        try:
            text = Path(args.text_file).read_bytes()
        except OSError as err:
            raise UsageError(f"--text-file: cannot read {args.text_file} ({err.strerror})") from None
    else:
        documents = load_documents(args, checkpoints, None)
        text = take_prefix(documents.docs[:1], 1000)[0] if documents.docs else b""
    if not text:
        raise UsageError("no text to show")
    colour = sys.stdout.isatty() and not args.no_color and not args.json
    shown, out = [], {"text": text.decode("utf-8", errors="backslashreplace"), "bytes": len(text), "models": []}
    for checkpoint in checkpoints:
        positions, stats = checkpoint.scorer(args).boundary_positions(text)
        labels = (
            ["tokens"]
            if checkpoint.tokenizer
            else [f"stage {s} ({r})" for s, r in enumerate(checkpoint.config.routing or ())]
        )
        shown.append(ShownModel(checkpoint.name, checkpoint.describe(), positions, stats, labels))
        out["models"].append(
            {
                "checkpoint": str(checkpoint.path),
                "description": checkpoint.describe(),
                "stages": [
                    {"label": label, "chunk_starts": [int(p) for p in pos], **st.to_dict()}
                    for label, pos, st in zip(labels, positions, stats)
                ],
            }
        )
        if args.json:
            continue
        print(f"== {checkpoint.describe()}")
        if not positions:
            print("   (no chunking stages)\n")
        for label, pos, st in zip(labels, positions, stats):
            print(
                f"-- {label}: {st.chunks} chunks, {st.bytes_per_chunk:.2f} bytes/chunk, {format_separator_shares(st)}"
            )
            print(f"   chunk lengths (bytes): {format_histogram(st.histogram)}")
            print(render_terminal(text, pos, colour))
            print()
    if args.html:
        path = Path(args.html)
        try:
            path.write_text(render_html(text, shown), encoding="utf-8")
        except OSError as err:
            raise UsageError(f"--html: cannot write {path} ({err.strerror})") from None
        out["html"] = str(path)
        if not args.json:
            print(f"wrote {path}")
    return out


def run_robustness(args, checkpoints) -> dict:
    from hnet.evaluation.perturb import PERTURBATIONS
    from hnet.evaluation.report import robustness, robustness_table

    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        raise UsageError(f"--rates: expected comma-separated numbers, got {args.rates!r}") from None
    if not rates or any(not 0 < r <= 1 for r in rates):
        raise UsageError(f"--rates: each rate must be in (0, 1], got {args.rates!r}")
    kinds = list(PERTURBATIONS) if not args.kinds else [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in PERTURBATIONS]
    if unknown or not kinds:
        raise UsageError(f"--kinds: unknown {', '.join(unknown) or '(none given)'} (known: {', '.join(PERTURBATIONS)})")
    max_bytes = 65536 if args.max_bytes is None else (args.max_bytes or None)
    documents = load_documents(args, checkpoints, max_bytes)
    names = [c.name for c in checkpoints]
    if len(set(names)) != len(names):
        names = [str(c.path) for c in checkpoints]
    scorers = {name: c.scorer(args) for name, c in zip(names, checkpoints)}
    rows = robustness(scorers, documents.docs, kinds, rates, seed=args.seed)
    if not args.json:
        print(f"data: {documents.description}; {documents.num_bytes:,d} clean bytes, seed {args.seed}\n")
        print(robustness_table(rows))
    return {"data": documents.description, "seed": args.seed, "rows": rows}


def run_tasks(args, checkpoints) -> dict:
    from hnet.evaluation.downstream import RequestScorer, evaluate_task, results_table
    from hnet.evaluation.tasks import examples, load_rows, parse_tasks

    tasks = parse_tasks(args.tasks)
    data = {task.name: examples(task, load_rows(task, args.task_data, args.limit)) for task in tasks}
    show = not args.json
    out = {"tasks": [task.name for task in tasks], "limit": args.limit, "task_data": args.task_data, "models": []}
    rows = []
    for checkpoint in checkpoints:
        scorer = checkpoint.scorer(args)
        requests = RequestScorer(scorer)
        entry = {
            "checkpoint": str(checkpoint.path),
            "kind": checkpoint.loaded.kind,
            "step": checkpoint.loaded.step,
            "description": checkpoint.describe(),
            "window": scorer.window,
            "tasks": {},
        }
        if show:
            print(f"{entry['description']}; window {scorer.window}")
        for task in tasks:
            total = sum(len(example.requests) for example in data[task.name])
            with _progress(total, show and sys.stderr.isatty(), unit="req", desc=task.name) as bar:
                result = evaluate_task(requests, task, data[task.name], bar.update)
            entry["tasks"][task.name] = result.to_dict()
            rows.append((checkpoint.name, result))
            if show:
                print(
                    f"  {task.name}: {result.examples:,d} examples, {result.requests:,d} requests, {result.seconds:.1f} s"
                )
        out["models"].append(entry)
    if show:
        print()
        print(results_table(rows))
    return out


def run_compare(args) -> dict:
    from hnet.evaluation.report import write_compare

    table, paths = write_compare(args.compare, args.out or ".")
    if not args.json:
        print(table)
        for path in paths:
            print(f"wrote {path}")
    return {"table": table, "files": [str(p) for p in paths]}


def main(argv=None) -> int:
    args = parse_args(argv)
    from hnet.errors import ConfigError, DataError, EvalError, LoadError, RunError, report

    try:
        check_args(args)
        if args.compare:
            result = run_compare(args)
        else:
            checkpoints = [Checkpoint(path, args.step) for path in args.checkpoint]
            if args.show_boundaries:
                result = run_show_boundaries(args, checkpoints)
            elif args.robustness:
                result = run_robustness(args, checkpoints)
            elif args.tasks:
                result = run_tasks(args, checkpoints)
            else:
                result = run_evaluate(args, checkpoints)
    except (UsageError, ConfigError, DataError, EvalError, LoadError, RunError) as err:
        return report(err)
    if args.results:
        try:
            Path(args.results).write_text(json.dumps(result, indent=1) + "\n")
        except OSError as err:
            return report(f"--results: cannot write {args.results} ({err.strerror})")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from hnet.host_memory import use_huge_pages

    use_huge_pages()  # first thing: large allocations on huge pages, far fewer page faults per step
    sys.exit(main())
