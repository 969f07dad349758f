"""Agreement between the processes of a multi-process run, for the training loop and restores.

Every helper is the identity (or does nothing) with one process, so single-host code pays nothing.
The start-up of a multi-process run (jax.distributed, the peer watchdog) is hnet/parallel/distributed.py.
"""

from __future__ import annotations

import jax
import numpy as np


def sum_over_processes(local: np.ndarray) -> np.ndarray:
    """Element-wise sum of a small host array over all processes (identity with one process)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local)).sum(axis=0)


def all_agree(ok: bool) -> bool:
    """True iff `ok` is True on every process (identity with one process)."""
    return int(sum_over_processes(np.array([0 if ok else 1], dtype=np.int64))[0]) == 0


def any_process(flag: bool) -> bool:
    """True iff `flag` is True on some process (identity with one process)."""
    return bool(sum_over_processes(np.array([flag], dtype=np.int64))[0])


def stop_agreed(signal_name: str | None, at_sync_point: bool) -> bool:
    """Whether to stop after this step, the same answer on every process.

    One process: as soon as a signal arrived. Several: only at sync points (log steps), where the
    processes compare flags, so that all of them stop at the same step and save together.
    """
    if jax.process_count() == 1:
        return signal_name is not None
    return at_sync_point and any_process(signal_name is not None)


def barrier(name: str) -> None:
    """Wait until every process gets here (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
