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
    CorpusWriter,
    DEFAULT_SHARD_BYTES,
    PrepareError,
    add_common_arguments,
    check_destination,
    check_fractions,
    format_summary,
    preparer_main,
    split_for_key,
)

READ_CHUNK = 1 << 20  # 1 MiB


def list_files(inputs: list[str | os.PathLike], glob: str = "*") -> list[Path]:
    """Expand files/folders into a file list: given files as they are, folders
    recursively (sorted, hidden entries skipped, names matching `glob`)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for name in filenames:
                    if not name.startswith(".") and fnmatch.fnmatch(name, glob):
                        found.append(Path(dirpath, name))
            files.extend(sorted(found, key=lambda p: p.relative_to(path).as_posix()))
        else:
            raise PrepareError(f"input {path} does not exist")
    return files


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
    """Write a text corpus to `out`; returns its meta dict. See the module doc."""
    check_destination(out, overwrite)
    explicit = bool(validation_files or test_files)
    if explicit and (validation_fraction or test_fraction):
        raise PrepareError("use either --validation/--test files or fractions, not both")
    validation_fraction = 0.05 if validation_fraction is None else validation_fraction
    test_fraction = 0.0 if test_fraction is None else test_fraction
    check_fractions(validation_fraction, test_fraction)

    train_files = list_files(inputs, glob)
    sources = [("train", f) for f in train_files]
    if explicit:
        sources += [("validation", f) for f in list_files(validation_files, glob)]
        sources += [("test", f) for f in list_files(test_files, glob)]
        splits = ["train", "validation"] + (["test"] if test_files else [])
    else:
        splits = ["train", "validation"] + (["test"] if test_fraction > 0 else [])
    if not train_files:
        raise PrepareError(f"no input files found in {', '.join(map(str, inputs))}")

    invalid = 0
    doc_index = 0  # over the hash-split inputs, counting every document produced
    with CorpusWriter(
        out,
        source=f"text:{','.join(str(i) for i in inputs)}",
        splits=splits,
        shard_bytes=shard_bytes,
        overwrite=overwrite,
    ) as writer:
        for split, path in sources:
            for doc in iter_documents(path, doc_separator):
                target = split
                if not explicit:
                    target = split_for_key(str(doc_index), validation_fraction, test_fraction)
                    doc_index += 1
                try:
                    doc.decode("utf-8")
                except UnicodeDecodeError:
                    invalid += 1
                    continue
                writer.add(target, doc)
    if verbose:
        print(format_summary(writer.meta, out))
        if invalid:
            print(f"  dropped {invalid} document(s) that are not valid UTF-8")
    return writer.meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="text files or folders (read recursively)")
    add_common_arguments(parser)
    parser.add_argument(
        "--doc-separator",
        help="split each file into documents on this string (escapes like \\n allowed); "
        "default: one document per file",
    )
    parser.add_argument(
        "--glob", default="*", help="file-name pattern for files inside folders (default '*')"
    )
    parser.add_argument(
        "--validation",
        action="append",
        default=[],
        metavar="FILE",
        help="file or folder whose documents form the validation split (repeatable)",
    )
    parser.add_argument(
        "--test",
        action="append",
        default=[],
        metavar="FILE",
        help="file or folder whose documents form the test split (repeatable)",
    )
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=None,
        help="fraction of documents hashed into 'validation' (default 0.05; "
        "not with --validation/--test)",
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=None,
        help="fraction of documents hashed into 'test' (default 0)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict:
    separator = parse_separator(args.doc_separator) if args.doc_separator is not None else None
    return prepare(
        args.inputs,
        args.out,
        doc_separator=separator,
        glob=args.glob,
        validation_files=args.validation,
        test_files=args.test,
        validation_fraction=args.validation_fraction,
        test_fraction=args.test_fraction,
        overwrite=args.overwrite,
        shard_bytes=args.shard_bytes,
    )


def main(argv=None) -> int:
    return preparer_main("data.text.prepare", __doc__, add_arguments, argv)


if __name__ == "__main__":
    sys.exit(main())
