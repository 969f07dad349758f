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
"""

from __future__ import annotations

import os

import jax

from hnet.config import ConfigError

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


def maybe_initialize(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, auto: bool = False, timeout_s: int = 300) -> bool:
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
    timeouts = {"initialization_timeout": timeout_s, "heartbeat_timeout_seconds": timeout_s,
                "shutdown_timeout_seconds": timeout_s}

    explicit = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if any(value is not None for value in explicit.values()) and not auto:
        missing = [flag for flag, value in explicit.items() if value is None]
        if missing:
            raise ConfigError(f"multi-process run: also need {', '.join(missing)} (or the JAX_* environment "
                              f"variables), or --distributed to detect the cluster")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ConfigError(f"multi-process run: need 0 <= process id < number of processes, got "
                              f"{process_id} and {num_processes}")
        if num_processes == 1:
            return False
        jax.distributed.initialize(coordinator, num_processes, process_id, **timeouts)
        return True
    if auto or in_slurm_step():
        # JAX fills in whatever is unset from the detected cluster.
        jax.distributed.initialize(coordinator, num_processes, process_id, **timeouts)
        return True
    return False
