"""Orbax checkpoints of a training run, each with a manifest: save, verify, restore with fallback.

Layout inside a run folder:

    RUN_DIR/config.json                  the full resolved run config (written once at the start)
    RUN_DIR/checkpoints/<step>/          one orbax checkpoint per saved step
        state/                           params, opt_state, step counters (arrays)
        data/                            the grain iterator state (JSON)
        meta/                            step, bytes seen, the run config (JSON)
        manifest.json                    every other file of the step: its size and sha256
    RUN_DIR/skipped_checkpoints/<step>/  checkpoints a --resume could not use, moved aside (never
                                         deleted, so they can be inspected; see set_aside_newer_than)

Saving. Orbax writes each step into a temporary folder and renames it into place when every
process has finished (its commit), so a process killed during a save leaves no half-written step
folder. After the commit, process 0 hashes every file of the step in a background thread (the
training loop keeps going) and writes manifest.json atomically (a temporary file renamed over).
`wait()` and `close()` wait for it. Arrays are saved sharded: in a multi-process run every process
calls `save` and writes the shards it holds, so the run folder must be on a filesystem all hosts
share. `restore` reads them onto whatever shardings the abstract state asks for, so a checkpoint
saved on one mesh (e.g. 8 devices) resumes on another (e.g. 2).

Checking (`check_step`, `survey`, `python -m hnet.io.checkpoint verify RUN_DIR`). A checkpoint is

    good        it has a manifest, and every file listed there has its recorded size and sha256
    damaged     a listed file is missing or differs, the manifest cannot be read, or (found when
                restoring) orbax cannot read it
    incomplete  no manifest, and newer than every checkpoint that has one: its save, or the
                manifest after it, was interrupted (or is still being written)
    unverified  no manifest, written before manifests existed (every checkpoint of a run that has
                none, or an older one): used as it is, with a warning, so old runs keep resuming

Restoring (`restore_newest`): the newest checkpoint that is good (or unverified) and restores is
used; newer ones are skipped, each named with the reason. Retention keeps the newest `keep` good
checkpoints and deletes older good or unverified ones; damaged and incomplete checkpoints are
never deleted and never count as one of the `keep`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from hnet.errors import CheckpointError, RunWriteError, describe_write_failure, report
from hnet.io.run_dir import RunDir

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "hnet-checkpoint-manifest"
MANIFEST_VERSION = 1
USABLE = ("good", "unverified")


# --------------------------------------------------------------------------------------------
# Manifests and checking (no orbax needed: plain files)
# --------------------------------------------------------------------------------------------


def _digest(path: Path) -> tuple[int, str]:
    """-> (size in bytes, sha256 hex) of a file."""
    with open(path, "rb") as f:
        return os.fstat(f.fileno()).st_size, hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: Path) -> dict:
    """Hash every file under a committed checkpoint folder and write folder/manifest.json atomically.

    -> the manifest: {"format", "version", "files": {relative path: {"bytes": int, "sha256": hex}}}.
    """
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name == MANIFEST or name.startswith(f".{MANIFEST}."):  # itself, or a leftover temporary
            continue
        size, sha256 = _digest(path)
        files[name] = {"bytes": size, "sha256": sha256}
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "files": files}
    temporary = folder / f".{MANIFEST}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, folder / MANIFEST)  # readers see no manifest or a whole one
    return manifest


def check_manifest(folder: Path, hash_files: bool = True) -> str | None:
    """None if every file in folder/manifest.json has its size and sha256; else the first problem.

    hash_files=False compares sizes only (fast; what the other processes of a run check).
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            return f"{MANIFEST} is not a checkpoint manifest"
        files = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in manifest["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # UnicodeDecodeError is a ValueError
        return f"{MANIFEST} cannot be read ({type(err).__name__})"
    problems = []
    for name, (size, sha256) in files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        actual = path.stat().st_size
        if actual != size:
            problems.append(f"{name} has {actual:,d} bytes, the manifest says {size:,d}")
        elif hash_files and _digest(path)[1] != sha256:
            problems.append(f"{name}: sha256 differs from the manifest")
    if not problems:
        return None
    more = len(problems) - 1
    return problems[0] + (f"; {more} more file{'s' * (more > 1)} differ{'s' * (more == 1)}" if more else "")


@dataclass(frozen=True)
class CheckpointStatus:
    """What one checkpoint folder is: see the module doc for the four states."""

    step: int
    path: Path
    state: str  # "good", "damaged", "incomplete" or "unverified"
    reason: str  # why it is damaged, incomplete or unverified; for good: what was checked

    @property
    def usable(self) -> bool:
        return self.state in USABLE

    def describe(self) -> str:
        return f"checkpoint {self.path} is {self.state} ({self.reason})"


def check_step(
    run_dir: str | Path, step: int, steps: list[int] | None = None, hash_files: bool = True
) -> CheckpointStatus:
    """The status of RUN_DIR/checkpoints/<step>; `steps` (all steps of the run) saves a listing."""
    run = RunDir(run_dir)
    steps = run.checkpoint_steps() if steps is None else steps
    folder = run.checkpoint(step)
    if not (folder / MANIFEST).is_file():
        with_manifest = [s for s in steps if (run.checkpoint(s) / MANIFEST).is_file()]
        if with_manifest and step > max(with_manifest):
            return CheckpointStatus(
                step,
                folder,
                "incomplete",
                "no manifest, and saved after the newest checkpoint "
                "that has one: its save was interrupted or is still finishing",
            )
        return CheckpointStatus(
            step, folder, "unverified", "no manifest: saved before checkpoint manifests, not checked"
        )
    problem = check_manifest(folder, hash_files)
    if problem is not None:
        return CheckpointStatus(step, folder, "damaged", problem)
    count = len(json.loads((folder / MANIFEST).read_text())["files"])
    return CheckpointStatus(
        step, folder, "good", f"{count} files match the manifest" + ("" if hash_files else " in size")
    )


def survey(run_dir: str | Path, hash_files: bool = True) -> list[CheckpointStatus]:
    """The status of every checkpoint of a run, newest first."""
    steps = RunDir(run_dir).checkpoint_steps()
    return [check_step(run_dir, step, steps, hash_files) for step in reversed(steps)]


@dataclass
class Restored:
    """What restore_newest found and read."""

    step: int
    value: Any  # whatever `restore` returned
    status: CheckpointStatus  # of the restored checkpoint: good or unverified
    skipped: list[CheckpointStatus]  # newer checkpoints that could not be used, newest first


def restore_newest(
    run_dir: str | Path,
    restore: Callable[[int], Any],
    *,
    step: int | None = None,
    hash_files: bool = True,
    all_agree: Callable[[bool], bool] = lambda ok: ok,
    passthrough: tuple[type[BaseException], ...] = (),
) -> Restored:
    """Restore the newest usable checkpoint of a run, or exactly `step`.

    restore(step) reads the checkpoint (any exception counts as damage, except the `passthrough`
    types, which propagate: e.g. a model-config mismatch is the user's error, not damage).
    all_agree(ok) -> whether every process of a multi-process run says ok (identity with one
    process), so that all of them restore the same step. Raises CheckpointError (one line) when
    nothing is usable, or when `step` is given and is not usable.
    """
    steps = RunDir(run_dir).checkpoint_steps()
    if not steps:
        raise CheckpointError(f"{run_dir} has no complete checkpoint (no checkpoints/<step> folder)")
    if step is not None and step not in steps:
        raise CheckpointError(f"{run_dir} has no checkpoint at step {step} (have {', '.join(map(str, steps))})")
    skipped = []
    for candidate in [step] if step is not None else reversed(steps):
        status = check_step(run_dir, candidate, steps, hash_files)
        if all_agree(status.usable):
            try:
                value, failure = restore(candidate), None
            except passthrough:
                raise
            except Exception as err:  # orbax raises many types; keep the first line
                value, failure = None, f"cannot be restored: {_first_line(err)}"
            if all_agree(failure is None):
                return Restored(candidate, value, status, skipped)
            status = CheckpointStatus(
                candidate, status.path, "damaged", failure or "cannot be restored on another process"
            )
        elif status.usable:
            status = CheckpointStatus(candidate, status.path, "damaged", "found damaged by another process")
        if step is not None:
            raise CheckpointError(f"{status.describe()}; choose another step or omit --step for the newest usable one")
        skipped.append(status)
    found = "; ".join(f"{s.step} {s.state} ({s.reason})" for s in skipped)
    raise CheckpointError(f"no usable checkpoint in {RunDir(run_dir).checkpoints}: {found}")


class _FailedSaveRecords(logging.Filter):
    """Drops log records about a failed write under `directory` (orbax's and asyncio's tracebacks
    of one failed save, dozens of them): RunWriteError reports that failure in one line."""

    def __init__(self, directory: Path):
        super().__init__()
        self.marker = str(directory)

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += str(record.exc_info[1])
        return self.marker not in text


def _report_failed_saves_once(directory: Path) -> None:
    """Keep a failed save's echoes out of the output (RunWriteError reports it): orbax logs the
    failure from each of its threads (absl), asyncio logs the failed write tasks when they are
    collected, and tensorstore's late callbacks reach the event loop orbax closed after the save,
    each raising "Event loop is closed" through sys.unraisablehook."""
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_FailedSaveRecords(directory))
    previous = sys.unraisablehook
    if getattr(previous, "hnet_quiet_closed_loop", False):
        return

    def hook(unraisable):
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        previous(unraisable)

    hook.hnet_quiet_closed_loop = True
    sys.unraisablehook = hook


def _free_space(folder: Path) -> str | None:
    """Free space on the filesystem holding `folder` ("1.2 GiB"), None when it cannot be read."""
    try:
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    except OSError:
        return None
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def set_aside(run_dir: str | Path, step: int) -> Path:
    """Move RUN_DIR/checkpoints/<step> to RUN_DIR/skipped_checkpoints/<step>[.N]; -> the new path."""
    run = RunDir(run_dir)
    target = run.skipped_checkpoints / str(step)
    n = 1
    while target.exists():  # the same step skipped again: keep both
        target, n = run.skipped_checkpoints / f"{step}.{n}", n + 1
    target.parent.mkdir(exist_ok=True)
    os.rename(run.checkpoint(step), target)
    return target


# --------------------------------------------------------------------------------------------
# Saving and restoring with orbax
# --------------------------------------------------------------------------------------------


class Checkpointer:
    """Save and restore training checkpoints under RUN_DIR/checkpoints (async saves, manifests).

    primary: whether this process writes manifests, applies retention and moves skipped
    checkpoints aside (default: process 0). Every process of a run calls save/restore.
    """

    def __init__(self, run_dir: Path, keep: int = 3, async_save: bool = True, primary: bool | None = None):
        self.run_dir = Path(run_dir).absolute()
        self.directory = RunDir(self.run_dir).checkpoints
        self.keep = keep
        self.async_save = async_save
        self.primary = jax.process_index() == 0 if primary is None else primary
        # Retention is ours (after the manifest), so that damaged checkpoints never count or go.
        # cleanup_tmp_directories: a save interrupted by a kill left a temporary folder; it goes.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._checked: dict[int, str] = {}  # step -> "good"/"damaged", from a manifest written or verified here
        self._lock = threading.Lock()
        self._manifest_thread: threading.Thread | None = None
        self._saving: int | None = None  # the step of the save in flight (its failure may surface later)
        _report_failed_saves_once(self.directory)
        self._failure: BaseException | None = None  # a failed save seen by the manifest thread, for the main thread

    def latest_step(self) -> int | None:
        """The newest step saved (also one still being written) or found on disk."""
        return self.manager.latest_step()

    def path(self, step: int) -> Path:
        return self.directory / str(step)

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
        """Start saving (returns before the write finishes when async); `wait()` to block.

        Raises RunWriteError (one line: the step, the folder, the cause, the free space) when this
        save, or the previous one still in flight, cannot be written; the checkpoints committed
        before are intact, and a partial save is never listed (orbax commits by renaming).
        """
        self._join_manifest_thread()
        with self._failures_reported():
            self.manager.wait_until_finished()  # the previous save's failure, if any, belongs to its step
            self._raise_failure()
            self._saving = step
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data_state),
                    meta=ocp.args.JsonSave({**meta, "format_version": FORMAT_VERSION}),
                ),
                force=True,
            )
        if not self.primary:
            return
        if self.async_save:
            self._manifest_thread = threading.Thread(
                target=self._after_commit, args=(step,), name=f"hnet-manifest-{step}", daemon=True
            )
            self._manifest_thread.start()
        else:
            self._after_commit(step)

    def _after_commit(self, step: int) -> None:
        """Once orbax has committed `step`: write its manifest, then apply retention."""
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # the save failed: no manifest; the main thread reports it (_raise_failure)
            self._failure = err
            return
        folder = self.path(step)
        if not folder.is_dir():  # not committed (the save failed): never a manifest for a partial folder
            return
        try:
            write_manifest(folder)
            with self._lock:
                self._checked[step] = "good"
            self._apply_retention()
        except OSError as err:  # a full disk, say: the checkpoint stays, without a manifest
            print(f"warning: checkpoint {folder}: manifest or retention failed ({err})", file=sys.stderr)

    def _apply_retention(self) -> None:
        """Keep the newest `keep` good checkpoints; delete older good or unverified ones.

        Counting uses what this process wrote or verified (hashing each checkpoint at most once);
        a checkpoint is hashed again just before it would be deleted, so a damaged one never is.
        """
        steps = RunDir(self.run_dir).checkpoint_steps()
        good = 0
        for step in reversed(steps):
            if good < self.keep:
                with self._lock:
                    state = self._checked.get(step)
                if state is None:
                    state = check_step(self.run_dir, step, steps).state
                    if state in ("good", "damaged"):
                        with self._lock:
                            self._checked[step] = state
                good += state == "good"
            elif check_step(self.run_dir, step, steps).state in USABLE:
                shutil.rmtree(self.path(step))
                with self._lock:
                    self._checked.pop(step, None)

    def mark_good(self, step: int) -> None:
        """Record that `step` was verified good (e.g. on resume), so retention need not hash it again."""
        with self._lock:
            self._checked[step] = "good"

    def set_aside_newer_than(self, step: int) -> list[tuple[int, Path]]:
        """Move checkpoints newer than `step` (skipped on resume) to RUN_DIR/skipped_checkpoints.

        The resumed run saves those steps again, so their folders must make room; they are kept
        for inspection, never deleted. Only the primary process moves; -> [(step, new path)].
        Every process then calls reload() (after a barrier).
        """
        if not self.primary:
            return []
        return [(s, set_aside(self.run_dir, s)) for s in RunDir(self.run_dir).checkpoint_steps() if s > step]

    def reload(self) -> None:
        """Re-read the steps on disk (after set_aside_newer_than)."""
        self.manager.reload()

    def read_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """-> (state shaped and sharded like abstract_state, data-iterator state, meta).

        abstract_state: jax.ShapeDtypeStructs carrying the target NamedShardings.
        """
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], restored["data"], restored["meta"]

    def _join_manifest_thread(self) -> None:
        if self._manifest_thread is not None:
            self._manifest_thread.join()
            self._manifest_thread = None

    def wait(self) -> None:
        """Block until the last save is committed and its manifest written (RunWriteError if it failed)."""
        with self._failures_reported():
            self.manager.wait_until_finished()
            self._join_manifest_thread()
            self._raise_failure()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # already reported by wait(); closing must not raise a second error
                pass

    def _raise_failure(self) -> None:
        """Raise the failure of a save that the manifest thread saw first (orbax reports it once)."""
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    @contextlib.contextmanager
    def _failures_reported(self):
        """Turn a failed write of the save in flight into one RunWriteError line."""
        try:
            yield
        except Exception as err:
            step = self._saving
            self._saving = None
            committed = [s for s in RunDir(self.run_dir).checkpoint_steps() if s != step]
            free = _free_space(self.directory)
            raise RunWriteError(
                f"saving checkpoint step {step} into {self.directory} failed: {describe_write_failure(err)}"
                + (f" ({free} free there)" if free else "")
                + (
                    f"; the checkpoints saved before are intact (newest: step {committed[-1]})"
                    if committed
                    else "; no checkpoint was saved before it"
                )
                + "; make room and resume with the same command"
            ) from None


# --------------------------------------------------------------------------------------------
# python -m hnet.io.checkpoint verify RUN_DIR
# --------------------------------------------------------------------------------------------

EXIT_GOOD, EXIT_FALLBACK, EXIT_BAD_INPUT, EXIT_NONE_USABLE = 0, 1, 2, 3


def verify_main(run_dir: str) -> int:
    """Print one line per checkpoint (newest first) and return the exit code (see main's help)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return report(f"{run_dir} does not exist or is not a folder", EXIT_BAD_INPUT)
    statuses = survey(run_dir)
    if not statuses:
        return report(f"{run_dir} has no checkpoints (no checkpoints/<step> folder)", EXIT_BAD_INPUT)
    for status in statuses:
        print(f"{status.step:>10d}  {status.state:<10s}  {status.reason}")
    skipped = RunDir(run_dir).skipped_checkpoints
    if skipped.is_dir() and any(skipped.iterdir()):
        print(f"({sum(1 for _ in skipped.iterdir())} checkpoint(s) set aside by --resume in {skipped}, not checked)")
    usable = [s for s in statuses if s.usable]
    if statuses[0].state == "good":
        return EXIT_GOOD
    if usable:
        print(
            f"the newest checkpoint is {statuses[0].state}; a resume would use step {usable[0].step} "
            f"({usable[0].state})"
        )
        return EXIT_FALLBACK
    print("no usable checkpoint")
    return EXIT_NONE_USABLE


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hnet.io.checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Check the checkpoints of a training run against their manifests.",
        epilog="verify RUN_DIR prints each checkpoint (newest first) as good, damaged, incomplete or unverified\n"
        "with the reason. Exit codes: 0 the newest checkpoint is good; 1 it is not, but an older (or\n"
        "unverified) one is usable, and a resume falls back to it; 2 bad input (no such folder, no\n"
        "checkpoints); 3 no checkpoint is usable.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check every checkpoint of a run folder")
    verify.add_argument("run_dir", metavar="RUN_DIR")
    args = parser.parse_args(argv)
    return verify_main(args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
