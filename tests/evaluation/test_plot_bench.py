"""hnet.evaluation.plot writes its PNGs from a metrics.jsonl (hnet.perf.bench: tests/perf/test_bench.py)."""

import json

import pytest

from hnet.errors import RunError


def write_metrics(run_dir, steps=30, eval_every=10):
    """A synthetic metrics.jsonl in the train loop's format: a 1-stage run, train and eval rows."""
    lines = []
    for step in range(1, steps + 1):
        bpb = 8.0 / (1 + 0.1 * step)
        lines.append(
            {
                "step": step,
                "bytes_seen": 4096 * step,
                "loss": bpb * 0.7 + 0.04,
                "bpb": bpb,
                "ce": bpb * 0.69,
                "lr": 1e-3,
                "grad_norm": 1.0,
                "bytes_per_sec": 5000.0,
                "finite": True,
                "nonfinite_run": 0,
                "stage0_bytes_per_chunk": 2.0 + step / 10,
                "stage0_overflow_rate": 0.01,
            }
        )
        if step % eval_every == 0:
            lines.append(
                {
                    "step": step,
                    "bytes_seen": 4096 * step,
                    "split": "validation",
                    "eval_bpb": bpb + 0.1,
                    "eval_stage0_bytes_per_chunk": 2.5 + step / 10,
                    "eval_stage0_overflow_rate": 0.0,
                }
            )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in lines))


def test_plot_run_writes_both_pngs(tmp_path):
    from hnet.evaluation.plot import plot_run

    write_metrics(tmp_path)
    paths = plot_run(tmp_path)
    assert sorted(p.name for p in paths) == ["curves_bpb.png", "curves_chunks.png"]
    for path in paths:
        assert path.parent == tmp_path
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_plot_run_missing_or_empty_metrics(tmp_path):
    from hnet.evaluation.plot import plot_run

    with pytest.raises(RunError, match="metrics.jsonl"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(RunError, match="no metric rows"):
        plot_run(tmp_path)
