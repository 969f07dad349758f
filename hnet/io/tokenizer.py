"""Byte-level BPE tokenizer for the Transformer baseline, and token corpora for training it.

The tokenizer is HF `tokenizers` BPE over GPT-2 style byte-level pre-tokenization (every byte
maps to one printable character; merges never produce an unknown token), trained on the
documents of a prepared corpus split:

    Tokenizer(models.BPE()), pre_tokenizers.ByteLevel(add_prefix_space=False),
    decoders.ByteLevel(), trainers.BpeTrainer(vocab_size=V, min_frequency=2,
    initial_alphabet=ByteLevel.alphabet(), special_tokens=["<|bos|>"])        -> BOS is id 0

Exactness. `encode` works on bytes and `decode` returns bytes, through a per-id table of the
bytes each token stands for, so decode(encode(x)) == x for every byte string and the byte
lengths of encode(x) sum to len(x). Two rules make this hold beyond plain UTF-8 text:
- Invalid UTF-8 is kept, not rejected: each maximal invalid run becomes the single-byte tokens
  of its bytes (all 256 are in the vocabulary), and the valid text around it is encoded as usual.
- The special token's text "<|bos|>" inside a document is encoded as ordinary text; only
  packing puts the BOS id into a token stream.
Long documents are encoded in pieces of at most MAX_PIECE_CHARS characters, cut after a newline
where there is one (tokens never cross a cut or an invalid run), so memory stays bounded.

A token run (data.tokenizer in the run config) keeps its tokenizer as RUN_DIR/tokenizer.json
and trains on a token corpus (hnet.io.data's "hnet-tokens-v1": the byte corpus tokenized shard by
shard), cached under data.shards.cache_dir()/tokens/ and keyed by the tokenizer and corpus hashes.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from data.shards import TOKENS_FORMAT, PrepareError, cache_dir, make_sibling_dir, move_into_place
from hnet.errors import DataError, report
from hnet.io.data import PreparedCorpus
from hnet.io.run_dir import RunDir
from hnet.parallel import multihost

BOS_TOKEN = "<|bos|>"
TOKENIZER_FILE = "tokenizer.json"  # a saved tokenizer's name in a token corpus or an export (runs: RunDir.tokenizer)
MAX_PIECE_CHARS = 1 << 20  # longest text handed to the encoder at once
ENCODE_BATCH_CHARS = 1 << 23  # text gathered per call of the (parallel) batch encoder


def _byte_to_char() -> list[str]:
    """GPT-2's reversible byte -> character map used by the ByteLevel pre-tokenizer.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, 0x7F-0xA0,
    0xAD) map, in byte order, to the characters 256, 257, ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = [""] * 256, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = _byte_to_char()
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}


def _pieces(data: bytes) -> Iterator[str | bytes]:
    """A document -> str pieces (valid UTF-8, at most MAX_PIECE_CHARS characters each) and bytes
    pieces (maximal runs of invalid UTF-8), in order; their UTF-8 / raw bytes concatenate to data."""
    view, start = memoryview(data), 0
    while start < len(data):
        try:
            text, invalid = codecs.utf_8_decode(view[start:], "strict", True)[0], b""
            start = len(data)
        except UnicodeDecodeError as err:  # err.start/end: the invalid run, relative to start
            text = codecs.utf_8_decode(view[start : start + err.start], "strict", True)[0]
            invalid = bytes(view[start + err.start : start + err.end])
            start += err.end
        begin = 0
        while len(text) - begin > MAX_PIECE_CHARS:
            cut = text.rfind("\n", begin, begin + MAX_PIECE_CHARS) + 1 or begin + MAX_PIECE_CHARS
            yield text[begin:cut]
            begin = cut
        if begin < len(text):
            yield text[begin:]
        if invalid:
            yield invalid


class BPETokenizer:
    """A trained byte-level BPE tokenizer (wraps a `tokenizers.Tokenizer`).

    vocab_size: number of ids (the model's vocab_size must equal it); bos_id: the BOS id (0);
    byte_lengths: int64 (vocab_size,), bytes each id decodes to (0 for BOS), so that
    byte_lengths[encode(x)].sum() == len(x).
    """

    def __init__(self, hf_tokenizer):
        self._hf = hf_tokenizer
        self._hf.encode_special_tokens = True  # "<|bos|>" in a document is just text
        self.vocab_size: int = hf_tokenizer.get_vocab_size()
        bos_id = hf_tokenizer.token_to_id(BOS_TOKEN)
        if bos_id is None:
            raise DataError(f"tokenizer has no {BOS_TOKEN} token: not made by hnet.io.tokenizer")
        self.bos_id: int = bos_id
        self._token_bytes: list[bytes] = []
        for i in range(self.vocab_size):
            token = hf_tokenizer.id_to_token(i)
            if i == bos_id:
                self._token_bytes.append(b"")
            elif token is None or any(c not in CHAR_TO_BYTE for c in token):
                raise DataError(f"tokenizer id {i} ({token!r}) is not a byte-level token")
            else:
                self._token_bytes.append(bytes(CHAR_TO_BYTE[c] for c in token))
        self.byte_lengths = np.array([len(b) for b in self._token_bytes], dtype=np.int64)
        # id of each single-byte token: how invalid UTF-8 is encoded.
        byte_ids = [hf_tokenizer.token_to_id(c) for c in BYTE_TO_CHAR]
        if None in byte_ids:
            raise DataError("tokenizer lacks some of the 256 single-byte tokens")
        self._byte_ids = np.array(byte_ids, dtype=np.int32)

    # ---- encoding

    def encode(self, data: bytes | str) -> np.ndarray:
        """bytes (or str, taken as UTF-8) -> int32 (tokens,) ids; no BOS is added."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        return next(self._encode_pieces([list(_pieces(bytes(data)))]))

    def encode_documents(self, docs: Iterable[bytes | np.ndarray]) -> Iterator[np.ndarray]:
        """encode() of each document, in order, handing text to the encoder in large batches."""
        batch, chars = [], 0
        for doc in docs:
            batch.append(list(_pieces(bytes(doc))))
            chars += len(doc)
            if chars >= ENCODE_BATCH_CHARS:
                yield from self._encode_pieces(batch)
                batch, chars = [], 0
        yield from self._encode_pieces(batch)

    def _encode_pieces(self, docs: list[list[str | bytes]]) -> Iterator[np.ndarray]:
        texts = [p for pieces in docs for p in pieces if isinstance(p, str)]
        encoded = iter(self._hf.encode_batch(texts, add_special_tokens=False))
        for pieces in docs:
            parts = [
                np.asarray(next(encoded).ids, dtype=np.int32)
                if isinstance(p, str)
                else self._byte_ids[np.frombuffer(p, dtype=np.uint8)]
                for p in pieces
            ]
            yield np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> bytes:
        """ids -> the bytes they stand for (BOS decodes to nothing)."""
        return b"".join(self.token_bytes(ids))

    def token_bytes(self, ids: Iterable[int]) -> list[bytes]:
        """The bytes of each id, e.g. to show token boundaries."""
        return [self._token_bytes[int(i)] for i in ids]

    # ---- files

    @property
    def sha256(self) -> str:
        """Hash of the tokenizer's canonical JSON (what identifies it in caches)."""
        canonical = json.dumps(json.loads(self._hf.to_str()), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json (HF format) atomically: a temporary file renamed into place."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(self._hf.to_str(pretty=True))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BPETokenizer":
        from tokenizers import Tokenizer

        path = Path(path).expanduser()
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist")
        try:
            hf = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception
            raise DataError(
                f"tokenizer file {path} cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
            ) from None
        return cls(hf)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id})"


def train_tokenizer(
    corpus: PreparedCorpus | str | os.PathLike,
    split: str,
    vocab_size: int,
    *,
    min_frequency: int = 2,
    verbose: bool = False,
) -> BPETokenizer:
    """Train a byte-level BPE tokenizer of `vocab_size` ids on a byte corpus split.

    Documents are streamed from the memory-mapped shards. Raises DataError when the split is
    too small to reach vocab_size (the model's vocab_size must equal the tokenizer's).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = corpus if isinstance(corpus, PreparedCorpus) else PreparedCorpus(corpus)
    if corpus.is_tokens:
        raise DataError(f"{corpus.path} is a token corpus; train a tokenizer on bytes")
    minimum = 256 + 1  # every byte, and BOS
    if vocab_size < minimum:
        raise DataError(f"tokenizer vocab_size must be >= {minimum} (256 bytes + BOS), got {vocab_size}")
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=verbose,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[BOS_TOKEN],
    )
    texts = (p for doc in corpus.documents(split) for p in _pieces(bytes(doc)) if isinstance(p, str))
    hf.train_from_iterator(texts, trainer=trainer)
    tokenizer = BPETokenizer(hf)
    if tokenizer.vocab_size != vocab_size:
        raise DataError(
            f"split '{split}' of {corpus.path} gave a tokenizer of {tokenizer.vocab_size} ids, not "
            f"{vocab_size} (too little text); use a smaller vocab_size or a bigger corpus"
        )
    return tokenizer


def load_run_tokenizer(run_dir: str | os.PathLike) -> BPETokenizer | None:
    """The tokenizer of a run (RUN_DIR/tokenizer.json), or None for a byte-level run."""
    path = RunDir(run_dir).tokenizer
    return BPETokenizer.load(path) if path.exists() else None


def setup_run_tokenizer(
    spec: None | str | dict,
    run_dir: str | os.PathLike,
    corpus: PreparedCorpus,
    split: str,
    log: Callable[[str], None] = print,
) -> BPETokenizer | None:
    """The tokenizer a run trains with, kept as RUN_DIR/tokenizer.json.

    spec (data.tokenizer): None -> bytes (returns None); {"vocab_size": V} -> train one on
    `split` of the byte corpus; a path -> a copy of that tokenizer. A run folder that already
    holds tokenizer.json (a resumed run) always reuses it. With several processes, process 0
    writes the file and the others wait for it and read it.
    """
    if spec is None:
        return None
    import jax

    path = RunDir(run_dir).tokenizer
    if not path.exists() and jax.process_index() == 0:
        if isinstance(spec, dict):
            log(f"training a BPE tokenizer ({spec['vocab_size']} ids) on split '{split}' of {corpus.path}")
            train_tokenizer(corpus, split, spec["vocab_size"]).save(path)
        else:
            BPETokenizer.load(spec).save(path)
    multihost.barrier("hnet.io.tokenizer.setup_run_tokenizer")  # the others wait for process 0's file
    return BPETokenizer.load(path)


# --------------------------------------------------------------------------
# Token corpora


def tokenize_corpus(corpus: PreparedCorpus, tokenizer: BPETokenizer, verbose: bool = True) -> PreparedCorpus:
    """The byte corpus tokenized with `tokenizer`, as a token corpus (written once, then cached).

    Shard i of each split holds the tokens of byte shard i, so documents are grouped and packed
    as in the byte corpus. The cache folder is cache_dir()/tokens/<name>-<key>, key hashing the
    tokenizer and the splits' sha256; it is written in a temporary folder and renamed into place.
    """
    source_hashes = {name: info.sha256 for name, info in sorted(corpus.splits.items())}
    key = hashlib.sha256(json.dumps([TOKENS_FORMAT, tokenizer.sha256, source_hashes]).encode()).hexdigest()
    out = cache_dir() / "tokens" / f"{corpus.path.name}-{key[:16]}"
    if not (out / "meta.json").is_file():
        if verbose:
            print(f"tokenizing {corpus.path} into {out}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_sibling_dir(out, "tmp")  # written aside, renamed into place when complete
        try:
            _write_token_corpus(corpus, tokenizer, tmp, key)
            move_into_place(tmp, out, overwrite=False)
        except PrepareError:  # another process finished the same corpus first
            if not (out / "meta.json").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    tokens = PreparedCorpus(out)
    if verbose:
        parts = [
            f"{n} {s.num_tokens:,d} tokens ({s.num_bytes / max(s.num_tokens, 1):.2f} bytes/token)"
            for n, s in tokens.splits.items()
        ]
        print(f"token corpus {out}: {', '.join(parts)}")
    return tokens


def _write_token_corpus(corpus: PreparedCorpus, tokenizer: BPETokenizer, folder: Path, key: str) -> None:
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    splits = {}
    for name, info in corpus.splits.items():
        hasher, num_tokens, shard_names, shard_sha256 = hashlib.sha256(), 0, [], []
        for i, shard in enumerate(info.shards):
            offsets, shard_hasher = [0], hashlib.sha256()
            with open(folder / shard, "wb") as f:
                for ids in tokenizer.encode_documents(corpus.documents(name, i)):
                    data = ids.astype(dtype).tobytes()
                    f.write(data)
                    hasher.update(data)
                    shard_hasher.update(data)
                    offsets.append(offsets[-1] + len(ids))
            shard_sha256.append(shard_hasher.hexdigest())
            np.save(folder / (shard.removesuffix(".bin") + ".idx.npy"), np.asarray(offsets, dtype=np.int64))
            num_tokens += offsets[-1]
            shard_names.append(shard)
        splits[name] = {
            "shards": shard_names,
            "num_tokens": num_tokens,
            "num_bytes": info.num_bytes,
            "num_docs": info.num_docs,
            "sha256": hasher.hexdigest(),
            "shard_sha256": shard_sha256,
            "source_sha256": info.sha256,
        }
    np.save(folder / "token_bytes.npy", tokenizer.byte_lengths)
    tokenizer.save(folder / TOKENIZER_FILE)  # provenance
    meta = {
        "format": TOKENS_FORMAT,
        "source": f"{corpus.path} tokenized (key {key})",
        "dtype": dtype.name,
        "bos_id": tokenizer.bos_id,
        "vocab_size": tokenizer.vocab_size,
        "splits": splits,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


# --------------------------------------------------------------------------
# Command line: train a tokenizer, measure bytes per token


def bytes_per_token(tokenizer: BPETokenizer, corpus: PreparedCorpus, split: str) -> tuple[int, int]:
    """(bytes, tokens) of every document of `split` encoded alone (no BOS), summed."""
    num_bytes = num_tokens = 0
    docs = list(corpus.documents(split))
    for doc, ids in zip(docs, tokenizer.encode_documents(docs)):
        num_bytes += len(doc)
        num_tokens += len(ids)
    return num_bytes, num_tokens


def main(argv: list[str] | None = None) -> int:
    """python -m hnet.io.tokenizer --corpus DIR --vocab-size V --out FILE [--measure SPLIT ...]"""
    import argparse
    import time

    parser = argparse.ArgumentParser(
        prog="python -m hnet.io.tokenizer",
        description="Train the byte-level BPE tokenizer a token run uses (the recipe train.py applies for "
        'data.tokenizer = {"vocab_size": V}) and print bytes per token on corpus splits.',
    )
    parser.add_argument("--corpus", required=True, help="prepared byte corpus folder")
    parser.add_argument("--split", default="train", help="split to train on (default: train)")
    parser.add_argument("--vocab-size", type=int, help="ids, BOS included; omit with --load to only measure")
    parser.add_argument("--out", help="where to write tokenizer.json (an existing file is not overwritten)")
    parser.add_argument("--load", help="measure this tokenizer.json instead of training one")
    parser.add_argument(
        "--measure",
        nargs="*",
        default=["train", "validation"],
        metavar="SPLIT",
        help="splits to report bytes per token on (default: train validation)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    try:
        corpus = PreparedCorpus(args.corpus)
        if args.load:
            tokenizer = BPETokenizer.load(args.load)
        else:
            if args.vocab_size is None or args.out is None:
                parser.error("training needs --vocab-size and --out (or --load FILE to measure one)")
            out = Path(args.out)
            if out.exists():
                raise DataError(f"{out} already exists; remove it or measure it with --load")
            start = time.perf_counter()
            tokenizer = train_tokenizer(corpus, args.split, args.vocab_size)
            out.parent.mkdir(parents=True, exist_ok=True)
            tokenizer.save(out)
            if not args.json:
                print(
                    f"trained {tokenizer.vocab_size} ids on split '{args.split}' of {corpus.path} "
                    f"in {time.perf_counter() - start:.0f} s -> {out}"
                )
        measured = {"tokenizer": args.load or args.out, "vocab_size": tokenizer.vocab_size, "splits": {}}
        for split in args.measure:
            num_bytes, num_tokens = bytes_per_token(tokenizer, corpus, split)
            ratio = num_bytes / max(num_tokens, 1)
            measured["splits"][split] = {"bytes": num_bytes, "tokens": num_tokens, "bytes_per_token": ratio}
            if not args.json:
                print(
                    f"{split}: {num_bytes:,d} bytes / {num_tokens:,d} tokens = {ratio:.3f} bytes per token "
                    f"(each document alone, no BOS)"
                )
    except DataError as err:
        return report(err)
    if args.json:
        print(json.dumps(measured, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
