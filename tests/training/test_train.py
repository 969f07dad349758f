"""Training: loss goes down, resume reproduces the same losses bit for bit, preemption saves and
exits 0, non-finite steps are skipped and stop the run, bad input gets a one-line error."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hnet.training.run_config import run_config_from_dict
from hnet.training.train_loop import train
from conftest import LADDER, ROOT, SMALL_MODEL, losses, run_cli, small_run, write_run
from hnet.errors import RunError


def test_loss_decreases_on_default_corpus(tmp_path):
    """On the slot ladder (hnet.slots), as real runs train: the loss falls, and every step logs
    the chunk slots it computed against the chunks kept."""
    spec = small_run(steps=40, lr=5e-3, batch_size=8, eval_every=40, eval_batches=4)
    run = run_config_from_dict({**spec, "model": {**spec["model"], "slot_ladder": list(LADDER["slot_ladder"])}})
    summary = train(run, tmp_path / "run", progress=False, verbose=False)
    curve = losses(tmp_path / "run")
    assert len(curve) == 40
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    utilisation = [row["stage0_slot_utilisation"] for row in rows if "loss" in row]
    assert len(utilisation) == 40 and all(0 < u <= 1 for u in utilisation)
    assert np.mean(curve[-8:]) < np.mean(curve[:8]) - 0.5
    assert summary["eval"]["bpb"] < 6.0 and summary["eval"]["stage0_bytes_per_chunk"] > 1.0


def test_resume_reproduces_losses_exactly(tmp_path):
    run = run_config_from_dict(small_run(steps=8, grad_accum=2))
    train(run, tmp_path / "straight", progress=False, verbose=False, peak_tflops=0.5)
    check_speed_fields(run, tmp_path / "straight", peak_flops=0.5e12)
    first = train(run, tmp_path / "resumed", progress=False, verbose=False, max_steps=4)
    assert first["step"] == 4
    # What a kill -9 during a save leaves behind: an unfinished temporary checkpoint folder.
    partial = tmp_path / "resumed" / "checkpoints" / "6.orbax-checkpoint-tmp-1700000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "partial.bin").write_bytes(b"\0" * 100)
    train(None, tmp_path / "resumed", resume=True, progress=False, verbose=False)
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(straight) == len(resumed) == 8
    assert straight == resumed  # bitwise on CPU


def test_gradient_accumulation_traces_the_model_once(monkeypatch):
    """A step of A micro-batches runs one lax.scan over them, and tracing it traces the model's
    forward and backward pass once (a deep model's trace time), not once more for shapes."""
    import jax

    from hnet.training import train_step as train_step_lib

    traced = []
    real = train_step_lib.loss_and_metrics
    monkeypatch.setattr(
        train_step_lib, "loss_and_metrics", lambda *args, **kwargs: traced.append(1) or real(*args, **kwargs)
    )
    run = run_config_from_dict(small_run(grad_accum=4))
    _, steps = train_step_lib.make_step_functions(run)
    batch = jax.ShapeDtypeStruct((4, 1, run.train.seq_len), np.int32, sharding=steps.micro_batch_sharding)
    steps.train_step.trace(steps.abstract_state, batch, batch)
    assert len(traced) == 1


def check_speed_fields(run, run_dir: Path, peak_flops: float | None) -> None:
    """Every step row has its window's speed: step time, bytes/s, model FLOPs at its own bytes per
    chunk (hnet.flops), and MFU exactly when a peak is known; rows of a window share the timing."""
    import jax

    from hnet.flops import training_flops_per_step

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "loss" in row]
    config, train_cfg = run.model_config, run.train
    for row in rows:
        assert row["step_time_s"] > 0 and row["bytes_per_sec"] > 0 and "tokens_per_sec" not in row  # bytes: no tokens
        assert "peak_memory_bytes" not in row  # the CPU backend reports no memory statistics
        bytes_per_chunk = [row[f"stage{s}_bytes_per_chunk"] for s in range(config.depth)]
        assert row["model_flops_per_step"] == training_flops_per_step(
            config, train_cfg.batch_size, train_cfg.seq_len, bytes_per_chunk
        )
    step_bytes = train_cfg.batch_size * train_cfg.seq_len
    for start in range(0, len(rows), train_cfg.log_every):  # flushed (and timed) every log_every steps
        window = rows[start : start + train_cfg.log_every]
        step_time = window[0]["step_time_s"]
        assert all(row["step_time_s"] == step_time for row in window)
        assert window[0]["bytes_per_sec"] == pytest.approx(len(window) * step_bytes / (step_time * len(window)))
        if peak_flops is None:
            assert all("mfu" not in row for row in window)
        else:
            flops = sum(row["model_flops_per_step"] for row in window)
            expected = flops / (step_time * len(window) * jax.device_count() * peak_flops)
            assert all(row["mfu"] == pytest.approx(expected) for row in window)


def test_progress_bar_shows_speed():
    import io

    from hnet.training.train_loop import _progress_bar, _update_bar

    bar = _progress_bar(10, 0, enabled=True)
    bar.fp = io.StringIO()
    row = {
        "loss": 2.0,
        "bpb": 3.0,
        "bytes_per_sec": 12345.0,
        "tokens_per_sec": 3000.0,
        "step_time_s": 0.0421,
        "mfu": 0.375,
        "peak_memory_bytes": 3 * 2**30,
        "stage0_bytes_per_chunk": 4.5,
        "stage0_dropped_rate": 0.0,
    }
    _update_bar(bar, row, 2)
    postfix = bar.postfix
    assert "B/s=12,345" in postfix and "tok/s=3,000" in postfix and "step=42ms" in postfix
    assert "MFU=37.5%" in postfix and "mem=3.0GiB" in postfix and "stage0 B/chunk=4.50" in postfix
    assert "dropped" not in postfix
    bar.close()


def read_event_file(path: Path) -> list:
    """The Event protos of a TensorBoard event file (TFRecord framing: u64 length, u32 length
    CRC, the record, u32 record CRC; the CRCs are not checked here)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    data, position, events = path.read_bytes(), 0, []
    while position < len(data):
        (length,) = struct.unpack("<Q", data[position : position + 8])
        position += 12
        events.append(Event.FromString(data[position : position + length]))
        position += length + 4
    return events


def logged_scalars(events) -> dict[tuple[str, int], float]:
    """(tag, step) -> value of the scalar summaries among `events`."""
    return {
        (value.tag, event.step): value.simple_value
        for event in events
        if event.HasField("summary")
        for value in event.summary.value
    }


def test_tensorboard_events_match_metrics_and_resume_purges(tmp_path):
    pytest.importorskip("tensorboardX")
    from hnet.training import tensorboard

    run_dir = tmp_path / "run"
    # test_resume_reproduces_losses_exactly's run config: its compiled steps are cached.
    train(run_config_from_dict(small_run(steps=8, grad_accum=2)), run_dir, progress=False, verbose=False)
    # As if the run had died after logging step 8 but before its checkpoint: resume from step 4.
    shutil.rmtree(run_dir / "checkpoints" / "8")
    train(None, run_dir, resume=True, progress=False, verbose=False)
    first, resumed = (
        read_event_file(p)
        for p in sorted(
            (run_dir / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: int(p.name.rsplit(".step", 1)[1])
        )
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [*range(1, 9), 8]  # steps, then the evaluation row

    # The resumed writer tells TensorBoard to drop the first run's events from step 5 on.
    starts = [event for event in resumed if event.HasField("session_log")]
    assert len(starts) == 1 and starts[0].session_log.status == starts[0].session_log.START and starts[0].step == 5
    first_scalars, resumed_scalars = logged_scalars(first), logged_scalars(resumed)
    assert {step for _, step in first_scalars} == set(range(1, 9)) and {step for _, step in resumed_scalars} == {
        5,
        6,
        7,
        8,
    }
    seen = {**{key: v for key, v in first_scalars.items() if key[1] < 5}, **resumed_scalars}
    expected = {(tag, row["step"]): value for row in rows for tag, value in tensorboard.scalars(row).items()}
    assert seen.keys() == expected.keys()
    for key, value in expected.items():
        assert seen[key] == pytest.approx(value, rel=1e-6), key  # stored as float32
    tags = {tag for tag, _ in expected}
    assert {
        "train/loss",
        "train/bpb",
        "train/ratio_loss",
        "train/lr",
        "train/stage0_bytes_per_chunk",
        "train/stage0_dropped_rate",
        "speed/step_time_s",
        "speed/bytes_per_sec",
        "eval/bpb",
        "eval/stage0_bytes_per_chunk",
    } <= tags


def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
    run = run_config_from_dict(
        small_run(
            steps=30, lr=1e30, log_every=1, checkpoint_every=1, max_nonfinite_steps=3, warmup_frac=0.0, grad_clip=1e30
        )
    )
    with pytest.raises(RunError, match="non-finite steps in a row .* last good checkpoint"):
        train(run, tmp_path / "run", progress=False, verbose=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["finite"] for row in rows][-3:] == [False, False, False]


def test_bad_config_is_one_line_error(tmp_path, capsys):
    config = write_run(tmp_path, small_run())
    code, err = run_cli(["--config", config, "--workdir", str(tmp_path / "r"), "--set", "train.nonsense=1"], capsys)
    assert code == 2 and err.startswith("error:") and "nonsense" in err and "\n" not in err
    code, err = run_cli(["--config", str(tmp_path / "absent.json")], capsys)
    assert code == 2 and "no such run config" in err


def test_missing_and_corrupt_data_are_one_line_errors(tmp_path, capsys):
    missing = small_run()
    missing["data"] = {"corpus": str(tmp_path / "nowhere")}
    code, err = run_cli(["--config", write_run(tmp_path, missing), "--workdir", str(tmp_path / "r1")], capsys)
    assert code == 2 and err.startswith("error:") and "\n" not in err

    from data.text import prepare as text_prepare

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(30):
        (docs / f"{i}.txt").write_text(f"document {i} " * 40)
    corpus = tmp_path / "corpus"
    text_prepare.main([str(docs), "--out", str(corpus), "--validation-fraction", "0.2"])
    shard = sorted(corpus.glob("train_*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated: a corrupt shard
    corrupt = small_run()
    corrupt["data"] = {"corpus": str(corpus)}
    code, err = run_cli(["--config", write_run(tmp_path, corrupt, "c.json"), "--workdir", str(tmp_path / "r2")], capsys)
    assert code == 2 and err.startswith("error:") and "\n" not in err


def test_run_folder_is_never_overwritten_and_resume_checks_model(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(run_config_from_dict(small_run(steps=2)), run_dir, progress=False, verbose=False)
    saved = (run_dir / "config.json").read_text()
    config = write_run(tmp_path, small_run(steps=2))
    code, err = run_cli(["--config", config, "--workdir", str(run_dir)], capsys)
    assert code == 2 and "already holds a run" in err
    other = small_run()
    other["model"] = {**SMALL_MODEL, "d_model": [48, 80]}
    code, err = run_cli(
        ["--config", write_run(tmp_path, other, "other.json"), "--workdir", str(run_dir), "--resume"], capsys
    )
    assert code == 2 and "different model config" in err and "d_model" in err
    code, err = run_cli(["--workdir", str(tmp_path / "empty"), "--resume"], capsys)
    assert code == 2 and "holds no run" in err
    assert (run_dir / "config.json").read_text() == saved


def test_profile_traces_the_chosen_steps(tmp_path, capsys):
    import gzip

    config = write_run(tmp_path, small_run(steps=2))  # the run config of the test above: compiled steps cached
    code, err = run_cli(
        ["--config", config, "--workdir", str(tmp_path / "run"), "--profile", "2:2", "--no-progress"], capsys
    )
    assert code == 0, err
    (trace_dir,) = (tmp_path / "run" / "profile" / "plugins" / "profile").iterdir()
    assert [p.stat().st_size > 0 for p in trace_dir.glob("*.xplane.pb")] == [True]
    events = json.loads(gzip.decompress((trace_dir / "perfetto_trace.json.gz").read_bytes()))["traceEvents"]
    assert [e["args"]["step_num"] for e in events if e.get("name") == "train"] == ["2"]  # step 2 only
    for spec, message in [
        ("2-3", "expected START:STOP"),
        ("3:2", "1 <= START <= STOP"),
        ("0:1", "1 <= START <= STOP"),
        ("a:b", "expected START:STOP"),
        ("5:6", r"START must be a step this call runs \(1 to 2\)"),
    ]:
        code, err = run_cli(["--config", config, "--workdir", str(tmp_path / "bad"), "--profile", spec], capsys)
        assert code == 2 and err.startswith("error: --profile") and "\n" not in err and re.search(message, err), err
        assert not (tmp_path / "bad").exists()  # checked before the run folder is made


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path):
    config = write_run(tmp_path, small_run(steps=100000, log_every=1, checkpoint_every=100000))
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "train.py", "--config", config, "--workdir", str(run_dir), "--no-progress"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "stopped by SIGTERM" in output
    steps = [int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps and max(steps) >= 3
