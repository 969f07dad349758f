"""Reports over several models: a training comparison (from the runs' logs) and a robustness table.

Comparison (`eval.py --compare RUN_A RUN_B ...`), from each run's config.json and metrics.jsonl:
final evaluation bpb (the last evaluation row), bytes seen, parameters, and training FLOPs per
byte (hnet.flops at the run's sequence length, with the bytes per chunk measured in the last
evaluation row, or the bytes per token of a token model); plus a plot of evaluation bpb against
training bytes and against training FLOPs. Training FLOPs at an evaluation point add up, over the
training rows before it, each step's bytes x FLOPs per byte at that step's measured bytes per
chunk (learned chunking changes during training, and so does the cost of the inner stages).

Robustness (`eval.py --robustness`): bpb of each model on perturbed copies of the same documents
(hnet.evaluation.perturb: one kind at one rate, seeded per document), scored against the perturbed bytes,
and its ratio to the model's bpb on the clean documents.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from hnet.config import config_from_dict
from hnet.errors import ConfigError, RunError
from hnet.io.run_dir import RunDir
from hnet.param_report import parameter_counts
from hnet.stage_metrics import stage_metric


# --------------------------------------------------------------------------------------------
# Training comparison
# --------------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    """One run as the comparison sees it. curve: (bytes_seen, training FLOPs or None, eval bpb)."""

    name: str
    path: Path
    description: str
    params: int
    final_bpb: float | None
    final_step: int
    bytes_seen: int
    flops_per_byte: float | None
    curve: list = field(default_factory=list)


def _stage_chunks(row: dict, depth: int, prefix: str = "") -> list | None:
    """Measured cumulative bytes per chunk of each stage in a metrics row, or None if absent."""
    values = [row.get(prefix + stage_metric(s, "bytes_per_chunk")) for s in range(depth)]
    return None if any(v is None for v in values) else values


def summarize_run(run_dir: str | Path) -> RunSummary:
    """Read a run folder's config.json and metrics.jsonl (see the module docstring)."""
    from hnet.errors import FlopsError
    from hnet.evaluation.plot import read_metrics
    from hnet.flops import flops_per_byte

    path = Path(run_dir)
    config_path = RunDir(path).config
    try:
        run = json.loads(config_path.read_text())
        config = config_from_dict(run["model"])
        seq_len = int(run["train"]["seq_len"])
    except FileNotFoundError:
        raise RunError(f"{path} is not a run folder (no config.json)") from None
    except (ValueError, KeyError, TypeError) as err:
        raise RunError(f"{config_path}: not a run config ({type(err).__name__}: {err})") from None
    except ConfigError as err:
        raise RunError(f"{config_path}: {err}") from None
    train_rows, eval_rows = read_metrics(path)
    token_model = not config.is_byte_model

    # A token model's bytes per token, measured by its evaluations (the tokenizer is fixed).
    bytes_per_token = None
    if token_model:
        measured = [r for r in eval_rows if r.get("eval_tokens") and r.get("eval_bytes")]
        bytes_per_token = measured[-1]["eval_bytes"] / measured[-1]["eval_tokens"] if measured else None
    cache: dict = {}

    def per_byte(row: dict, prefix: str = "") -> float | None:
        """Training FLOPs per byte under a row's measured chunking (None if it cannot be told)."""
        chunks = _stage_chunks(row, config.depth, prefix)
        if token_model and bytes_per_token is None:
            return None
        key = tuple(round(c, 3) for c in chunks) if chunks else None  # rows with equal chunking cost the same
        if key not in cache:
            try:
                cache[key] = flops_per_byte(
                    config, seq_len, bytes_per_chunk=chunks, bytes_per_token=bytes_per_token
                ).training_per_byte
            except FlopsError:
                cache[key] = None
        return cache[key]

    # Cumulative training FLOPs at each training row's bytes_seen.
    cumulative, flops_at, previous_bytes = 0.0, {}, 0
    for row in train_rows:
        rate = per_byte(row)
        if rate is None or cumulative is None:
            cumulative = None
        else:
            cumulative += rate * (row["bytes_seen"] - previous_bytes)
        previous_bytes = row["bytes_seen"]
        flops_at[row["step"]] = cumulative
    curve = [(row["bytes_seen"], flops_at.get(row["step"]), row["eval_bpb"]) for row in eval_rows if "eval_bpb" in row]
    last_eval = eval_rows[-1] if eval_rows else None
    last_row = (train_rows or eval_rows)[-1]
    routing = ", ".join(config.routing) if config.depth else ("BPE tokens" if token_model else "bytes")
    description = f"depth {config.depth}, d_model {list(config.d_model)}, {routing}"
    return RunSummary(
        name=path.resolve().name,
        path=path,
        description=description,
        params=sum(parameter_counts(config).values()),
        final_bpb=None if last_eval is None else last_eval["eval_bpb"],
        final_step=last_row["step"],
        bytes_seen=last_row["bytes_seen"],
        flops_per_byte=None if last_eval is None else per_byte(last_eval, "eval_"),
        curve=curve,
    )


def _number(value, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def compare_table(summaries: list[RunSummary]) -> str:
    """A markdown table, one row per run, best final bpb first."""
    ordered = sorted(summaries, key=lambda s: (s.final_bpb is None, s.final_bpb or 0.0))
    lines = [
        "| run | model | final eval bpb | step | bytes seen | params | training FLOPs/byte |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for s in ordered:
        lines.append(
            f"| {s.name} | {s.description} | {_number(s.final_bpb, '.4f')} | {s.final_step} | "
            f"{s.bytes_seen:,d} | {s.params:,d} | {_number(s.flops_per_byte, '.3g')} |"
        )
    return "\n".join(lines)


def write_compare(run_dirs: list, out_dir: str | Path) -> tuple[str, list[Path]]:
    """compare.md and compare.png in out_dir; returns (the markdown table, paths written)."""
    from hnet.evaluation.plot import plot_compare

    names = [Path(r).resolve().name for r in run_dirs]
    if len(set(names)) != len(names):
        raise RunError(f"--compare: runs need distinct folder names, got {', '.join(names)}")
    summaries = [summarize_run(r) for r in run_dirs]
    table = compare_table(summaries)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = out_dir / "compare.md"
    markdown.write_text(
        "# Run comparison\n\n" + table + "\n\nRuns: " + ", ".join(f"{s.name} = {s.path}" for s in summaries) + "\n"
    )
    plot = plot_compare(summaries, out_dir / "compare.png")
    return table, [markdown, plot]


# --------------------------------------------------------------------------------------------
# Robustness
# --------------------------------------------------------------------------------------------


def robustness(scorers: dict, documents: list, kinds, rates, seed: int = 0) -> list[dict]:
    """bpb of every scorer on perturbed documents.

    scorers: name -> hnet.evaluation.evaluate.Scorer; documents: list of bytes. Returns one row per (kind,
    rate), the first being ("clean", 0.0): {"kind", "rate", "bytes", "bpb": {name: bpb},
    "ratio": {name: bpb / clean bpb}}. Document i is perturbed with seed + i.
    """
    from hnet.evaluation.perturb import perturb

    rows = []
    settings = [("clean", 0.0)] + [(kind, rate) for kind in kinds for rate in rates]
    for kind, rate in settings:
        docs = documents if kind == "clean" else [perturb(doc, kind, rate, seed + i) for i, doc in enumerate(documents)]
        docs = [doc for doc in docs if doc]
        bpb = {name: scorer.evaluate(docs).bpb for name, scorer in scorers.items()}
        clean = rows[0]["bpb"] if rows else bpb
        rows.append(
            {
                "kind": kind,
                "rate": rate,
                "bytes": sum(len(d) for d in docs),
                "bpb": bpb,
                "ratio": {name: bpb[name] / clean[name] for name in bpb},
            }
        )
    return rows


def robustness_table(rows: list[dict]) -> str:
    """Markdown: one row per perturbation, per model its bpb and the ratio to clean."""
    names = list(rows[0]["bpb"])
    header = "| perturbation | rate | bytes | " + " | ".join(f"{n} bpb | {n} / clean" for n in names) + " |"
    lines = [header, "|---|---:|---:|" + "---:|---:|" * len(names)]
    for row in rows:
        cells = " | ".join(f"{row['bpb'][n]:.4f} | {row['ratio'][n]:.3f}" for n in names)
        lines.append(f"| {row['kind']} | {row['rate']:g} | {row['bytes']:,d} | {cells} |")
    return "\n".join(lines)
