"""Multi-process start-up: join the processes of one run with `jax.distributed.initialize`.

One process per host (or per GPU) runs the same `train.py`; all processes see all devices of the
run as one mesh, and each reads its own slice of the input. How a process learns its place:

- explicitly: `--coordinator HOST:PORT --num-processes N --process-id I` (train.py), or the
  environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID;
- a SLURM job step with more than one task (`srun`): detected here, and JAX reads the rest
  (coordinator = first node of the step, process id = SLURM_PROCID, one GPU per task);
- `--distributed` (or HNET_DISTRIBUTED=1): let JAX detect the cluster (Cloud TPU pod slices,
  SLURM, Open MPI, Kubernetes).

Otherwise the run is a single process and nothing is initialised.

A lost process. When a process dies, JAX's coordination service notices after `timeout_s`
without heartbeats and aborts the others with a C++ stack dump. Each process here also runs a
watchdog thread (PeerWatchdog) that beats through JAX's key-value store and watches the others'
beats: after `timeout_s / 2` of silence from a process, it prints one line, `error: process I of
N: process J sent no heartbeat ...; restart all processes with --resume ...`, and exits with
EXIT_PROCESS_LOST (3), before JAX would abort. A collective that fails outright (on CPU,
"connection closed by peer") is reported the same way by train.py. The one case left to JAX is
the loss of process 0 itself when its host closes the connections (a killed process): the
coordination service runs there, and the others abort at once with JAX's message.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time

import jax

from hnet.errors import ConfigError, report

EXIT_PROCESS_LOST = 3

_SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {value!r}") from None


def in_slurm_step() -> bool:
    """True inside an `srun` job step of more than one task (not a plain batch script)."""
    return all(var in os.environ for var in _SLURM_STEP_VARS) and int(os.environ["SLURM_NTASKS"]) > 1


def maybe_initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    auto: bool = False,
    timeout_s: int = 300,
) -> bool:
    """Initialise jax.distributed when this process is one of several; returns True if it did.

    Must run before anything touches a JAX device. Arguments override the environment.
    timeout_s bounds the wait for the other processes at start-up and their heartbeats.
    Raises ConfigError (one line) on incomplete or contradictory settings.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    auto = auto or os.environ.get("HNET_DISTRIBUTED", "") not in ("", "0")
    timeouts = {
        "initialization_timeout": timeout_s,
        "heartbeat_timeout_seconds": timeout_s,
        "shutdown_timeout_seconds": timeout_s,
    }

    explicit = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if any(value is not None for value in explicit.values()) and not auto:
        missing = [flag for flag, value in explicit.items() if value is None]
        if missing:
            raise ConfigError(
                f"multi-process run: also need {', '.join(missing)} (or the JAX_* environment "
                f"variables), or --distributed to detect the cluster"
            )
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ConfigError(
                f"multi-process run: need 0 <= process id < number of processes, got {process_id} and {num_processes}"
            )
        if num_processes == 1:
            return False
        jax.distributed.initialize(coordinator, num_processes, process_id, **timeouts)
        _start_watchdog(timeout_s)
        return True
    if auto or in_slurm_step():
        # JAX fills in whatever is unset from the detected cluster.
        jax.distributed.initialize(coordinator, num_processes, process_id, **timeouts)
        _start_watchdog(timeout_s)
        return True
    return False


def _cluster_state():
    """JAX's distributed state (client, process_id, num_processes): private, but the same in jax
    0.10 and 0.11; None if its layout ever changes (then there is no watchdog)."""
    from jax._src import distributed as jax_distributed

    state = getattr(jax_distributed, "global_state", None)
    client = getattr(state, "client", None)
    if client is None or not all(hasattr(client, name) for name in ("key_value_set", "key_value_dir_get")):
        return None
    return state


def _start_watchdog(timeout_s: float) -> None:
    state = _cluster_state()
    if state is None or state.num_processes < 2:
        return
    watchdog = PeerWatchdog(state.client, state.process_id, state.num_processes, silence_s=timeout_s / 2)
    watchdog.start()
    # Registered after JAX's own exit hook, so it runs first: a finished process says so before
    # it disconnects, and its silence afterwards is not taken for a death.
    atexit.register(watchdog.stop)


class PeerWatchdog(threading.Thread):
    """Beats for this process and watches the others' beats in JAX's key-value store.

    Key hnet/alive/<process id> holds a counter, or "done" once the process exits normally.
    A process whose counter has not moved for `silence_s` (or a coordinator that cannot be
    reached for as long) ends this one through exit_after_lost_process.
    """

    def __init__(self, client, process_id: int, num_processes: int, silence_s: float):
        super().__init__(name="hnet-peer-watchdog", daemon=True)
        self.client, self.process_id, self.num_processes = client, process_id, num_processes
        self.silence_s = silence_s
        self.interval_s = max(0.2, silence_s / 10)
        self._stopped = threading.Event()

    def _key(self, process: int) -> str:
        return f"hnet/alive/{process}"

    def run(self) -> None:
        beat = 0
        start = time.monotonic()
        last_value = {p: None for p in range(self.num_processes) if p != self.process_id}
        last_change = dict.fromkeys(last_value, start)
        last_contact = start
        while not self._stopped.wait(self.interval_s):
            now = time.monotonic()
            try:
                beat += 1
                self.client.key_value_set(self._key(self.process_id), str(beat), allow_overwrite=True)
                values = {key.rsplit("/", 1)[-1]: value for key, value in self.client.key_value_dir_get("hnet/alive/")}
                last_contact = now
            except Exception as err:  # the coordinator (process 0) is unreachable
                if self._stopped.is_set():
                    return
                if now - last_contact > self.silence_s:
                    lines = str(err).strip().splitlines() or [type(err).__name__]
                    exit_after_lost_process(
                        f"cannot reach the coordinator, process 0, for {now - last_contact:.0f} s ({lines[0][:160]})"
                    )
                continue
            for process in last_value:
                value = values.get(str(process))
                if value == "done":
                    continue
                if value != last_value[process]:
                    last_value[process], last_change[process] = value, now
                elif now - last_change[process] > self.silence_s:
                    exit_after_lost_process(
                        f"process {process} sent no heartbeat for {now - last_change[process]:.0f} s "
                        f"(it died, was preempted or hangs)"
                    )

    def stop(self) -> None:
        """On a normal exit: stop beating and tell the others this process is done, not dead."""
        self._stopped.set()
        self.join()
        try:
            self.client.key_value_set(self._key(self.process_id), "done", allow_overwrite=True)
        except Exception:  # the coordinator is gone already: nobody is left to watch
            pass


def exit_after_lost_process(what: str) -> None:
    """Print one line saying which process stops, why and what to do; exit EXIT_PROCESS_LOST.

    os._exit: a normal exit would wait in JAX's shutdown barrier for the lost process, then abort
    with a stack dump. A save in flight is lost; committed checkpoints are not, and a resume skips
    an interrupted one.
    """
    state = _cluster_state()
    process = f"process {state.process_id} of {state.num_processes}" if state is not None else "this process"
    sys.stdout.flush()
    os._exit(
        report(
            f"{process}: {what}; restart all processes with --resume to continue from the newest good checkpoint",
            EXIT_PROCESS_LOST,
        )
    )
