"""The training run folder: every path in it, named once.

    RUN_DIR/config.json                  the resolved run config (written once, at the start)
    RUN_DIR/train.lock                   held by the training job while it runs (hnet.training.run_lock)
    RUN_DIR/metrics.jsonl                one JSON row per step, plus evaluation rows
    RUN_DIR/tensorboard/                 TensorBoard event files of those rows (hnet.training.tensorboard)
    RUN_DIR/compile_cache/               compiled programs a restart loads (hnet.training.compile_cache)
    RUN_DIR/profile/                     jax.profiler traces (train.py --profile, hnet.training.profiling)
    RUN_DIR/tokenizer.json               the BPE tokenizer of a token run
    RUN_DIR/checkpoints/<step>/          orbax checkpoints, each with manifest.json (hnet.io.checkpoint)
    RUN_DIR/skipped_checkpoints/<step>/  checkpoints a --resume could not use, moved aside
    RUN_DIR/curves_bpb.png, curves_chunks.png   plots (train.py --plot)

Every command (train.py, eval.py, generate.py, hnet.inference.export, hnet.io.checkpoint, the reports) finds
these files through RunDir.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    """A run folder (it may not exist yet)."""

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def lock(self) -> Path:
        """One training job per run folder: its holder, while it runs (hnet.training.run_lock)."""
        return self.path / "train.lock"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files (tensorboard --logdir RUN_DIR/tensorboard)."""
        return self.path / "tensorboard"

    @property
    def compile_cache(self) -> Path:
        """jax's persistent compilation cache of the run (train.compile_cache "run")."""
        return self.path / "compile_cache"

    @property
    def profile(self) -> Path:
        """jax.profiler traces: RUN_DIR/profile/plugins/profile/<time>/ (tensorboard --logdir RUN_DIR/profile)."""
        return self.path / "profile"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / str(step)

    @property
    def skipped_checkpoints(self) -> Path:
        return self.path / "skipped_checkpoints"

    def plot(self, name: str) -> Path:
        """curves_<name>.png"""
        return self.path / f"curves_{name}.png"

    def checkpoint_steps(self) -> list[int]:
        """Steps of the committed checkpoint folders, oldest first. Orbax saves into a temporary
        folder with another name and renames it when complete, so an unfinished save is never listed."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(int(p.name) for p in self.checkpoints.iterdir() if p.is_dir() and p.name.isdigit())

    def holds_run(self) -> bool:
        """Something of a run is already here (a new run must not write into it)."""
        return self.config.exists() or self.checkpoints.exists() or self.tokenizer.exists()
