"""Run by tests/parallel/test_sharding.py, twice, as the two processes of one jax.distributed run on
127.0.0.1: process 1 dies abruptly after both have joined; process 0 waits (as if in a long step)
and is expected to report the loss in one line and exit 3 (hnet/parallel/distributed.py).

    python tests/parallel/peer_loss_worker.py PROCESS_ID PORT TIMEOUT_S
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hnet.parallel import distributed  # noqa: E402


def main(process_id: int, port: int, timeout_s: int) -> None:
    distributed.maybe_initialize(f"127.0.0.1:{port}", 2, process_id, timeout_s=timeout_s)
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("both joined")
    if process_id == 1:
        os._exit(1)  # killed: no shutdown, no goodbye
    time.sleep(6 * timeout_s)  # JAX itself would abort this process after timeout_s
    print("still running")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
