"""Orbax checkpoints of a training run: parameters, optimizer state, data-iterator state, metadata.

Layout inside a run folder:

    RUN_DIR/config.json              the full resolved run config (written once at the start)
    RUN_DIR/checkpoints/<step>/      one orbax checkpoint per saved step, the newest `keep` kept
        state/                       params, opt_state, step counters (arrays)
        data/                        the grain iterator state (JSON)
        meta/                        step, bytes seen, the run config (JSON)

Orbax writes each step into a temporary folder and renames it when complete, so a process killed
during a save leaves the previous checkpoints loadable.

Arrays are saved sharded: in a multi-process run every process calls `save` and writes the shards
it holds (process 0 writes the JSON items), so the run folder must be on a filesystem all hosts
share. `restore` reads them onto whatever shardings the abstract state asks for, so a checkpoint
saved on one mesh (e.g. 8 devices) resumes on another (e.g. 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

FORMAT_VERSION = 1


class Checkpointer:
    """Save and restore training checkpoints under RUN_DIR/checkpoints (async saves)."""

    def __init__(self, run_dir: Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def path(self, step: int) -> Path:
        return self.directory / str(step)

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
        """Start saving (returns before the write finishes when async); `wait()` to block."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave({**meta, "format_version": FORMAT_VERSION}),
            ),
            force=True,
        )

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

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
