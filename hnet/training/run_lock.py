"""One training job per run folder: RUN_DIR/train.lock (RunDir.lock), held for the job's whole life.

The lock file names its holder (host, process id, start time) as JSON and is created atomically
(O_CREAT | O_EXCL), so of two jobs started on one folder exactly one gets it; the other stops with
one error line naming the holder and writes nothing. The holder refreshes the file's modification
time every HEARTBEAT_S seconds and removes it when it exits (also after an error or a signal).

A lock whose holder is gone is taken over with one warning line:
- same host: no process with that id, or one that started at another time (the id was reused),
  or the machine rebooted since;
- another host: no heartbeat for STALE_S seconds (the holder's host cannot be asked directly).
Only a training job takes the lock (process 0 of a multi-process run); eval.py, generate.py and
export only read a run folder and never need it.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from hnet.errors import RunError

HEARTBEAT_S = 30.0
STALE_S = 300.0  # another host's lock with no heartbeat for this long is taken over


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _describe(holder: dict) -> str:
    started = datetime.datetime.fromtimestamp(holder.get("started", 0), datetime.timezone.utc)
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {started:%Y-%m-%d %H:%M:%S} UTC"


class RunLock:
    """The lock of one run folder, held by this process (`acquire`, then `release`)."""

    def __init__(self, path: Path, holder: dict):
        self.path, self.holder = path, holder
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="hnet-run-lock", daemon=True)

    @classmethod
    def acquire(cls, path: Path, warn=lambda message: print(message, file=sys.stderr)) -> "RunLock":
        """Take the lock file `path` (RunDir.lock; its folder is made if needed) or raise RunError
        naming its holder."""
        run_dir = path.parent
        run_dir.mkdir(parents=True, exist_ok=True)
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "process_start": _process_start(os.getpid()),
            "boot_id": _boot_id(),
            "token": uuid.uuid4().hex,
        }
        lock = cls(path, holder)
        if not lock._create():
            current = lock._read()
            if current is not None and lock._alive(current):
                raise RunError(
                    f"{run_dir} is in use by another training job ({_describe(current)}; lock {path}); "
                    f"wait for it to end or stop it"
                )
            what = (
                "cannot be read" if current is None else f"was held by {_describe(current)}, which is no longer running"
            )
            warn(f"warning: {path} {what}; taking it over")
            lock._take_over()
        lock._heartbeat.start()
        return lock

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.holder, f)
        return True

    def _read(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _alive(self, holder: dict) -> bool:
        """Whether the holder of a lock may still be running (see the module docstring)."""
        if holder.get("host") == socket.gethostname():
            if holder.get("boot_id") is not None and holder.get("boot_id") != _boot_id():
                return False
            pid = holder.get("pid")
            if not isinstance(pid, int) or not _pid_alive(pid):
                return False
            start = _process_start(pid)
            return start is None or holder.get("process_start") in (None, start)
        try:
            return time.time() - self.path.stat().st_mtime < STALE_S
        except OSError:
            return False

    def _take_over(self) -> None:
        """Replace a dead holder's lock with ours, atomically; if another job replaced it at the
        same moment, the one whose lock stayed keeps it and the other stops."""
        temporary = self.path.with_name(f".{self.path.name}.{self.holder['token']}")
        temporary.write_text(json.dumps(self.holder))
        os.replace(temporary, self.path)
        time.sleep(0.2)
        current = self._read()
        if current is None or current.get("token") != self.holder["token"]:
            raise RunError(
                f"{self.path.parent} was taken over by another training job at the same moment "
                f"({_describe(current or {})}); it holds the run now"
            )

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # the folder is gone or unwritable: the run itself reports what failed
                pass

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        current = self._read()
        if current is not None and current.get("token") == self.holder["token"]:
            try:
                self.path.unlink()
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
