"""jax's persistent compilation cache for a training run, so that a restart does not compile again.

A train step is one large XLA program, and on an H-Net with a slot ladder (hnet.slots) it holds
one compiled branch per ladder length: its first compilation is most of a run's start-up. jax can
write each compiled executable to a folder and load it back when another process compiles the same
program (the same HLO, compile options, devices and jax/XLA version); on a GPU XLA's autotuning
results go there too. `train.compile_cache` chooses the folder:

    "auto"  (the default) the folder jax is already given (JAX_COMPILATION_CACHE_DIR), else "run"
    "run"   RUN_DIR/compile_cache: a restart of the run (--resume) loads its programs
    "none"  no persistent cache
    PATH    a folder shared by runs (e.g. on a cluster's shared filesystem), relative to the cwd

In a multi-process run only process 0 writes (jax's rule) and every process reads, so the folder
must be one they all see, as the run folder already is. A damaged entry (a kill in the middle of a
write) only costs a compilation: jax warns and compiles. The cache is trusted code: do not point it
at a folder that others may write.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

from hnet.errors import RunWriteError, describe_write_failure
from hnet.io.run_dir import RunDir

AUTO, IN_RUN_DIR, OFF = "auto", "run", "none"


def cache_folder(setting: str, run_dir: RunDir) -> Path | None:
    """train.compile_cache -> the folder to use (None: no cache)."""
    if setting == OFF:
        return None
    if setting == AUTO:
        given = jax.config.jax_compilation_cache_dir
        return Path(given) if given else run_dir.compile_cache
    if setting == IN_RUN_DIR:
        return run_dir.compile_cache
    return Path(setting).expanduser()


@contextlib.contextmanager
def persistent_compile_cache(folder: Path | None):
    """Inside, jax writes the programs it compiles to `folder` and loads them from there; outside,
    the cache is as it was before (so one process can train several runs, as the tests do)."""
    if folder is None:
        yield
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunWriteError(f"train.compile_cache: cannot make {folder} ({describe_write_failure(err)})") from None
    previous = jax.config.jax_compilation_cache_dir
    # jax picks the folder up once, at its first compilation: reset so that this one is read.
    compilation_cache.set_cache_dir(str(folder))
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        compilation_cache.set_cache_dir(previous)
        compilation_cache.reset_cache()
