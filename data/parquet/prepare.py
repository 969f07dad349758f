"""Prepare a corpus from Parquet files with a text column (e.g. FineWeb-Edu shards).

Needs pyarrow (`pip install pyarrow`). Files are read one record batch at a time
(only the text column), so memory stays bounded whatever the corpus size.
Folders are read recursively (sorted, *.parquet). Each row's --text-column
(default "text") string is one document; null and empty texts are dropped.

Split: a row goes to 'validation' by a stable hash of its row index (0-based,
over all rows of all inputs in order) with probability --validation-fraction
(default 0.05), likewise 'test' with --test-fraction. FineWeb-Edu has no
official validation split, hence the hashing.

    python -m data.prepare parquet fineweb-edu/sample/10BT/ --out data/fineweb-edu-10BT
"""

from __future__ import annotations

import argparse
import os
import sys

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

BATCH_ROWS = 1024  # rows per record batch read from a file


def import_pyarrow_parquet():
    """pyarrow.parquet, or a one-line PrepareError if pyarrow is missing."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PrepareError("reading Parquet needs pyarrow, which is not installed: pip install pyarrow") from None
    return pq


def prepare(
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    text_column: str = "text",
    validation_fraction: float = 0.05,
    test_fraction: float = 0.0,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    verbose: bool = True,
) -> dict:
    """Write a Parquet text corpus to `out`; returns its meta dict. See the module doc."""
    pq = import_pyarrow_parquet()
    check_destination(out, overwrite)
    check_fractions(validation_fraction, test_fraction)
    files = list_input_files(inputs, lambda name: name.endswith(".parquet"))
    if not files:
        raise PrepareError(f"no .parquet files found in {', '.join(map(str, inputs))}")

    def documents():
        row_index = 0  # every row counts, null ones too
        for n, path in enumerate(files, start=1):
            try:
                parquet = pq.ParquetFile(path)
            except Exception as e:  # pyarrow raises its own error types
                raise PrepareError(f"{path}: cannot read as Parquet ({e})") from None
            if text_column not in parquet.schema_arrow.names:
                raise PrepareError(
                    f"{path}: no column '{text_column}' (has {', '.join(parquet.schema_arrow.names)};"
                    " choose one with --text-column)"
                )
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=[text_column]):
                for text in batch.column(0).to_pylist():
                    split = split_for_key(str(row_index), validation_fraction, test_fraction)
                    row_index += 1
                    if text:  # None (null) and "" are dropped
                        yield split, text.encode("utf-8")
            if verbose:
                print(f"[{n}/{len(files)}] {path}: {row_index:,d} rows so far", flush=True)

    return write_corpus(
        out,
        documents(),
        source=f"parquet:{','.join(str(i) for i in inputs)}:{text_column}",
        splits=fraction_splits(validation_fraction, test_fraction),
        shard_bytes=shard_bytes,
        overwrite=overwrite,
        verbose=verbose,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="Parquet files or folders (read recursively)")
    add_common_arguments(parser)
    parser.add_argument("--text-column", default="text", help="column holding the document (default 'text')")
    add_fraction_arguments(parser, "rows")
    parser.set_defaults(prepare=prepare)


def main(argv=None) -> int:
    return preparer_main("data.parquet.prepare", __doc__, add_arguments, argv)


if __name__ == "__main__":
    sys.exit(main())
