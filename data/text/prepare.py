"""Prepare a corpus from plain text files.

Inputs are files or folders; a folder is read recursively (hidden files and
folders skipped, files matching --glob), in sorted relative-path order.

Documents: by default each file is one document. With --doc-separator SEP each
file is split on SEP into documents (SEP itself is dropped); SEP takes Python
bytes escapes, e.g. --doc-separator '\\n\\n\\n' or --doc-separator '<|endoftext|>'.
Files are streamed, so a big file split into documents is never held in memory
whole. Empty documents and documents that are not valid UTF-8 are dropped
(the latter are counted and reported).

Splits:
  * default: a document goes to 'validation' by a stable hash of its index
    (0-based, over all documents of all inputs in order), with probability
    --validation-fraction (default 0.05), likewise 'test' with --test-fraction;
  * or explicit: --validation FILE / --test FILE (repeatable; files or folders)
    go entirely to that split and all inputs go to 'train' (no hashing).

    python -m data.prepare text books/ --out data/books
    python -m data.text.prepare big.txt --doc-separator '\\n\\n\\n' --out data/big
"""

from __future__ import annotations

import argparse
import codecs
import fnmatch
import os
import sys
from pathlib import Path
from typing import Iterator

from data.shards import (
    DEFAULT_SHARD_BYTES,
    PrepareError,
    add_common_arguments,
    check_destination,
    check_fractions,
    list_input_files,
    preparer_main,
    split_for_key,
    write_corpus,
)

READ_CHUNK = 1 << 20  # 1 MiB


def parse_separator(sep: str) -> bytes:
    """Command-line separator to bytes, interpreting escapes (\\n, \\t, \\xNN)."""
    value = codecs.escape_decode(sep.encode("utf-8"))[0]
    if not value:
        raise PrepareError("--doc-separator must not be empty")
    return value


def iter_documents(path: Path, separator: bytes | None) -> Iterator[bytes]:
    """Documents of one file: the whole file, or its pieces between separators."""
    if separator is None:
        yield path.read_bytes()
        return
    # buffer[start:] is the current, unfinished document; `search` is where the
    # next separator can begin (already-scanned bytes are not scanned again).
    buffer = bytearray()
    start = search = 0
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            buffer += chunk
            while (i := buffer.find(separator, search)) != -1:
                yield bytes(buffer[start:i])
                start = search = i + len(separator)
            search = max(start, len(buffer) - len(separator) + 1)
            if start:  # drop finished documents, once per chunk
                del buffer[:start]
                search -= start
                start = 0
    yield bytes(buffer[start:])


def prepare(
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    doc_separator: bytes | None = None,
    glob: str = "*",
    validation_files: list[str | os.PathLike] = (),
    test_files: list[str | os.PathLike] = (),
    validation_fraction: float | None = None,
    test_fraction: float | None = None,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    verbose: bool = True,
) -> dict:
    """Write a text corpus to `out`; returns its meta dict. See the module doc.

    doc_separator: bytes, or the command line's string with escapes (parse_separator)."""
    if isinstance(doc_separator, str):
        doc_separator = parse_separator(doc_separator)
    check_destination(out, overwrite)
    list_files = lambda items: list_input_files(items, lambda name: fnmatch.fnmatch(name, glob))
    explicit = bool(validation_files or test_files)
    if explicit and (validation_fraction or test_fraction):
        raise PrepareError("use either --validation/--test files or fractions, not both")
    validation_fraction = 0.05 if validation_fraction is None else validation_fraction
    test_fraction = 0.0 if test_fraction is None else test_fraction
    check_fractions(validation_fraction, test_fraction)

    train_files = list_files(inputs)
    sources = [("train", f) for f in train_files]
    if explicit:
        sources += [("validation", f) for f in list_files(validation_files)]
        sources += [("test", f) for f in list_files(test_files)]
        splits = ["train", "validation"] + (["test"] if test_files else [])
    else:
        splits = ["train", "validation"] + (["test"] if test_fraction > 0 else [])
    if not train_files:
        raise PrepareError(f"no input files found in {', '.join(map(str, inputs))}")

    def documents():
        doc_index = 0  # over the hash-split inputs, counting every document produced
        for split, path in sources:
            for doc in iter_documents(path, doc_separator):
                if not explicit:
                    split = split_for_key(str(doc_index), validation_fraction, test_fraction)
                    doc_index += 1
                yield split, doc

    return write_corpus(
        out,
        documents(),
        source=f"text:{','.join(str(i) for i in inputs)}",
        splits=splits,
        shard_bytes=shard_bytes,
        overwrite=overwrite,
        verbose=verbose,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="text files or folders (read recursively)")
    add_common_arguments(parser)
    parser.add_argument(
        "--doc-separator",
        help="split each file into documents on this string (escapes like \\n allowed); default: one document per file",
    )
    parser.add_argument("--glob", default="*", help="file-name pattern for files inside folders (default '*')")
    parser.add_argument(
        "--validation",
        dest="validation_files",
        action="append",
        default=[],
        metavar="FILE",
        help="file or folder whose documents form the validation split (repeatable)",
    )
    parser.add_argument(
        "--test",
        dest="test_files",
        action="append",
        default=[],
        metavar="FILE",
        help="file or folder whose documents form the test split (repeatable)",
    )
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=None,
        help="fraction of documents hashed into 'validation' (default 0.05; not with --validation/--test)",
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=None,
        help="fraction of documents hashed into 'test' (default 0)",
    )
    parser.set_defaults(prepare=prepare)


def main(argv=None) -> int:
    return preparer_main("data.text.prepare", __doc__, add_arguments, argv)


if __name__ == "__main__":
    sys.exit(main())
