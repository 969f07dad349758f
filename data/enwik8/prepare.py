"""Prepare enwik8 (the first 10^8 bytes of an English Wikipedia XML dump).

Input: the `enwik8` file (exactly 100,000,000 bytes) or a .zip holding it
(the usual enwik8.zip). The classic byte split is used:

    train       bytes [0, 90M)
    validation  bytes [90M, 95M)
    test        bytes [95M, 100M)

Each split is ONE document, so the loader puts a single BOS at its very start
and packs the rest as one continuous stream (per-chunk BOS bytes would change
the bits-per-byte numbers compared with the literature). The bytes are copied
verbatim (no UTF-8 check: the 90M/95M cuts may fall inside a multi-byte
character), streamed in 1 MiB chunks.

    python -m data.prepare enwik8 --input enwik8.zip --out data/enwik8
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from data.shards import (
    CorpusWriter,
    DEFAULT_SHARD_BYTES,
    PrepareError,
    add_common_arguments,
    check_destination,
    format_summary,
    preparer_main,
)

ENWIK8_BYTES = 100_000_000
SPLITS = (("train", 0, 90_000_000), ("validation", 90_000_000, 95_000_000), ("test", 95_000_000, 100_000_000))
READ_CHUNK = 1 << 20


@contextmanager
def open_enwik8(path: Path) -> Iterator[IO[bytes]]:
    """Binary stream of enwik8 from the raw file or from a .zip holding it;
    checks the size first."""
    if not path.is_file():
        raise PrepareError(f"{path} does not exist")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if Path(n).name == "enwik8"]
            if not names:
                raise PrepareError(f"{path}: no file named 'enwik8' in the archive")
            size = archive.getinfo(names[0]).file_size
            _check_size(path, size)
            with archive.open(names[0]) as f:
                yield f
    else:
        _check_size(path, path.stat().st_size)
        with open(path, "rb") as f:
            yield f


def _check_size(path: Path, size: int) -> None:
    if size != ENWIK8_BYTES:
        raise PrepareError(f"{path}: enwik8 must be exactly {ENWIK8_BYTES:,d} bytes, got {size:,d}")


def _read_exactly(f: IO[bytes], n: int) -> Iterator[bytes]:
    """Yield chunks of the next n bytes of f."""
    while n > 0:
        chunk = f.read(min(READ_CHUNK, n))
        if not chunk:
            raise PrepareError("enwik8 ended early (truncated file?)")
        n -= len(chunk)
        yield chunk


def prepare(
    input: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    verbose: bool = True,
) -> dict:
    """Write the enwik8 corpus (train/validation/test, one document each) to `out`."""
    input_path = Path(input).expanduser()
    check_destination(out, overwrite)
    with (
        open_enwik8(input_path) as f,
        CorpusWriter(
            out,
            source=f"enwik8:{input_path}",
            splits=[name for name, _, _ in SPLITS],
            shard_bytes=shard_bytes,
            overwrite=overwrite,
        ) as writer,
    ):
        for name, begin, end in SPLITS:
            writer.add_chunks(name, _read_exactly(f, end - begin), end - begin)
    if verbose:
        print(format_summary(writer.meta, out))
    return writer.meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="path to enwik8 (100,000,000 bytes) or enwik8.zip")
    add_common_arguments(parser)
    parser.set_defaults(prepare=prepare)


def main(argv=None) -> int:
    return preparer_main("data.enwik8.prepare", __doc__, add_arguments, argv)


if __name__ == "__main__":
    sys.exit(main())
