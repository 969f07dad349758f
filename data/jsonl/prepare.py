"""Prepare a corpus from JSON Lines files.

Each non-blank line is a JSON object; its --text-field (default "text") string,
encoded as UTF-8, is one document. Inputs may be plain (.jsonl/.json/anything),
gzip (.gz) or xz (.xz) compressed, decompressed on the fly; files are streamed
line by line. Folders are read recursively (sorted; *.jsonl, *.jsonl.gz,
*.jsonl.xz, *.json, *.json.gz, *.json.xz). Empty texts are dropped; texts that
cannot be encoded as UTF-8 (lone surrogates) are dropped and counted.

Split: a line goes to 'validation' by a stable hash of its line index (0-based,
over all lines of all inputs in order, blank lines included) with probability
--validation-fraction (default 0.05), likewise 'test' with --test-fraction.

    python -m data.prepare jsonl corpus.jsonl.gz --out data/corpus
    python -m data.jsonl.prepare shards/ --text-field content --out data/code
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import lzma
import os
import sys
from pathlib import Path
from typing import IO, Iterator

from data.shards import (
    DEFAULT_SHARD_BYTES,
    PrepareError,
    add_common_arguments,
    add_fraction_arguments,
    check_destination,
    check_fractions,
    fraction_splits,
    list_input_files,
    preparer_main,
    split_for_key,
    write_corpus,
)

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz", ".json", ".json.gz", ".json.xz")


def open_text(path: Path) -> IO[str]:
    """Open a possibly compressed file as UTF-8 text."""
    if path.name.endswith(".zst"):
        raise PrepareError(f"{path}: .zst is not supported; decompress it first (zstd -d)")
    if path.name.endswith(".gz"):
        raw = gzip.open(path, "rb")
    elif path.name.endswith(".xz"):
        raw = lzma.open(path, "rb")
    else:
        raw = open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8")


def iter_texts(path: Path, text_field: str) -> Iterator[str]:
    """The text field of every line of one file, in order ("" for blank lines)."""
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    yield ""
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PrepareError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise PrepareError(
                        f"{path}:{lineno}: no string field '{text_field}' (choose one with --text-field)"
                    )
                yield text
    except (UnicodeDecodeError, OSError, EOFError, lzma.LZMAError) as e:
        raise PrepareError(f"{path}: cannot read ({e})") from None


def prepare(
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    text_field: str = "text",
    validation_fraction: float = 0.05,
    test_fraction: float = 0.0,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    verbose: bool = True,
) -> dict:
    """Write a JSON Lines corpus to `out`; returns its meta dict. See the module doc."""
    check_destination(out, overwrite)
    check_fractions(validation_fraction, test_fraction)
    files = list_input_files(inputs, lambda name: name.endswith(SUFFIXES))
    if not files:
        raise PrepareError(f"no JSON Lines files found in {', '.join(map(str, inputs))}")

    def documents():
        line_index = 0  # every line counts, so a line's split does not depend on earlier lines' content
        for path in files:
            if verbose:
                print(f"reading {path}", flush=True)
            for text in iter_texts(path, text_field):
                split = split_for_key(str(line_index), validation_fraction, test_fraction)
                line_index += 1
                # Lone surrogates (JSON "\udc80") give bytes that are not UTF-8: write_corpus drops them.
                yield split, text.encode("utf-8", "surrogatepass")

    return write_corpus(
        out,
        documents(),
        source=f"jsonl:{','.join(str(i) for i in inputs)}:{text_field}",
        splits=fraction_splits(validation_fraction, test_fraction),
        shard_bytes=shard_bytes,
        overwrite=overwrite,
        verbose=verbose,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="JSON Lines files (.gz/.xz ok) or folders")
    add_common_arguments(parser)
    parser.add_argument("--text-field", default="text", help="JSON field holding the document (default 'text')")
    add_fraction_arguments(parser, "lines")
    parser.set_defaults(prepare=prepare)


def main(argv=None) -> int:
    return preparer_main("data.jsonl.prepare", __doc__, add_arguments, argv)


if __name__ == "__main__":
    sys.exit(main())
