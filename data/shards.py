"""Shared shard writer for prepared corpora (format "hnet-bytes-v1").

Every preparer (stdlib, text, jsonl, parquet, enwik8, pg_en) streams documents into a
`CorpusWriter`; nothing here knows where the documents come from.

A prepared corpus is a folder:

    meta.json                    {"format": "hnet-bytes-v1", "source": str,
                                  "splits": {split: {"shards": [...], "num_bytes": int,
                                                     "num_docs": int, "sha256": hex,
                                                     "shard_sha256": [hex, ...]}}}
    {split}_{i:05d}.bin          raw document bytes concatenated, no separators
    {split}_{i:05d}.idx.npy      int64 (num_docs_in_shard + 1,): document start offsets,
                                 first 0, last = size of the .bin

Documents never cross shards; a shard is closed before it would grow past
`shard_bytes` (a single document larger than that gets a shard of its own).
Empty documents are dropped. "sha256" covers a split's .bin contents in order,
"shard_sha256" each .bin file (corpora prepared before it was added lack it);
`python -m data.verify DIR` checks them. The corpus is written into a temporary folder next
to the destination and renamed into place at the end, so a crash never leaves a
half-written corpus under the destination name.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import secrets
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

FORMAT = "hnet-bytes-v1"  # a byte corpus (this writer)
TOKENS_FORMAT = "hnet-tokens-v1"  # a token corpus (hnet.io.tokenizer writes it with the same layout)
DEFAULT_SHARD_BYTES = 256 * 1024 * 1024  # 256 MiB


def cache_dir() -> Path:
    """Folder for prepared data made on demand: $HNET_DATA_DIR, or ~/.cache/hnet-jax."""
    return Path(os.environ.get("HNET_DATA_DIR") or os.path.join("~", ".cache", "hnet-jax")).expanduser()


class PrepareError(Exception):
    """A preparation failed for a reason the user can fix (one-line message)."""


# --------------------------------------------------------------------------
# Deterministic split assignment


def hash_bucket(key: str, buckets: int) -> int:
    """Stable bucket in [0, buckets) of a string key: int(sha256(key)[:8], 16) % buckets."""
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % buckets


def split_for_key(
    key: str,
    validation_fraction: float,
    test_fraction: float = 0.0,
    buckets: int = 1_000_000,
) -> str:
    """'validation', 'test' or 'train' for a key, by its stable hash bucket.

    bucket < validation_fraction * buckets -> validation; the next
    test_fraction * buckets buckets -> test; everything else -> train.
    """
    bucket = hash_bucket(key, buckets)
    if bucket < validation_fraction * buckets:
        return "validation"
    if bucket < (validation_fraction + test_fraction) * buckets:
        return "test"
    return "train"


# --------------------------------------------------------------------------
# Writer


class _SplitWriter:
    """Writes one split's shards; keeps only the current shard's offsets in memory."""

    def __init__(self, folder: Path, split: str, shard_bytes: int):
        self.folder = folder
        self.split = split
        self.shard_bytes = shard_bytes
        self.shards: list[str] = []
        self.num_bytes = 0
        self.num_docs = 0
        self.hasher = hashlib.sha256()  # all shards of the split, in order
        self.shard_sha256: list[str] = []
        self._shard_hasher = None  # the current shard
        self._file = None  # open .bin of the current shard
        self._offsets: list[int] = []  # current shard's doc start offsets + running end

    def _open_shard(self) -> None:
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self.shards.append(name)
        self._file = open(self.folder / name, "wb")
        self._shard_hasher = hashlib.sha256()
        self._offsets = [0]

    def _close_shard(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        self.shard_sha256.append(self._shard_hasher.hexdigest())
        idx_name = self.shards[-1][: -len(".bin")] + ".idx.npy"
        np.save(self.folder / idx_name, np.asarray(self._offsets, dtype=np.int64))

    def add_chunks(self, chunks: Iterable[bytes], size: int) -> None:
        """Append one document given as byte chunks whose total length is `size`."""
        if size <= 0:
            return  # empty documents are dropped
        current = self._offsets[-1] if self._file is not None else 0
        if self._file is None or (current > 0 and current + size > self.shard_bytes):
            self._close_shard()
            self._open_shard()
        written = 0
        for chunk in chunks:
            self._file.write(chunk)
            self.hasher.update(chunk)
            self._shard_hasher.update(chunk)
            written += len(chunk)
        if written != size:
            raise PrepareError(f"document announced as {size} bytes but {written} were read")
        self._offsets.append(self._offsets[-1] + size)
        self.num_bytes += size
        self.num_docs += 1

    def finish(self) -> dict:
        self._close_shard()
        return {
            "shards": self.shards,
            "num_bytes": self.num_bytes,
            "num_docs": self.num_docs,
            "sha256": self.hasher.hexdigest(),
            "shard_sha256": self.shard_sha256,
        }


def check_destination(out: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early (before any work) if `out` exists and overwrite is off."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise PrepareError(f"{out} already exists; pass --overwrite to replace it")
    return out


class CorpusWriter:
    """Streams documents into a prepared corpus folder, atomically.

    Usage:
        with CorpusWriter(out, source="...", splits=("train", "validation")) as w:
            w.add("train", b"document bytes")
        meta = w.meta   # written to out/meta.json

    On an exception inside the `with` block the temporary folder is removed and
    nothing appears at `out`.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        *,
        source: str,
        splits: Iterable[str] = ("train", "validation"),
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        overwrite: bool = False,
    ):
        if shard_bytes <= 0:
            raise PrepareError(f"shard_bytes must be positive, got {shard_bytes}")
        self.out = check_destination(out, overwrite)
        self.overwrite = overwrite
        self.source = source
        self.shard_bytes = shard_bytes
        self.meta: dict | None = None
        self.out.parent.mkdir(parents=True, exist_ok=True)
        # Same parent folder as the destination, so the final rename is atomic.
        self.tmp = make_sibling_dir(self.out, "tmp")
        # Splits listed up front are recorded even if they end up empty.
        self._splits: dict[str, _SplitWriter] = {}
        for split in splits:
            self._split(split)

    def _split(self, split: str) -> _SplitWriter:
        if split not in self._splits:
            self._splits[split] = _SplitWriter(self.tmp, split, self.shard_bytes)
        return self._splits[split]

    def add(self, split: str, doc: bytes) -> None:
        """Append one document (bytes) to a split; empty documents are dropped."""
        self._split(split).add_chunks((doc,), len(doc))

    def add_chunks(self, split: str, chunks: Iterable[bytes], size: int) -> None:
        """Append one large document streamed as chunks totalling `size` bytes."""
        self._split(split).add_chunks(chunks, size)

    def finish(self) -> dict:
        """Close all shards, write meta.json and move the folder into place."""
        splits = {name: w.finish() for name, w in self._splits.items()}
        if not any(s["num_docs"] for s in splits.values()):
            raise PrepareError(f"no documents found for {self.source}")
        meta = {"format": FORMAT, "source": self.source, "splits": splits}
        with open(self.tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        move_into_place(self.tmp, self.out, self.overwrite)
        self.meta = meta
        return meta

    def abort(self) -> None:
        for w in self._splits.values():
            if w._file is not None:
                w._file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "CorpusWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.finish()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def write_corpus(
    out: str | os.PathLike,
    documents: Iterable[tuple[str, bytes]],
    *,
    source: str,
    splits: Iterable[str],
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict:
    """Write (split, document bytes) pairs to a corpus at `out` and return its meta dict.

    Documents that are not valid UTF-8 are dropped and counted; empty ones are dropped. The
    whole corpus appears at `out` at once, or nothing does (CorpusWriter).
    """
    invalid = 0
    with CorpusWriter(out, source=source, splits=splits, shard_bytes=shard_bytes, overwrite=overwrite) as writer:
        for split, doc in documents:
            try:
                doc.decode("utf-8")
            except UnicodeDecodeError:
                invalid += 1
                continue
            writer.add(split, doc)
    if verbose:
        print(format_summary(writer.meta, out))
        if invalid:
            print(f"  dropped {invalid} document(s) that are not valid UTF-8")
    return writer.meta


def move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename tmp -> out. With overwrite, an existing `out` is first renamed aside
    and deleted afterwards (POSIX cannot rename over a non-empty folder, so there
    is a moment without `out`, but never a half-written one)."""
    if not out.exists():
        try:
            os.rename(tmp, out)
            return
        except OSError:
            if not out.exists():
                raise
            # Someone else created `out` meanwhile; fall through.
    if not overwrite:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PrepareError(f"{out} already exists; pass --overwrite to replace it")
    old = make_sibling_dir(out, "old")
    os.rename(out, old / out.name)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def make_sibling_dir(out: Path, tag: str) -> Path:
    """A new hidden folder next to `out` (created with the usual umask permissions,
    unlike tempfile.mkdtemp's 0700)."""
    while True:
        path = out.parent / f".{out.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


# --------------------------------------------------------------------------
# Inputs


def list_input_files(
    inputs: Iterable[str | os.PathLike], matches: Callable[[str], bool] = lambda name: True
) -> list[Path]:
    """Expand files and folders into the files to read: given files as they are, folders
    recursively (hidden entries skipped, file names for which `matches` is true), each folder's
    files sorted by relative POSIX path. A missing input is a PrepareError."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                found += [Path(dirpath, name) for name in filenames if not name.startswith(".") and matches(name)]
            files.extend(sorted(found, key=lambda p: p.relative_to(path).as_posix()))
        else:
            raise PrepareError(f"input {path} does not exist")
    return files


# --------------------------------------------------------------------------
# Verification (python -m data.verify; hnet.io.data.PreparedCorpus.verify_checksum)


def verify_split(folder: Path, split: str, info: dict) -> None:
    """Read every shard of a split (its meta.json entry `info`) and compare its sha256 with the
    recorded "shard_sha256" (when present), then the whole split with "sha256". Raises
    PrepareError naming the first shard that differs (or is missing)."""
    split_hasher = hashlib.sha256()
    recorded = info.get("shard_sha256")
    for i, shard in enumerate(info["shards"]):
        shard_hasher = hashlib.sha256()
        try:
            with open(folder / shard, "rb") as f:
                while chunk := f.read(1 << 24):
                    split_hasher.update(chunk)
                    shard_hasher.update(chunk)
        except OSError as err:
            raise PrepareError(f"{folder / shard}: cannot read ({err.strerror})") from None
        if recorded is not None and shard_hasher.hexdigest() != recorded[i]:
            raise PrepareError(
                f"{folder / shard}: sha256 {shard_hasher.hexdigest()[:16]}… does not match "
                f"meta.json {recorded[i][:16]}…"
            )
    if split_hasher.hexdigest() != info["sha256"]:
        raise PrepareError(
            f"{folder}: split '{split}' sha256 {split_hasher.hexdigest()} does not match meta.json {info['sha256']}"
        )


# --------------------------------------------------------------------------
# Reporting and shared CLI bits


def format_summary(meta: dict, out: str | os.PathLike) -> str:
    """Multi-line summary: documents, bytes and sha256 per split."""
    lines = [f"prepared {out} ({meta['source']})"]
    for name, s in meta["splits"].items():
        lines.append(
            f"  {name:<10} {s['num_docs']:>10,d} docs {s['num_bytes']:>15,d} bytes"
            f"  {len(s['shards'])} shard(s)  sha256 {s['sha256']}"
        )
        if s["num_docs"] == 0:
            lines.append(f"  warning: split '{name}' is empty")
    return "\n".join(lines)


def add_common_arguments(
    parser: argparse.ArgumentParser,
    *,
    out_required: bool = True,
    out_help: str = "destination folder of the prepared corpus",
) -> None:
    """--out, --overwrite and --shard-bytes, shared by every preparer."""
    parser.add_argument("--out", required=out_required, help=out_help)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination (atomically)")
    parser.add_argument(
        "--shard-bytes",
        type=int,
        default=DEFAULT_SHARD_BYTES,
        help=f"maximum bytes per shard (default {DEFAULT_SHARD_BYTES}, 256 MiB)",
    )


def add_fraction_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """--validation-fraction / --test-fraction for hash-based splits."""
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=0.05,
        help=f"fraction of {what} sent to 'validation' by a stable hash of the {what} index (default 0.05)",
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=0.0,
        help=f"fraction of {what} sent to 'test' the same way (default 0: no test split)",
    )


def check_fractions(validation_fraction: float, test_fraction: float) -> None:
    if not (0 <= validation_fraction and 0 <= test_fraction and validation_fraction + test_fraction < 1):
        raise PrepareError(
            "need 0 <= --validation-fraction, 0 <= --test-fraction and their sum < 1, "
            f"got {validation_fraction} and {test_fraction}"
        )


def fraction_splits(validation_fraction: float, test_fraction: float) -> tuple[str, ...]:
    """Splits a hash-split corpus declares: test only when asked for."""
    return ("train", "validation", "test") if test_fraction > 0 else ("train", "validation")


def run_cli(args: argparse.Namespace) -> int:
    """Call the preparer's `prepare` (set by its add_arguments as the `prepare` default) with the
    parsed arguments, whose names are prepare's parameters; a PrepareError becomes one line on
    stderr and exit code 2 (the code argparse also uses for bad arguments)."""
    options = vars(args).copy()
    prepare = options.pop("prepare")
    options.pop("source", None)  # the subcommand name of `python -m data.prepare SOURCE`
    try:
        prepare(**options)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def preparer_main(module: str, doc: str, add_arguments, argv=None) -> int:
    """The standalone command line of one preparer (`python -m data.<name>.prepare`)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))
