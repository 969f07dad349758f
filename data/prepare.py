"""Prepare a byte corpus for hnet-jax (format "hnet-bytes-v1").

    python -m data.prepare stdlib [--out DIR]                     # default corpus: Python stdlib sources
    python -m data.prepare text FILES_OR_DIRS... --out DIR [--doc-separator SEP]
    python -m data.prepare jsonl FILES_OR_DIRS... --out DIR [--text-field text]
    python -m data.prepare parquet FILES_OR_DIRS... --out DIR [--text-column text]   # needs pyarrow
    python -m data.prepare enwik8 --input enwik8.zip --out DIR
    python -m data.prepare pg_en --out DIR [--data-dir DIR] [--max-train-bytes N]

`python -m data.prepare SOURCE --help` describes each source. Every source is
also runnable on its own, e.g. `python -m data.text.prepare ...`.

Output: a folder with meta.json and per split {split}_{i:05d}.bin (documents'
UTF-8 bytes concatenated) + {split}_{i:05d}.idx.npy (int64 document start
offsets, then the file size); see data/shards.py. The folder is written
atomically and an existing one is only replaced with --overwrite. Errors exit
with code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import sys

from data.enwik8 import prepare as enwik8
from data.jsonl import prepare as jsonl
from data.parquet import prepare as parquet
from data.pg_en import prepare as pg_en
from data.shards import run_cli
from data.stdlib import prepare as stdlib
from data.text import prepare as text

SOURCES = {
    "stdlib": stdlib,
    "text": text,
    "jsonl": jsonl,
    "parquet": parquet,
    "enwik8": enwik8,
    "pg_en": pg_en,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for name, module in SOURCES.items():
        sub = subparsers.add_parser(
            name,
            help=module.__doc__.strip().splitlines()[0],
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)  # also sets the module's `prepare` as the default handler
    return parser


def main(argv=None) -> int:
    return run_cli(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
