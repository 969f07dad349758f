"""Prepare the Project Gutenberg English split (pg_en_train/valid/test).

Input: a folder (--data-dir, default ../shared/data next to the repository)
holding pg_en_train.txt.xz, pg_en_valid.txt.xz, pg_en_test.txt.xz and
pg_en_manifest.tsv.gz (see that folder's SOURCES.md). The manifest has one row
per book: split, offset, bytes, sha256, author, title; `offset`/`bytes` locate
the book in its split file, `bytes` includes the one trailing '\\n' that
separates books, and `sha256` covers the book without that byte.

Output: splits train, validation (from pg_en_valid) and test, one document per
book (the book's text without the separator), in manifest order. Every book's
sha256 is checked; a mismatch or a missing file is an error. The .xz files are
decompressed as a stream, one book at a time, in 1 MiB pieces.

--max-train-bytes N keeps only the first train books, in manifest order, whose
total stays within N bytes (at least one book), for quick runs; validation and
test are always complete.

    python -m data.prepare pg_en --out prepared/pg_en
    python -m data.prepare pg_en --data-dir /data/pg --out prepared/pg_en_2mb --max-train-bytes 2000000
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import lzma
import os
import sys
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

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MANIFEST = "pg_en_manifest.tsv.gz"
MANIFEST_COLUMNS = ["split", "offset", "bytes", "sha256", "author", "title"]
# manifest split name -> (file, prepared split name)
SPLITS = {
    "train": ("pg_en_train.txt.xz", "train"),
    "valid": ("pg_en_valid.txt.xz", "validation"),
    "test": ("pg_en_test.txt.xz", "test"),
}
READ_CHUNK = 1 << 20  # 1 MiB


def read_manifest(path: Path) -> dict[str, list[dict]]:
    """Manifest rows grouped by split (manifest order), offsets and sizes as ints."""
    if not path.is_file():
        raise PrepareError(f"{path} does not exist")
    books: dict[str, list[dict]] = {name: [] for name in SPLITS}
    try:
        with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, None)
            if header != MANIFEST_COLUMNS:
                raise PrepareError(f"{path}: expected columns {' '.join(MANIFEST_COLUMNS)}, got {header}")
            for line, row in enumerate(reader, start=2):
                if len(row) != len(MANIFEST_COLUMNS) or row[0] not in SPLITS:
                    raise PrepareError(f"{path}: line {line} is not a valid manifest row")
                book = dict(zip(MANIFEST_COLUMNS, row))
                book["offset"], book["bytes"] = int(book["offset"]), int(book["bytes"])
                books[row[0]].append(book)
    except (OSError, EOFError, ValueError) as err:
        raise PrepareError(f"{path}: cannot read the manifest ({err})") from None
    return books


def _read(f: IO[bytes], n: int, path: Path) -> Iterator[bytes]:
    """Yield the next n bytes of f in pieces of at most READ_CHUNK."""
    while n > 0:
        try:
            chunk = f.read(min(READ_CHUNK, n))
        except (lzma.LZMAError, EOFError) as err:
            raise PrepareError(f"{path}: corrupt xz stream ({err})") from None
        if not chunk:
            raise PrepareError(f"{path} ended early (truncated file, or the wrong manifest?)")
        n -= len(chunk)
        yield chunk


def _skip(f: IO[bytes], n: int, path: Path) -> None:
    for _ in _read(f, n, path):
        pass


def _describe(book: dict) -> str:
    return f"book '{book['title']}' by {book['author']} (offset {book['offset']:,d})"


def add_books(writer: CorpusWriter, path: Path, split: str, books: list[dict], check_end: bool) -> None:
    """Stream `books` (manifest order) from the .xz file `path` into `split`."""
    if not path.is_file():
        raise PrepareError(f"{path} does not exist")
    with lzma.open(path, "rb") as f:
        position = 0
        for book in books:
            if book["offset"] < position or book["bytes"] < 1:
                raise PrepareError(f"{path}: manifest offsets are not increasing at {_describe(book)}")
            _skip(f, book["offset"] - position, path)
            size = book["bytes"] - 1  # the book without its trailing '\n'
            hasher = hashlib.sha256()

            def chunks():
                for chunk in _read(f, size, path):
                    hasher.update(chunk)
                    yield chunk

            writer.add_chunks(split, chunks(), size)
            if hasher.hexdigest() != book["sha256"]:
                raise PrepareError(f"{path}: sha256 mismatch for {_describe(book)}")
            if b"".join(_read(f, 1, path)) != b"\n":
                raise PrepareError(f"{path}: {_describe(book)} is not followed by '\\n'")
            position = book["offset"] + book["bytes"]
        if check_end and f.read(1):
            raise PrepareError(f"{path} has bytes after the last book of the manifest")


def prepare(
    out: str | os.PathLike,
    *,
    data_dir: str | os.PathLike = DEFAULT_DATA_DIR,
    max_train_bytes: int | None = None,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    verbose: bool = True,
) -> dict:
    """Write the pg_en corpus (train/validation/test, one document per book) to `out`."""
    data_dir = Path(data_dir).expanduser()
    if max_train_bytes is not None and max_train_bytes <= 0:
        raise PrepareError(f"--max-train-bytes must be positive, got {max_train_bytes}")
    check_destination(out, overwrite)
    if not data_dir.is_dir():
        raise PrepareError(f"data folder {data_dir} does not exist (give --data-dir)")
    books = read_manifest(data_dir / MANIFEST)
    for name, (filename, _) in SPLITS.items():
        if not (data_dir / filename).is_file():
            raise PrepareError(f"{data_dir / filename} does not exist")
        if not books[name]:
            raise PrepareError(f"{data_dir / MANIFEST} lists no '{name}' books")
    capped = False
    if max_train_bytes is not None:
        kept, total = [], 0
        for book in books["train"]:
            if kept and total + book["bytes"] - 1 > max_train_bytes:
                capped = True
                break
            kept.append(book)
            total += book["bytes"] - 1
        books["train"] = kept

    source = f"pg_en:{data_dir}" + (f" (train capped at {max_train_bytes} bytes)" if capped else "")
    with CorpusWriter(
        out,
        source=source,
        splits=[split for _, split in SPLITS.values()],
        shard_bytes=shard_bytes,
        overwrite=overwrite,
    ) as writer:
        for name, (filename, split) in SPLITS.items():
            add_books(writer, data_dir / filename, split, books[name], check_end=not (name == "train" and capped))
    if verbose:
        print(format_summary(writer.meta, out))
    return writer.meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        default=str(DEFAULT_DATA_DIR),
        help=f"folder holding pg_en_*.txt.xz and {MANIFEST} (default {DEFAULT_DATA_DIR})",
    )
    add_common_arguments(parser)
    parser.add_argument(
        "--max-train-bytes",
        type=int,
        default=None,
        help="keep only the first train books whose total stays within this many bytes",
    )
    parser.set_defaults(prepare=prepare)


def main(argv=None) -> int:
    return preparer_main("data.pg_en.prepare", __doc__, add_arguments, argv)


if __name__ == "__main__":
    sys.exit(main())
