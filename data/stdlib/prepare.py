"""Prepare the embedded default corpus: the Python standard library's own sources.

Every `.py` file under the running interpreter's stdlib folder
(`sysconfig.get_paths()["stdlib"]`) is one document, excluding anything under a
path component named site-packages, dist-packages, test, tests, idle_test or
__pycache__, and files that are not valid UTF-8. Files are taken in sorted
relative-POSIX-path order, so the result is deterministic for a given Python.

Split: validation if int(sha256(relative_path)[:8], 16) % 100 < 5 (~5%), else train.

    python -m data.prepare stdlib                 # into the default cache folder
    python -m data.stdlib.prepare --out DIR
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import sysconfig
from pathlib import Path

from data.shards import (
    DEFAULT_SHARD_BYTES,
    add_common_arguments,
    cache_dir,
    preparer_main,
    split_for_key,
    write_corpus,
)

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_stdlib_files(root: str | os.PathLike | None = None) -> list[str]:
    """Sorted relative POSIX paths of the stdlib `.py` files that make the corpus."""
    root = Path(root) if root is not None else stdlib_dir()
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune excluded folders so os.walk never descends into them.
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if name.endswith(".py"):
                paths.append((rel_dir / name).as_posix())
    return sorted(paths)


def default_corpus_dir() -> Path:
    """Cache folder of the default corpus: $HNET_DATA_DIR (or ~/.cache/hnet-jax)/stdlib-pyX.Y."""
    return cache_dir() / f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}"


def prepare(
    out: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    max_files: int | None = None,
    root: str | os.PathLike | None = None,
    verbose: bool = True,
) -> dict:
    """Write the stdlib corpus to `out` (default: default_corpus_dir()); returns its meta dict.

    max_files / root are for tests: take only the first `max_files` files of the
    sorted list, or read from another folder laid out like a stdlib.
    """
    out = default_corpus_dir() if out is None else out
    root = Path(root) if root is not None else stdlib_dir()
    files = list_stdlib_files(root)
    if max_files is not None:
        files = files[:max_files]
    source = f"stdlib:python{platform.python_version()}:{root}"
    # Each file goes to the split its path hashes to, so adding a file moves no other file.
    documents = ((split_for_key(rel, 0.05, buckets=100), (root / rel).read_bytes()) for rel in files)
    return write_corpus(
        out,
        documents,
        source=source,
        splits=("train", "validation"),
        shard_bytes=shard_bytes,
        overwrite=overwrite,
        verbose=verbose,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(
        parser,
        out_required=False,
        out_help="destination folder (default: $HNET_DATA_DIR or ~/.cache/hnet-jax, then stdlib-pyX.Y)",
    )
    parser.set_defaults(prepare=prepare)


def main(argv=None) -> int:
    return preparer_main("data.stdlib.prepare", __doc__, add_arguments, argv)


if __name__ == "__main__":
    sys.exit(main())
