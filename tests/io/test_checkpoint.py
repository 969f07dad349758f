"""Checkpoint manifests: a damaged or interrupted checkpoint is skipped with one warning line (train
--resume, eval.py, generate.py, hnet.inference.export), never deleted, and never counted by retention; no
usable checkpoint, or a damaged --step, is a one-line error; `python -m hnet.io.checkpoint verify`."""

import json
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import pytest

import eval as eval_cli
import generate as generate_cli
import train as train_cli
from hnet.io import checkpoint
from hnet.io.checkpoint import Checkpointer, check_step
from hnet.io.run_dir import RunDir
from hnet.inference.load import load_model
from hnet.inference.export import main as export_cli
from hnet.training.run_config import run_config_from_dict
from hnet.training.train_loop import train
from conftest import losses, small_run

# The run of test_train's resume test (8 steps, a checkpoint every 4, the newest 3 kept), so that
# its steps compile once for both files.
RUN = small_run(steps=8, grad_accum=2)


def damage(run_dir: Path, step: int, files: int = 3) -> list[Path]:
    """Overwrite `files` files of a checkpoint with random bytes of the same size (a bad disk)."""
    folder = run_dir / "checkpoints" / str(step)
    targets = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != checkpoint.MANIFEST)
    targets = [targets[0], targets[len(targets) // 2], targets[-1]][:files]
    for path in targets:
        path.write_bytes(os.urandom(path.stat().st_size))
    return targets


def verify(run_dir: Path, capsys) -> tuple[int, dict[int, str], str]:
    """-> (exit code, {step: state} from the lines, the whole output)."""
    code = checkpoint.main(["verify", str(run_dir)])
    out = capsys.readouterr().out
    states = {int(line.split()[0]): line.split()[1] for line in out.splitlines() if line.split()[0].isdigit()}
    return code, states, out


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted 8-step run: checkpoints 4 and 8."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    train(run_config_from_dict(RUN), run_dir, progress=False, verbose=False)
    return run_dir


def copy_run(straight: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(straight, tmp_path / "run"))


def test_damaged_newest_checkpoint_is_skipped_on_resume(straight, tmp_path, capsys):
    assert RunDir(straight).checkpoint_steps() == [4, 8]
    assert all(check_step(straight, s).state == "good" for s in (4, 8))

    run_dir = tmp_path / "run"
    train(run_config_from_dict(RUN), run_dir, progress=False, verbose=False, max_steps=4)
    train(None, run_dir, resume=True, progress=False, verbose=False, max_steps=2)  # stopped at 6
    assert RunDir(run_dir).checkpoint_steps() == [4, 6]
    damaged = damage(run_dir, 6)
    damaged_bytes = [p.read_bytes() for p in damaged]
    code, states, out = verify(run_dir, capsys)
    assert code == 1 and states == {6: "damaged", 4: "good"}
    assert "a resume would use step 4" in out

    summary = train(None, run_dir, resume=True, progress=False, verbose=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert summary["status"] == "completed" and summary["step"] == 8
    assert len(err) == 1 and err[0].startswith("warning: checkpoint") and "/checkpoints/6 is damaged" in err[0]
    # Resumed from step 4: the same losses as the uninterrupted run (bitwise on CPU).
    assert losses(run_dir) == losses(straight)
    # The damaged checkpoint was moved aside untouched (the run saves its steps again).
    aside = RunDir(run_dir).skipped_checkpoints / "6"
    assert [(aside / p.relative_to(run_dir / "checkpoints" / "6")).read_bytes() for p in damaged] == damaged_bytes
    assert RunDir(run_dir).checkpoint_steps() == [4, 8]
    code, states, out = verify(run_dir, capsys)
    assert code == 0 and states == {8: "good", 4: "good"} and "set aside" in out


def test_interrupted_save_and_old_checkpoints(straight, tmp_path, capsys):
    run_dir = copy_run(straight, tmp_path)
    # A save interrupted before its manifest: the newest has none, the older ones have theirs.
    (run_dir / "checkpoints" / "8" / checkpoint.MANIFEST).unlink()
    code, states, out = verify(run_dir, capsys)
    assert code == 1 and states == {8: "incomplete", 4: "good"}
    loaded = load_model(run_dir)
    err = capsys.readouterr().err.strip().splitlines()
    assert loaded.step == 4 and len(err) == 1 and "/checkpoints/8 is incomplete" in err[0]

    # Written before manifests existed (none has one): used unverified, with a warning.
    (run_dir / "checkpoints" / "4" / checkpoint.MANIFEST).unlink()
    code, states, _ = verify(run_dir, capsys)
    assert code == 1 and states == {8: "unverified", 4: "unverified"}
    assert load_model(run_dir).step == 8
    assert "unverified" in capsys.readouterr().err
    # Nothing to check it against, so damage shows only where orbax cannot read it (random bytes
    # in array data may well restore as garbage): skipped too.
    metadata = run_dir / "checkpoints" / "8" / "state" / "_METADATA"
    metadata.write_bytes(b"\xff" * metadata.stat().st_size)
    assert load_model(run_dir).step == 4
    err = capsys.readouterr().err
    assert "/checkpoints/8 is damaged (cannot be restored:" in err and "skipped, using step 4" in err


def test_no_usable_checkpoint_is_one_error_line(straight, tmp_path, capsys):
    run_dir = copy_run(straight, tmp_path)
    for step in (4, 8):
        damage(run_dir, step, files=1)
    code, states, out = verify(run_dir, capsys)
    assert code == 3 and set(states.values()) == {"damaged"} and "no usable checkpoint" in out
    code = train_cli.main(["--workdir", str(run_dir), "--resume", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --resume: no usable checkpoint") and "\n" not in err
    assert generate_cli.main(["--checkpoint", str(run_dir), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no usable checkpoint") and "\n" not in err
    assert RunDir(run_dir).checkpoint_steps() == [4, 8]  # nothing deleted or moved by a failed resume
    assert checkpoint.main(["verify", str(tmp_path / "absent")]) == 2


def test_asking_for_a_damaged_step_is_an_error(straight, tmp_path, capsys):
    run_dir = copy_run(straight, tmp_path)
    damage(run_dir, 8)
    assert generate_cli.main(["--checkpoint", str(run_dir), "--step", "8", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint") and "/checkpoints/8 is damaged" in err and "\n" not in err
    assert eval_cli.main(["--checkpoint", str(run_dir), "--step", "8"]) == 2
    assert "/checkpoints/8 is damaged" in capsys.readouterr().err
    assert export_cli(["--checkpoint", str(run_dir), "--out", str(tmp_path / "export"), "--step", "8"]) == 2
    assert "/checkpoints/8 is damaged" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()
    assert load_model(run_dir, step=4).step == 4 and capsys.readouterr().err == ""  # a good one: no warning


def test_retention_keeps_damaged_checkpoints_and_counts_only_good_ones(tmp_path):
    state = {"w": jnp.arange(64.0).reshape(8, 8)}
    checkpointer = Checkpointer(tmp_path / "run", keep=2)
    for step in (1, 2):
        checkpointer.save(step, state, {}, {"step": step})
    checkpointer.wait()  # committed, manifests written
    damage(tmp_path / "run", 1, files=1)
    for step in (3, 4, 5):
        checkpointer.save(step, state, {}, {"step": step})
    checkpointer.close()
    # keep=2: the newest two good ones (5, 4) stay; 2 and 3 went; the damaged 1 is never deleted.
    assert RunDir(tmp_path / "run").checkpoint_steps() == [1, 4, 5]
    assert [check_step(tmp_path / "run", s).state for s in (1, 4, 5)] == ["damaged", "good", "good"]
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "5" / checkpoint.MANIFEST).read_text())
    assert manifest["format"] == checkpoint.MANIFEST_FORMAT and "meta/metadata" in manifest["files"]
