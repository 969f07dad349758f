"""Check a prepared corpus against the checksums in its meta.json (reads every shard).

    python -m data.verify CORPUS_DIR

Opening a corpus for training checks only sizes and document offsets (fast); this reads all the
data and compares each shard's sha256 with meta.json's "shard_sha256", and each split with its
"sha256". Corpora prepared before per-shard checksums existed are checked split by split (and the
line says so). Byte and token corpora alike. One line per split.

Exit codes: 0 every split matches; 1 a split does not match, or the folder is damaged (a shard
missing, meta.json unreadable); 2 not a prepared corpus (no folder, or no meta.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data.shards import PrepareError, verify_split


def verify(path: str | Path) -> int:
    """Print one line per split of the corpus at `path`; -> the exit code (see the module doc)."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        print(f"error: {path} is not a prepared corpus (no meta.json)", file=sys.stderr)
        return 2
    try:
        splits = json.loads(meta_path.read_text())["splits"]
        sizes = {name: (len(info["shards"]), int(info["num_bytes"])) for name, info in splits.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # UnicodeDecodeError is a ValueError
        print(f"damaged: {meta_path} cannot be read ({type(err).__name__})")
        return 1
    missing = [shard for info in splits.values() for shard in info["shards"] if not (path / shard).is_file()]
    if missing:  # the layout itself is broken
        print(
            f"damaged: {path / missing[0]} is missing"
            + (f" (and {len(missing) - 1} more shards)" if len(missing) > 1 else "")
        )
        return 1
    failed = False
    for name, info in splits.items():
        try:
            verify_split(path, name, info)
        except PrepareError as err:
            print(f"{name:<12s} MISMATCH  {err}")
            failed = True
            continue
        shards, num_bytes = sizes[name]
        checked = "sha256 per shard" if "shard_sha256" in info else "split sha256 only: no per-shard checksum recorded"
        print(f"{name:<12s} ok        {shards} shard{'s' * (shards != 1)}, {num_bytes:,d} bytes ({checked})")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data.verify",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("corpus", metavar="CORPUS_DIR", help="a prepared corpus folder (with meta.json)")
    return verify(parser.parse_args(argv).corpus)


if __name__ == "__main__":
    sys.exit(main())
