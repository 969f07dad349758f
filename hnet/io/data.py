"""Data loading: prepared corpora (bytes or BPE tokens), packing, grain pipelines.

A prepared corpus (format "hnet-bytes-v1", written by `python -m data.prepare`)
is a folder with meta.json and, per split, shards `{split}_{i:05d}.bin` (document
bytes concatenated) + `{split}_{i:05d}.idx.npy` (int64 document start offsets,
then the file size). See data/shards.py.

A token corpus (format "hnet-tokens-v1", written by hnet.io.tokenizer.tokenize_corpus)
is the same layout over token ids instead of bytes: the .bin files hold uint16
(or uint32) ids, the offsets count tokens, and meta.json adds "dtype", "bos_id",
"vocab_size" and per split "num_tokens" next to "num_bytes" (text bytes). Its
token_bytes.npy gives the bytes each id decodes to. Everything below works on
"elements" (a byte, or a token id) and treats both formats alike.

Packing. Within a shard the element stream is

    BOS doc0 BOS doc1 BOS doc2 ...          (one BOS element before each document)

(in a byte corpus BOS_ID = 254, which never occurs in valid UTF-8, so it is
unambiguous in text corpora; a token corpus uses its tokenizer's BOS id) and, for
a sequence length L, sequence j of the shard is the window of stream positions
[j*L, j*L + L + 1): L + 1 elements, consecutive windows overlapping by one, so
inputs = window[:-1] and targets = window[1:] cover every stream position
exactly once as a target. The final partial window of each shard is dropped (at
most L stream positions per shard). Sequences are numbered globally,
shard-major. A window is built from the .idx offsets with two np.searchsorted
calls and one contiguous read of the memory-mapped .bin: O(log docs + L).

Bits per byte. Every target stands for a number of text bytes,
`corpus.bytes_per_id[target]`: 1 for every byte, and a token's decoded length
for a token; BOS counts as one byte in both formats (it is one element of the
byte stream), so a byte model and a token model scored over the same documents
divide by the same number of bytes.

Training pipeline (`make_dataset`): grain MapDataset
    source -> shuffle(seed) -> repeat(num_epochs) -> process slice -> batch -> to dict
    -> to_iter_dataset (thread prefetch).
Shuffling is a global permutation of all sequences, redrawn every epoch with
seed + epoch (grain's ShuffleMapDataset), so it is deterministic given the seed.
Process p of P then takes every P-th element of that (repeated) stream,
i.e. positions p, p + P, p + 2P, ...; so P processes with per-process batch B
see, step by step, the same global batch as one process with batch P*B.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from data.shards import FORMAT, TOKENS_FORMAT, PrepareError, verify_split
from data.stdlib import prepare as stdlib_prepare
from hnet.errors import DataError
from hnet.vocab import BOS_ID, BYTE_VOCAB_SIZE

if TYPE_CHECKING:  # grain is imported only where the training pipeline is built
    import grain

TOKEN_DTYPES = ("uint16", "uint32")  # element types a token corpus may use


# --------------------------------------------------------------------------
# Prepared corpus


@dataclass(frozen=True)
class SplitInfo:
    """One split as described by meta.json (checked against the shard files)."""

    name: str
    shards: tuple[str, ...]  # .bin file names, in order
    num_bytes: int  # text bytes of the documents
    num_docs: int
    sha256: str  # of the .bin contents, in order
    num_tokens: int  # elements in the shards: bytes (= num_bytes), or token ids
    shard_sha256: tuple[str, ...] | None  # of each .bin file; None in corpora prepared before it


class PreparedCorpus:
    """A prepared corpus folder (bytes or tokens, see the module doc), opened lazily.

    Opening reads meta.json and every shard's small .idx.npy, and checks them
    against each other and the .bin sizes (raising DataError on any mismatch);
    the .bin files are only memory-mapped when first used, never read whole.

    Attributes: `dtype` of the elements (uint8 for bytes), `bos_id` (put before
    each document by packing), `vocab_size` and `bytes_per_id` (int64
    (vocab_size,), see the module doc).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise DataError(f"prepared corpus folder {self.path} does not exist")
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{meta_path} is missing: not a prepared corpus")
        try:
            meta = json.loads(meta_path.read_text())
            fmt = meta.get("format")
            splits = meta["splits"]
            if fmt not in (FORMAT, TOKENS_FORMAT):
                raise DataError(f"{meta_path} has format {fmt!r}, expected {FORMAT!r} or {TOKENS_FORMAT!r}")
            self.source: str = str(meta.get("source", ""))
            self.is_tokens = fmt == TOKENS_FORMAT
            self.splits: dict[str, SplitInfo] = {
                name: SplitInfo(
                    name=name,
                    shards=tuple(s["shards"]),
                    num_bytes=int(s["num_bytes"]),
                    num_docs=int(s["num_docs"]),
                    sha256=str(s["sha256"]),
                    num_tokens=int(s["num_tokens"] if self.is_tokens else s["num_bytes"]),
                    shard_sha256=tuple(map(str, s["shard_sha256"])) if "shard_sha256" in s else None,
                )
                for name, s in splits.items()
            }
            for name, info in self.splits.items():
                if info.shard_sha256 is not None and len(info.shard_sha256) != len(info.shards):
                    raise DataError(
                        f"{meta_path}: split '{name}' lists {len(info.shards)} shards but "
                        f"{len(info.shard_sha256)} shard checksums"
                    )
            if self.is_tokens:
                if meta["dtype"] not in TOKEN_DTYPES:
                    raise DataError(f"{meta_path}: dtype {meta['dtype']!r} is not one of {TOKEN_DTYPES}")
                self.dtype = np.dtype(meta["dtype"])
                self.bos_id, self.vocab_size = int(meta["bos_id"]), int(meta["vocab_size"])
            else:
                self.dtype, self.bos_id, self.vocab_size = np.dtype(np.uint8), BOS_ID, BYTE_VOCAB_SIZE
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{meta_path} cannot be parsed ({type(e).__name__}: {e})") from None
        self.bytes_per_id = self._load_bytes_per_id()
        # offsets[split][i]: int64 (docs_in_shard + 1,) document start offsets of shard i.
        self._offsets: dict[str, list[np.ndarray]] = {
            name: [self._load_offsets(name, shard) for shard in info.shards] for name, info in self.splits.items()
        }
        unit = "tokens" if self.is_tokens else "bytes"
        for name, info in self.splits.items():
            num_tokens = sum(int(o[-1]) for o in self._offsets[name])
            num_docs = sum(len(o) - 1 for o in self._offsets[name])
            if (num_tokens, num_docs) != (info.num_tokens, info.num_docs):
                raise DataError(
                    f"{self.path}: split '{name}' shards hold {num_tokens} {unit} in "
                    f"{num_docs} docs but meta.json says {info.num_tokens} {unit} in "
                    f"{info.num_docs} docs"
                )
        self._memmaps: dict[tuple[str, int], np.memmap] = {}

    def _load_bytes_per_id(self) -> np.ndarray:
        """int64 (vocab_size,): bytes each target id stands for (BOS: 1; see the module doc)."""
        if not self.is_tokens:
            return np.ones(256, dtype=np.int64)
        path = self.path / "token_bytes.npy"
        try:
            table = np.load(path, allow_pickle=False).astype(np.int64)
        except (ValueError, OSError) as e:
            raise DataError(f"token byte lengths {path} cannot be read ({e})") from None
        if table.shape != (self.vocab_size,) or not 0 <= self.bos_id < self.vocab_size:
            raise DataError(f"{path}: expected {self.vocab_size} byte lengths and a BOS id below that")
        table[self.bos_id] = 1
        return table

    def _load_offsets(self, split: str, shard: str) -> np.ndarray:
        """Load and check one shard's .idx.npy against its .bin."""
        bin_path = self.path / shard
        idx_path = self.path / (shard.removesuffix(".bin") + ".idx.npy")
        for p in (bin_path, idx_path):
            if not p.is_file():
                raise DataError(f"shard file {p} of split '{split}' is missing")
        try:
            offsets = np.load(idx_path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"shard index {idx_path} cannot be read ({e})") from None
        if offsets.ndim != 1 or offsets.dtype.kind not in "iu" or len(offsets) < 2:
            raise DataError(f"shard index {idx_path} is not a 1-D integer array of >= 2 offsets")
        offsets = offsets.astype(np.int64)
        size = bin_path.stat().st_size
        if offsets[0] != 0:
            raise DataError(f"shard index {idx_path} does not start at offset 0")
        if np.any(np.diff(offsets) <= 0):
            raise DataError(f"shard index {idx_path} offsets are not strictly increasing")
        if offsets[-1] * self.dtype.itemsize != size:
            raise DataError(
                f"shard index {idx_path} ends at {offsets[-1]} elements of {self.dtype.itemsize} "
                f"byte(s) but {bin_path.name} has size {size}"
            )
        return offsets

    def split_info(self, split: str) -> SplitInfo:
        if split not in self.splits:
            raise DataError(f"{self.path} has no split '{split}' (has {', '.join(self.splits) or 'none'})")
        return self.splits[split]

    def offsets(self, split: str) -> list[np.ndarray]:
        """Per shard, int64 (docs_in_shard + 1,) document start offsets (in elements)."""
        self.split_info(split)
        return self._offsets[split]

    def shard_data(self, split: str, i: int) -> np.memmap:
        """Read-only memory map of shard i of a split, (elements,) of `dtype` (opened on first use)."""
        key = (split, i)
        if key not in self._memmaps:
            shard = self.split_info(split).shards[i]
            self._memmaps[key] = np.memmap(self.path / shard, dtype=self.dtype, mode="r")
        return self._memmaps[key]

    def documents(self, split: str, shard: int | None = None) -> Iterator[np.ndarray]:
        """The documents of a split (or of one of its shards), in order, as memory-mapped views."""
        shards = range(len(self.split_info(split).shards)) if shard is None else [shard]
        for i in shards:
            data, offsets = self.shard_data(split, i), self._offsets[split][i]
            for begin, end in zip(offsets[:-1], offsets[1:]):
                yield data[begin:end]

    def verify_checksum(self, split: str) -> None:
        """Read every shard of a split and compare its sha256 with meta.json (slow: reads it all;
        data.shards.verify_split). Raises DataError naming the first shard that differs. Opening
        a corpus never does this (it checks sizes and offsets only)."""
        info = self.split_info(split)
        try:
            verify_split(
                self.path, split, {"shards": info.shards, "sha256": info.sha256, "shard_sha256": info.shard_sha256}
            )
        except PrepareError as err:
            raise DataError(str(err)) from None

    def __getstate__(self) -> dict:
        # Memory maps would pickle as full copies of the data; reopen them instead.
        state = self.__dict__.copy()
        state["_memmaps"] = {}
        return state

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n}={s.num_bytes:,d}B/{s.num_docs:,d}docs" for n, s in self.splits.items())
        return f"PreparedCorpus({str(self.path)!r}: {sizes})"


def _open(corpus: PreparedCorpus | str | os.PathLike) -> PreparedCorpus:
    return corpus if isinstance(corpus, PreparedCorpus) else PreparedCorpus(corpus)


# --------------------------------------------------------------------------
# Packing


class PackedSequences:
    """Random-access source of packed windows: item i is (seq_len + 1,) of the corpus dtype.

    Grain-compatible (`__len__`, `__getitem__`). See the module doc for the
    layout; nothing per byte is precomputed, only per-document stream starts.
    """

    def __init__(self, corpus: PreparedCorpus | str | os.PathLike, split: str, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.corpus = _open(corpus)
        self.split = split
        self.seq_len = seq_len
        info = self.corpus.split_info(split)
        if info.num_tokens == 0:
            raise DataError(f"{self.corpus.path}: split '{split}' is empty (0 bytes)")
        # Per shard: stream position of each document's BOS, int64 (docs_in_shard,):
        # document d starts at element offsets[d] and is preceded by d earlier BOS elements.
        self._doc_starts = [o[:-1] + np.arange(len(o) - 1, dtype=np.int64) for o in self.corpus.offsets(split)]
        stream_lengths = np.array([int(o[-1]) + len(o) - 1 for o in self.corpus.offsets(split)], dtype=np.int64)
        counts = (stream_lengths - 1) // seq_len  # windows [jL, jL+L+1) fully inside
        self._first = np.concatenate([[0], np.cumsum(counts)])  # (num_shards + 1,)
        if self._first[-1] == 0:
            raise DataError(
                f"{self.corpus.path}: split '{split}' is too small for one sequence of "
                f"length {seq_len} (longest shard stream has {int(stream_lengths.max())} "
                f"{'tokens' if self.corpus.is_tokens else 'bytes'} incl. BOS, need {seq_len + 1})"
            )

    def __len__(self) -> int:
        return int(self._first[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self._first, index, side="right")) - 1
        begin = (index - int(self._first[shard])) * self.seq_len  # stream positions [begin, end)
        end = begin + self.seq_len + 1
        doc_starts = self._doc_starts[shard]
        # Number of BOS elements before a stream position = documents starting before it.
        bos_before_begin = int(np.searchsorted(doc_starts, begin, side="left"))
        bos_before_end = int(np.searchsorted(doc_starts, end, side="left"))
        data = self.corpus.shard_data(self.split, shard)[begin - bos_before_begin : end - bos_before_end]
        window = np.empty(self.seq_len + 1, dtype=self.corpus.dtype)
        is_bos = np.zeros(self.seq_len + 1, dtype=bool)
        is_bos[doc_starts[bos_before_begin:bos_before_end] - begin] = True
        window[is_bos] = self.corpus.bos_id
        window[~is_bos] = data
        return window


def _to_inputs_and_targets(windows: np.ndarray) -> dict[str, np.ndarray]:
    """(B, L+1) windows of bytes or token ids -> {"input_ids", "targets"}: int32 (B, L) each."""
    windows = windows.astype(np.int32)
    return {"input_ids": windows[:, :-1], "targets": windows[:, 1:]}


# --------------------------------------------------------------------------
# Training pipeline


def make_dataset(
    corpus: PreparedCorpus | str | os.PathLike,
    split: str,
    seq_len: int,
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = True,
    num_threads: int = 4,
    prefetch_batches: int = 8,
) -> grain.DatasetIterator:
    """Checkpointable iterator of training batches for this process.

    Yields {"input_ids": int32 (batch_size, seq_len), "targets": int32 (batch_size,
    seq_len)}, batch_size being the per-process batch. num_epochs=None repeats
    forever. With process_count P, the stream of num_epochs * len(sequences)
    sequences (shuffled or not) is cut to a multiple of P (at most P - 1 dropped,
    so that every process yields the same number of batches) and process p takes
    its elements p, p + P, p + 2P, ... (strided, not a contiguous slice).

    The result is a grain DatasetIterator: `it.get_state()` is a small
    JSON-serialisable dict (see iterator_state_to_json) and `it.set_state(state)`
    on a fresh iterator built with the same arguments resumes exactly.
    """
    import grain  # lazy: only the training pipeline needs grain

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
    source = PackedSequences(corpus, split, seq_len)
    if len(source) < process_count:
        raise DataError(
            f"split '{split}' has {len(source)} sequences of length {seq_len}, fewer than the {process_count} processes"
        )
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed % 2**32)  # index_shuffle; epoch e uses seed + e
    ds = ds.repeat(num_epochs)
    if process_count > 1:
        usable = len(ds) // process_count * process_count
        ds = ds[process_index:usable:process_count]
    if drop_remainder and len(ds) < batch_size:
        raise DataError(
            f"split '{split}' gives {len(ds)} sequences of length {seq_len} per process "
            f"over {num_epochs} epoch(s), fewer than one batch of {batch_size}"
        )
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(_to_inputs_and_targets)
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches)
    return iter(ds.to_iter_dataset(read_options))


def iterator_state_to_json(state: Any) -> str:
    """Grain iterator state (a dict of ints here) -> JSON string for a checkpoint."""
    return json.dumps(state, sort_keys=True)


def iterator_state_from_json(text: str) -> Any:
    """Inverse of iterator_state_to_json; pass the result to `it.set_state`."""
    return json.loads(text)


# --------------------------------------------------------------------------
# Evaluation


def eval_batches(
    corpus: PreparedCorpus | str | os.PathLike,
    split: str,
    seq_len: int,
    batch_size: int,
    max_sequences: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One deterministic, unshuffled pass over a split's packed sequences.

    Yields {"input_ids": int32 (B, L), "targets": int32 (B, L), "mask": float32
    (B, L)}; the last batch is padded with all-zero rows whose mask is 0 (nothing
    is dropped), so every batch has exactly batch_size rows. max_sequences limits
    the pass to the first sequences (in order).
    """
    source = PackedSequences(corpus, split, seq_len)
    total = len(source) if max_sequences is None else min(len(source), max_sequences)
    for start in range(0, total, batch_size):
        rows = min(batch_size, total - start)
        windows = np.zeros((batch_size, seq_len + 1), dtype=source.corpus.dtype)
        for r in range(rows):
            windows[r] = source[start + r]
        batch = _to_inputs_and_targets(windows)
        mask = np.zeros((batch_size, seq_len), dtype=np.float32)
        mask[:rows] = 1.0
        batch["mask"] = mask
        yield batch


# --------------------------------------------------------------------------
# Default corpus


def ensure_default_corpus(verbose: bool = True) -> PreparedCorpus:
    """Open the default corpus (Python stdlib sources, data/stdlib), preparing it on first use."""
    path = stdlib_prepare.default_corpus_dir()
    if not (path / "meta.json").is_file():
        try:
            stdlib_prepare.prepare(path, verbose=False)
        except PrepareError:
            if not (path / "meta.json").is_file():  # not just a concurrent winner
                raise
    corpus = PreparedCorpus(path)
    if verbose:
        parts = [f"{n} {s.num_docs:,d} docs / {s.num_bytes:,d} B" for n, s in corpus.splits.items()]
        train_sha = corpus.splits["train"].sha256[:12] if "train" in corpus.splits else "-"
        print(f"default corpus {path}: {', '.join(parts)}; train sha256 {train_sha}…")
    return corpus
