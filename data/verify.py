"""Check a prepared corpus against the checksums in its meta.json (reads every shard).

    python -m data.verify CORPUS_DIR

Opening a corpus for training checks only sizes and document offsets (fast); this reads all the
data and compares each shard's sha256 with meta.json's "shard_sha256", and each split with its
"sha256". Corpora prepared before per-shard checksums existed are checked split by split (and the
line says so). Byte and token corpora alike. One line per split.

Exit codes: 0 every split matches; 1 a split does not match, or the folder is damaged (a shard
missing or of the wrong size); 2 not a prepared corpus (no folder, or no meta.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hnet.data import DataError, PreparedCorpus


def verify(path: str | Path) -> int:
    """Print one line per split of the corpus at `path`; -> the exit code (see the module doc)."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        print(f"error: {path} is not a prepared corpus (no meta.json)", file=sys.stderr)
        return 2
    try:
        corpus = PreparedCorpus(path)
    except DataError as err:  # the layout itself is broken: a missing shard, a wrong size
        print(f"damaged: {err}")
        return 1
    failed = False
    for name, info in corpus.splits.items():
        shards = f"{len(info.shards)} shard{'s' * (len(info.shards) != 1)}, {info.num_bytes:,d} bytes"
        try:
            corpus.verify_checksum(name)
        except (DataError, OSError) as err:
            print(f"{name:<12s} MISMATCH  {err}")
            failed = True
            continue
        checked = "sha256 per shard" if info.shard_sha256 is not None else \
            "split sha256 only: no per-shard checksum recorded"
        print(f"{name:<12s} ok        {shards} ({checked})")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.verify", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", metavar="CORPUS_DIR", help="a prepared corpus folder (with meta.json)")
    return verify(parser.parse_args(argv).corpus)


if __name__ == "__main__":
    sys.exit(main())
