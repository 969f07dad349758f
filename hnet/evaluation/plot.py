"""PNG curves of a training run, from its RUN_DIR/metrics.jsonl.

    python -m hnet.evaluation.plot RUN_DIR        # or: python train.py --plot RUN_DIR

Writes two files into RUN_DIR:

    curves_bpb.png      training bits per byte and loss (raw, light, plus a smoothed line) and
                        evaluation bits per byte (markers), against bytes seen
    curves_chunks.png   bytes per chunk of each chunking stage, training and evaluation,
                        against bytes seen

`plot_compare` draws several runs' evaluation curves into one PNG (eval.py --compare).

matplotlib is optional (`pip install matplotlib`); it is imported only when plotting.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from hnet.errors import RunError, report
from hnet.io.run_dir import RunDir
from hnet.stage_metrics import stage_metric

_STAGE_KEY = re.compile(r"^stage(\d+)_bytes_per_chunk$")


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """RUN_DIR/metrics.jsonl -> (training rows, evaluation rows), each in file order.

    Evaluation rows are the ones with a "split" key. Raises RunError if the file is missing,
    empty or not JSON Lines.
    """
    path = RunDir(run_dir).metrics
    if not path.is_file():
        raise RunError(f"{path}: no such file (is {run_dir} a run folder?)")
    train_rows, eval_rows = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise RunError(f"{path}:{number}: not a JSON line") from None
        (eval_rows if "split" in row else train_rows).append(row)
    if not train_rows and not eval_rows:
        raise RunError(f"{path}: no metric rows yet")
    return train_rows, eval_rows


def smooth(values: list[float], window: int | None = None) -> list[float]:
    """Centred moving average; the window shrinks at the ends. Default window: ~5% of the points."""
    if window is None:
        window = max(1, len(values) // 20)
    half = window // 2
    out = []
    for i in range(len(values)):
        part = values[max(0, i - half) : i + half + 1]
        out.append(sum(part) / len(part))
    return out


def _stages(rows: list[dict], prefix: str = "") -> list[int]:
    """Chunking stages that have a `{prefix}stageK_bytes_per_chunk` column in any row."""
    found = set()
    for row in rows:
        for key in row:
            match = _STAGE_KEY.match(key[len(prefix) :]) if key.startswith(prefix) else None
            if match:
                found.add(int(match.group(1)))
    return sorted(found)


def _column(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(bytes_seen, value) for the rows that have `key` with a finite value."""
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and value == value and abs(value) != float("inf"):
            xs.append(row["bytes_seen"])
            ys.append(value)
    return xs, ys


def _train_line(ax, rows, key, color, label):
    """A light raw curve plus a smoothed line of the same colour."""
    xs, ys = _column(rows, key)
    if not xs:
        return
    ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
    ax.plot(xs, smooth(ys), color=color, linewidth=1.6, label=label)


def _import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RunError("plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax_list, path: Path, title: str) -> Path:
    for ax in ax_list:
        ax.set_xlabel("bytes seen")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write curves_bpb.png and curves_chunks.png into `run_dir`; returns their paths."""
    run_dir = Path(run_dir)
    train_rows, eval_rows = read_metrics(run_dir)
    plt = _import_pyplot()
    title = run_dir.resolve().name
    written = []

    # Bits per byte (training and evaluation) and the training loss.
    fig, (ax_bpb, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    _train_line(ax_bpb, train_rows, "bpb", "tab:blue", "train bpb")
    for split in sorted({row["split"] for row in eval_rows}):
        xs, ys = _column([r for r in eval_rows if r["split"] == split], "eval_bpb")
        ax_bpb.plot(xs, ys, "o-", color="tab:red", markersize=5, label=f"{split} bpb")
    ax_bpb.set_ylabel("bits per byte")
    _train_line(ax_loss, train_rows, "loss", "tab:green", "train loss (CE + ratio loss)")
    ax_loss.set_ylabel("loss (nats)")
    written.append(_finish(fig, [ax_bpb, ax_loss], RunDir(run_dir).plot("bpb"), f"{title}: bits per byte"))
    plt.close(fig)

    # Bytes per chunk per stage; a plain Transformer run has no stages and gets an empty note.
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    stages = sorted(set(_stages(train_rows)) | set(_stages(eval_rows, prefix="eval_")))
    for s in stages:
        color = colors[s % len(colors)]
        _train_line(ax, train_rows, stage_metric(s, "bytes_per_chunk"), color, f"stage {s} train")
        xs, ys = _column(eval_rows, "eval_" + stage_metric(s, "bytes_per_chunk"))
        if xs:
            ax.plot(xs, ys, "o", color=color, markersize=6, markeredgecolor="black", label=f"stage {s} eval")
    if not stages:
        ax.text(0.5, 0.5, "no chunking stages in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("bytes per chunk")
    if stages:
        ax.set_yscale("log")  # stages differ by their compression ratios; spikes stay readable
    written.append(_finish(fig, [ax], RunDir(run_dir).plot("chunks"), f"{title}: bytes per chunk"))
    plt.close(fig)
    return written


def plot_compare(summaries, path: str | Path) -> Path:
    """One PNG comparing runs: evaluation bpb against training bytes (left) and against training
    FLOPs (right). summaries: hnet.evaluation.report.RunSummary list (curve = (bytes, FLOPs or None, bpb))."""
    plt = _import_pyplot()
    fig, (ax_bytes, ax_flops) = plt.subplots(1, 2, figsize=(12, 4.5))
    for summary in summaries:
        if not summary.curve:
            continue
        xs, flops, ys = zip(*summary.curve)
        (line,) = ax_bytes.plot(xs, ys, "o-", markersize=4, label=summary.name)
        points = [(f, y) for f, y in zip(flops, ys) if f is not None]
        if points:
            ax_flops.plot(*zip(*points), "o-", markersize=4, color=line.get_color(), label=summary.name)
    for ax, xlabel in ((ax_bytes, "training bytes"), (ax_flops, "training FLOPs")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("evaluation bits per byte")
        ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("evaluation bits per byte")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m hnet.evaluation.plot", description="Write PNG curves of a run's metrics.jsonl."
    )
    parser.add_argument("run_dir", help="a run folder holding metrics.jsonl")
    args = parser.parse_args(argv)
    try:
        for path in plot_run(args.run_dir):
            print(f"wrote {path}")
    except RunError as err:
        return report(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
