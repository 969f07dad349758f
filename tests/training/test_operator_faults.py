"""What cluster operators do to a training run: restart it at any moment with the same command,
start a second job on its folder, run out of disk. Each ends in one line and a known exit status,
and nothing committed is lost (hnet.training.run_lock, hnet.io.checkpoint, hnet.training.train_loop)."""

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from hnet.training import run_lock
from hnet.io.checkpoint import check_step
from hnet.errors import WRITE_FAILED_EXIT, RunError, RunWriteError
from hnet.inference.load import load_model
from hnet.training.run_config import run_config_from_dict
from hnet.training.train_loop import MetricsLog, train
from hnet.io.run_dir import RunDir
from conftest import losses, run_cli, small_run, write_run

RESTART = ["--resume", "--no-progress"]
SPEC = small_run(steps=8, checkpoint_every=4, log_every=1)  # every test's run: saves at steps 4 and 8
# train.py on a disk that refuses files over LIMIT bytes (EFBIG), set in the child itself.
LIMITED = (
    "import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "limit = int(sys.argv.pop(1)); resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
    "sys.argv[0] = 'train.py'; runpy.run_path('train.py', run_name='__main__')"
)


def launch(args: list[str], file_size_limit: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = ["train.py"] if file_size_limit is None else ["-c", LIMITED, str(file_size_limit)]
    return subprocess.Popen(
        [sys.executable, *command, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """SPEC trained without interruption: the losses every test must end with."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    train(run_config_from_dict(SPEC), run_dir, progress=False, verbose=False)
    return run_dir


def dead_pid() -> int:
    """The id of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(run_dir: Path, **holder) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = RunDir(run_dir).lock
    path.write_text(
        json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": time.time(),
                "process_start": run_lock._process_start(os.getpid()),
                "boot_id": run_lock._boot_id(),
                "token": "t",
                **holder,
            }
        )
    )
    return path


def test_restart_before_the_first_checkpoint_starts_the_run_again(straight, tmp_path, capsys):
    """What a kill before the first save leaves: the config, some metrics rows (the last one cut
    short), a dead job's lock and a partial save. The restart command runs the whole run."""
    run = run_config_from_dict(SPEC)
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "config.json").write_text(json.dumps(run.to_dict()))
    rows = (straight / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text("\n".join(rows[:2]) + "\n" + rows[2][:30])
    write_lock(killed, pid=dead_pid(), process_start="1")
    (killed / "checkpoints" / "4.orbax-checkpoint-tmp-1700000000").mkdir(parents=True)
    # Another run config for a run that has not saved yet: one line, and nothing changes.
    other = write_run(tmp_path, {**SPEC, "train": {**SPEC["train"], "lr": 1e-3}}, "other.json")
    before = (killed / "metrics.jsonl").read_text()
    code, err = run_cli(["--config", other, "--workdir", str(killed), *RESTART], capsys)
    warning, error = err.splitlines()
    assert "no longer running; taking it over" in warning
    assert code == 2 and error.startswith("error: --resume:") and "train.lr" in error, err
    assert (killed / "metrics.jsonl").read_text() == before
    code, err = run_cli(["--workdir", str(killed), *RESTART], capsys)
    assert code == 0, err
    assert err == ""  # the dead job's lock was taken over above, with its warning
    assert losses(killed) == losses(straight)  # bit for bit
    assert not RunDir(killed).lock.exists()  # released at the end
    assert not any("tmp" in p.name for p in (killed / "checkpoints").iterdir())  # the partial save is gone


def test_restart_of_a_complete_run_says_so_and_exits_zero(straight, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    before = (run_dir / "metrics.jsonl").read_text()
    # Readers (eval.py, generate.py, export: all through load_model) never need the lock.
    lock = write_lock(run_dir)  # a live training job's
    assert load_model(run_dir).step == 8
    assert json.loads(lock.read_text())["token"] == "t"
    lock.unlink()
    code, err = run_cli(["--workdir", str(run_dir), *RESTART], capsys)
    assert code == 0, err
    assert (run_dir / "metrics.jsonl").read_text() == before
    # And a restart command that names the config works before the folder even exists.
    fresh = tmp_path / "fresh"
    code, err = run_cli(["--config", write_run(tmp_path, SPEC), "--workdir", str(fresh), *RESTART], capsys)
    assert code == 0, err
    assert losses(fresh) == losses(straight)


def test_a_restart_loads_its_compiled_programs_from_the_run_folder(straight, tmp_path, recwarn):
    """train.compile_cache "run": the first start writes its compiled programs to RUN_DIR/compile_cache
    and a restart loads them instead of compiling (the same losses); entries a kill cut short only
    cost a compilation; outside the run, jax's cache is the one it had before."""
    import jax

    given_cache = jax.config.jax_compilation_cache_dir  # the test session's (conftest)
    run = run_config_from_dict({**SPEC, "train": {**SPEC["train"], "compile_cache": "run"}})
    run_dir = RunDir(tmp_path / "run")
    train(run, run_dir.path, progress=False, verbose=False, max_steps=3)
    entries = sorted(run_dir.compile_cache.glob("*-cache"))
    assert entries  # at least the train step's
    assert jax.config.jax_compilation_cache_dir == given_cache

    events = []
    jax.monitoring.register_event_listener(lambda name, **_: events.append(name))
    jax.clear_caches()  # as a new process: nothing compiled in memory
    train(None, run_dir.path, resume=True, progress=False, verbose=False, max_steps=3)
    assert events.count("/jax/compilation_cache/cache_hits") >= len(entries)
    assert "/jax/compilation_cache/cache_misses" not in events
    # A kill in the middle of writing an entry: jax warns, compiles, and the run goes on.
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    jax.clear_caches()
    train(None, run_dir.path, resume=True, progress=False, verbose=False)
    assert any("persistent compilation cache" in str(w.message) for w in recwarn)
    assert losses(run_dir.path) == losses(straight)
    assert jax.config.jax_compilation_cache_dir == given_cache


def test_a_compile_cache_folder_that_cannot_be_made_is_one_error_line(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    spec = {**SPEC, "train": {**SPEC["train"], "compile_cache": str(tmp_path / "a_file" / "cache")}}
    code, err = run_cli(
        ["--config", write_run(tmp_path, spec), "--workdir", str(tmp_path / "run"), "--no-progress"], capsys
    )
    assert code == WRITE_FAILED_EXIT and err.count("\n") == 0, err
    assert err.startswith("error: train.compile_cache: cannot make") and "Not a directory" in err


def test_a_second_job_on_a_live_run_folder_is_refused_and_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    lock = write_lock(run_dir)  # held by this (live) process
    config = write_run(tmp_path, small_run(steps=2))
    for extra in ([], ["--resume"]):
        code, err = run_cli(["--config", config, "--workdir", str(run_dir), *extra], capsys)
        assert code == 2 and err.startswith("error:") and err.count("\n") == 0, err
        assert "in use by another training job" in err and f"pid {os.getpid()}" in err
        assert sorted(p.name for p in run_dir.iterdir()) == ["train.lock"]
        assert json.loads(lock.read_text())["token"] == "t"


def test_a_lock_whose_holder_is_gone_is_taken_over(tmp_path):
    path = RunDir(tmp_path / "run").lock
    warnings = []
    for holder in (
        {"pid": dead_pid()},  # no such process here
        {"process_start": "1"},  # this pid, but another process
        {"boot_id": "another boot"},  # before a reboot
        {"host": "elsewhere", "pid": 1},
    ):  # another host, heartbeat stale
        write_lock(path.parent, **holder)
        if holder.get("host") == "elsewhere":
            os.utime(path, (time.time() - run_lock.STALE_S - 5,) * 2)
        lock = run_lock.RunLock.acquire(path, warn=warnings.append)
        assert json.loads(path.read_text())["pid"] == os.getpid()
        lock.release()
        assert not path.exists()
    assert len(warnings) == 4 and all("taking it over" in w for w in warnings)
    write_lock(path.parent, host="elsewhere", pid=1)  # another host, heartbeat fresh: in use
    with pytest.raises(RunError, match="in use by another training job .*on elsewhere"):
        run_lock.RunLock.acquire(path, warn=warnings.append)


def test_a_save_the_disk_refuses_is_one_error_line_and_loses_nothing(straight, tmp_path):
    config = write_run(tmp_path, SPEC)
    run_dir = tmp_path / "run"
    proc = launch(["--config", config, "--workdir", str(run_dir), "--max-steps", "4", "--no-progress"])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert check_step(run_dir, 4).state == "good"
    # The restart on a disk that refuses files over 64 KiB: the save at step 8 fails.
    proc = launch(["--workdir", str(run_dir), *RESTART], file_size_limit=64 * 1024)
    _, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert proc.returncode == WRITE_FAILED_EXIT, err
    assert len(lines) == 1 and lines[0].startswith("error: saving checkpoint step 8 into ") and "Traceback" not in err
    assert "File too large" in lines[0] and "newest: step 4" in lines[0] and "free there" in lines[0]
    assert check_step(run_dir, 4).state == "good" and not (run_dir / "checkpoints" / "8").exists()
    # With room again, the same command finishes the run as if nothing had happened.
    proc = launch(["--workdir", str(run_dir), *RESTART])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert losses(run_dir) == losses(straight)


def test_metrics_the_disk_refuses_are_one_error_line(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    run_dir.path.mkdir()
    os.symlink("/dev/full", run_dir.metrics)  # every write: ENOSPC
    with pytest.raises(RunWriteError, match=r"writing .*metrics.jsonl failed: No space left on device"):
        with MetricsLog(run_dir, enabled=True, first_step=1) as log:
            log.write([{"step": 1, "loss": 1.0}])


def test_tensorboard_events_the_disk_refuses_are_one_error_line(tmp_path):
    """The event file grows past a 4 KiB file-size limit (metrics.jsonl goes to /dev/null)."""
    pytest.importorskip("tensorboardX")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.symlink(os.devnull, run_dir / "metrics.jsonl")
    code = (
        "import resource, signal, sys; from pathlib import Path; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
        "from hnet.errors import RunWriteError; from hnet.io.run_dir import RunDir; from hnet.training.train_loop import MetricsLog\n"
        "try:\n"
        "    with MetricsLog(RunDir(sys.argv[1]), enabled=True, first_step=1) as log:\n"
        "        for step in range(1, 200):\n"
        "            log.write([{'step': step, 'loss': 1.0, 'bpb': 2.0, 'lr': 0.1}])\n"
        "except RunWriteError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(run_dir)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert re.fullmatch(
        r"writing .*tensorboard failed: File too large; the rows written before are kept; "
        r"make room and resume with the same command\n",
        out.stdout,
    ), out.stdout


def test_random_kills_from_the_first_second_end_in_the_uninterrupted_losses(straight, tmp_path):
    """kill -9 at random moments of each start (during import, compilation, steps, saves), then
    the same restart command, until the run completes: the losses of an uninterrupted run."""
    config = write_run(tmp_path, SPEC)
    run_dir = tmp_path / "run"
    rng = random.Random(7)
    kills = 0
    for delay in [0.5, 2.0] + [rng.uniform(1.0, 8.0) for _ in range(3)] + [None]:
        proc = launch(["--config", config, "--workdir", str(run_dir), *RESTART])
        if delay is not None:
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.kill()
                kills += 1
        _, err = proc.communicate(timeout=300)
        if delay is None or proc.returncode == 0:
            assert proc.returncode == 0, err
        if proc.returncode == 0 and delay is not None:
            break
    assert kills >= 2
    assert losses(run_dir) == losses(straight)
