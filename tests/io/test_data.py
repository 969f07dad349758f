"""Tests for corpus preparation (data/) and the loader (hnet/io/data.py). CPU, fast."""

from __future__ import annotations

import collections
import gzip
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from data import prepare as dispatcher
from data.enwik8 import prepare as enwik8_prepare
from data.jsonl import prepare as jsonl_prepare
from data.parquet import prepare as parquet_prepare
from data.shards import CorpusWriter, PrepareError, split_for_key
from data.stdlib import prepare as stdlib_prepare
from data.text import prepare as text_prepare
from hnet.io import data as hdata
from hnet.io.data import (
    BOS_ID,
    DataError,
    PackedSequences,
    PreparedCorpus,
    eval_batches,
    iterator_state_from_json,
    iterator_state_to_json,
    make_dataset,
)

L = 8  # sequence length used throughout


def make_docs() -> list[bytes]:
    """Varied lengths: length-1 docs, one much longer than L, multi-byte UTF-8."""
    docs = [b"a", b"hello world", "héllo ünïcode €".encode(), b"x" * 37, b"b", b"c"]
    docs += [f"doc {i} ".encode() * (i % 4 + 1) for i in range(12)]
    docs += [b"z", b"the end of the corpus."]
    return docs


def write_corpus(path: Path, docs: list[bytes], shard_bytes: int = 40, split="train") -> Path:
    with CorpusWriter(path, source="test", splits=(split,), shard_bytes=shard_bytes) as w:
        for d in docs:
            w.add(split, d)
    return path


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus", make_docs())


def epoch(corpus, *, shuffle, seed=0, process_index=0, process_count=1, num_epochs=1):
    """All windows of the given epochs as a list of bytes (input_ids + last target)."""
    it = make_dataset(
        corpus,
        "train",
        L,
        1,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
    )
    out = []
    for batch in it:
        assert batch["input_ids"].shape == (1, L) and batch["input_ids"].dtype == np.int32
        assert batch["targets"].shape == (1, L) and batch["targets"].dtype == np.int32
        np.testing.assert_array_equal(batch["input_ids"][0, 1:], batch["targets"][0, :-1])
        window = np.concatenate([batch["input_ids"][0], batch["targets"][0, -1:]])
        out.append(bytes(window.astype(np.uint8)))
    return out


# --------------------------------------------------------------------------
# Writer + packing


def test_writer_shards_hold_whole_documents(corpus_dir):
    corpus = PreparedCorpus(corpus_dir)
    info = corpus.split_info("train")
    assert len(info.shards) >= 3
    docs = []
    for i, offsets in enumerate(corpus.offsets("train")):
        data = bytes(corpus.shard_data("train", i))
        assert len(data) <= 40 or len(offsets) == 2  # only a lone big doc may exceed
        docs += [data[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    assert docs == make_docs()
    assert info.num_docs == len(docs) and info.num_bytes == sum(map(len, docs))
    corpus.verify_checksum("train")


def test_packing_reconstructs_every_document(corpus_dir):
    corpus = PreparedCorpus(corpus_dir)
    windows = epoch(corpus, shuffle=False)
    assert len(windows) == len(PackedSequences(corpus, "train", L))
    pos = 0
    rebuilt_docs = []
    for i, offsets in enumerate(corpus.offsets("train")):
        data = bytes(corpus.shard_data("train", i))
        shard_docs = [data[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        stream = b"".join(bytes([BOS_ID]) + d for d in shard_docs)
        count = (len(stream) - 1) // L
        mine, pos = windows[pos : pos + count], pos + count
        # Consecutive windows overlap by exactly one byte (stride L, length L+1).
        for a, b in zip(mine, mine[1:]):
            assert a[-1] == b[0]
        covered = (mine[0] + b"".join(w[1:] for w in mine[1:])) if mine else b""
        dropped = stream[len(covered) :]
        assert len(covered) == (count * L + 1 if count else 0)
        assert len(dropped) == (len(stream) - 1) % L + (0 if count else 1)
        assert covered + dropped == stream
        # BOS only right before each document (valid UTF-8 never holds byte 254).
        pieces = (covered + dropped).split(bytes([BOS_ID]))
        assert pieces[0] == b""
        rebuilt_docs += pieces[1:]
    assert pos == len(windows)
    assert rebuilt_docs == make_docs()


def test_single_long_document(tmp_path):
    doc = bytes(range(32, 127)) * 3  # 285 bytes, one document
    corpus = PreparedCorpus(write_corpus(tmp_path / "c", [doc], shard_bytes=1 << 20))
    seqs = PackedSequences(corpus, "train", L)
    assert len(seqs) == (len(doc) + 1 - 1) // L
    assert bytes(seqs[0]) == bytes([BOS_ID]) + doc[:L]
    assert bytes(seqs[3]) == doc[3 * L - 1 : 4 * L]
    with pytest.raises(IndexError):
        seqs[len(seqs)]


def test_shuffled_epoch_is_a_permutation(corpus_dir):
    plain = epoch(corpus_dir, shuffle=False)
    a = epoch(corpus_dir, shuffle=True, seed=1)
    assert sorted(a) == sorted(plain)
    assert a == epoch(corpus_dir, shuffle=True, seed=1)
    assert a != epoch(corpus_dir, shuffle=True, seed=2)
    assert a != plain
    # Each epoch is reshuffled (deterministically), with the same multiset.
    two = epoch(corpus_dir, shuffle=True, seed=1, num_epochs=2)
    assert two[: len(a)] == a
    assert sorted(two[len(a) :]) == sorted(plain) and two[len(a) :] != a


@pytest.mark.parametrize("shuffle", [False, True])
def test_processes_partition_the_epoch(corpus_dir, shuffle):
    full = epoch(corpus_dir, shuffle=shuffle, seed=3)
    p0 = epoch(corpus_dir, shuffle=shuffle, seed=3, process_index=0, process_count=2)
    p1 = epoch(corpus_dir, shuffle=shuffle, seed=3, process_index=1, process_count=2)
    usable = len(full) // 2 * 2  # cut to equal per-process length
    assert p0 == full[0:usable:2] and p1 == full[1:usable:2]
    assert len(p0) == len(p1)
    assert collections.Counter(p0) + collections.Counter(p1) == collections.Counter(full[:usable])


def test_iterator_state_round_trip(corpus_dir):
    kwargs = dict(seed=7, shuffle=True, num_epochs=None)
    it = make_dataset(corpus_dir, "train", L, 3, **kwargs)
    for _ in range(4):
        next(it)
    saved = iterator_state_to_json(it.get_state())
    assert isinstance(saved, str)
    expected = [next(it) for _ in range(6)]  # crosses an epoch boundary
    resumed = make_dataset(corpus_dir, "train", L, 3, **kwargs)
    resumed.set_state(iterator_state_from_json(saved))
    for want in expected:
        got = next(resumed)
        for key in ("input_ids", "targets"):
            np.testing.assert_array_equal(got[key], want[key])


def test_eval_batches_pad_last_batch(corpus_dir):
    seqs = PackedSequences(corpus_dir, "train", L)
    batches = list(eval_batches(corpus_dir, "train", L, 4))
    assert len(batches) == -(-len(seqs) // 4)
    rows = []
    for b in batches:
        assert b["input_ids"].shape == b["targets"].shape == b["mask"].shape == (4, L)
        assert b["mask"].dtype == np.float32
        for r in range(4):
            if b["mask"][r, 0]:
                rows.append(np.concatenate([b["input_ids"][r], b["targets"][r, -1:]]))
            else:
                assert not b["mask"][r].any() and not b["input_ids"][r].any()
    assert len(rows) == len(seqs)
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(row, seqs[i])
    limited = list(eval_batches(corpus_dir, "train", L, 4, max_sequences=5))
    assert len(limited) == 2 and limited[1]["mask"].sum() == L


# --------------------------------------------------------------------------
# DataError cases


def _meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def _set_meta(path: Path, meta: dict) -> None:
    (path / "meta.json").write_text(json.dumps(meta))


def test_data_errors(tmp_path, corpus_dir):
    def broken(name):
        dst = tmp_path / name
        write_corpus(dst, make_docs())
        return dst

    with pytest.raises(DataError, match="does not exist"):
        PreparedCorpus(tmp_path / "nope")

    p = broken("no_meta")
    (p / "meta.json").unlink()
    with pytest.raises(DataError, match="meta.json is missing"):
        PreparedCorpus(p)

    p = broken("bad_json")
    (p / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot be parsed"):
        PreparedCorpus(p)

    p = broken("bad_format")
    _set_meta(p, {**_meta(p), "format": "something-else"})
    with pytest.raises(DataError, match="format"):
        PreparedCorpus(p)

    with pytest.raises(DataError, match="no split 'validation'"):
        PackedSequences(corpus_dir, "validation", L)

    p = broken("no_bin")
    (p / "train_00001.bin").unlink()
    with pytest.raises(DataError, match="missing"):
        PreparedCorpus(p)

    p = broken("no_idx")
    (p / "train_00000.idx.npy").unlink()
    with pytest.raises(DataError, match="missing"):
        PreparedCorpus(p)

    p = broken("not_monotonic")
    offsets = np.load(p / "train_00000.idx.npy")
    offsets[1], offsets[2] = offsets[2], offsets[1]
    np.save(p / "train_00000.idx.npy", offsets)
    with pytest.raises(DataError, match="increasing"):
        PreparedCorpus(p)

    p = broken("size_mismatch")
    with open(p / "train_00000.bin", "ab") as f:
        f.write(b"extra")
    with pytest.raises(DataError, match="size"):
        PreparedCorpus(p)

    p = broken("first_not_zero")
    offsets = np.load(p / "train_00000.idx.npy")
    offsets[0] = 1
    np.save(p / "train_00000.idx.npy", offsets)
    with pytest.raises(DataError, match="offset 0"):
        PreparedCorpus(p)

    p = broken("sums")
    meta = _meta(p)
    meta["splits"]["train"]["num_docs"] += 1
    _set_meta(p, meta)
    with pytest.raises(DataError, match="meta.json says"):
        PreparedCorpus(p)

    p = tmp_path / "empty_split"
    with CorpusWriter(p, source="t", splits=("train", "validation")) as w:
        w.add("train", b"only train")
    with pytest.raises(DataError, match="empty"):
        PackedSequences(p, "validation", L)
    with pytest.raises(DataError, match="too small"):
        PackedSequences(p, "train", 64)
    with pytest.raises(DataError, match="too small"):
        make_dataset(p, "train", 64, 2, seed=0)
    with pytest.raises(DataError, match="fewer than one batch"):
        make_dataset(p, "train", 4, 8, seed=0, num_epochs=1)

    p = broken("checksum")
    meta = _meta(p)
    meta["splits"]["train"]["sha256"] = "0" * 64
    _set_meta(p, meta)
    with pytest.raises(DataError, match="sha256"):
        PreparedCorpus(p).verify_checksum("train")


def test_data_verify_names_a_flipped_shard_and_handles_old_corpora(tmp_path, corpus_dir, capsys):
    from data import verify

    meta = _meta(corpus_dir)
    assert len(meta["splits"]["train"]["shard_sha256"]) == len(meta["splits"]["train"]["shards"]) >= 3
    assert verify.main([str(corpus_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].split()[:2] == ["train", "ok"] and "sha256 per shard" in out[0]

    # One byte flipped in the second shard, size unchanged: opening (what training does) still
    # succeeds without reading the data, the check names the shard.
    shard = corpus_dir / meta["splits"]["train"]["shards"][1]
    data = bytearray(shard.read_bytes())
    data[3] ^= 0x20
    shard.write_bytes(bytes(data))
    PreparedCorpus(corpus_dir)
    assert verify.main([str(corpus_dir)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "MISMATCH" in out[0] and shard.name in out[0]

    # A corpus prepared before per-shard checksums: checked as a whole split, and says so.
    del meta["splits"]["train"]["shard_sha256"]
    _set_meta(corpus_dir, meta)
    assert PreparedCorpus(corpus_dir).split_info("train").shard_sha256 is None
    assert verify.main([str(corpus_dir)]) == 1
    assert "split 'train' sha256" in capsys.readouterr().out
    old = write_corpus(tmp_path / "old", make_docs())
    old_meta = _meta(old)
    del old_meta["splits"]["train"]["shard_sha256"]
    _set_meta(old, old_meta)
    assert verify.main([str(old)]) == 0
    assert "no per-shard checksum recorded" in capsys.readouterr().out

    assert verify.main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("error:")
    (old / "train_00000.bin").unlink()  # a missing shard: damaged, one line
    assert verify.main([str(old)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("damaged:") and "missing" in out[0]


# --------------------------------------------------------------------------
# Preparers


def test_refuses_to_overwrite_without_flag(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("first version")
    out = tmp_path / "out"
    assert dispatcher.main(["text", str(tmp_path / "a.txt"), "--out", str(out)]) == 0
    (tmp_path / "a.txt").write_text("second version!")
    assert dispatcher.main(["text", str(tmp_path / "a.txt"), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert PreparedCorpus(out).splits["train"].num_bytes == len("first version")
    with pytest.raises(PrepareError, match="already exists"):
        text_prepare.prepare([tmp_path / "a.txt"], out, verbose=False)
    args = ["text", str(tmp_path / "a.txt"), "--out", str(out), "--overwrite"]
    assert dispatcher.main(args) == 0
    assert PreparedCorpus(out).splits["train"].num_bytes == len("second version!")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "out"]  # no temp left


def test_text_preparer(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "b.txt").write_text("doc b")
    (src / "sub" / "a.txt").write_text("doc a")
    (src / "empty.txt").write_text("")
    (src / ".hidden").write_text("skipped")
    (src / "latin1.txt").write_bytes(b"caf\xe9")  # not UTF-8: dropped
    meta = text_prepare.prepare([src], tmp_path / "out1", verbose=False)
    splits = meta["splits"]
    assert splits["train"]["num_docs"] + splits["validation"]["num_docs"] == 2

    big = tmp_path / "big.txt"
    docs = [f"document number {i}\nwith two lines" for i in range(200)]
    big.write_text("\n\n\n".join(docs) + "\n\n\n")
    meta = text_prepare.prepare(
        [big],
        tmp_path / "out2",
        doc_separator=text_prepare.parse_separator("\\n\\n\\n"),
        verbose=False,
    )
    splits = meta["splits"]
    n_val = sum(split_for_key(str(i), 0.05) == "validation" for i in range(len(docs)))
    assert splits["validation"]["num_docs"] == n_val > 0
    assert splits["train"]["num_docs"] == len(docs) - n_val

    # The streaming splitter agrees with bytes.split for separators across chunks.
    text_prepare.READ_CHUNK, old = 7, text_prepare.READ_CHUNK
    try:
        pieces = list(text_prepare.iter_documents(big, b"\n\n\n"))
    finally:
        text_prepare.READ_CHUNK = old
    assert pieces == big.read_bytes().split(b"\n\n\n")

    meta = text_prepare.prepare(
        [src / "b.txt"],
        tmp_path / "out3",
        validation_files=[src / "sub"],
        test_files=[big],
        verbose=False,
    )
    counts = {k: v["num_docs"] for k, v in meta["splits"].items()}
    assert counts == {"train": 1, "validation": 1, "test": 1}


def test_jsonl_preparer(tmp_path):
    records = [{"text": f"line {i}", "id": i} for i in range(300)]
    records[5]["text"] = ""  # dropped
    lines = [json.dumps(r) for r in records]
    lines.insert(10, "")  # blank line: counted as a line, no document
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:150]) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(lines[150:]) + "\n")
    meta = jsonl_prepare.prepare([tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"], tmp_path / "out", verbose=False)
    splits = meta["splits"]
    assert splits["train"]["num_docs"] + splits["validation"]["num_docs"] == 299
    expected_val = sum(
        split_for_key(str(i), 0.05) == "validation" for i, line in enumerate(lines) if line and json.loads(line)["text"]
    )
    assert splits["validation"]["num_docs"] == expected_val

    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(PrepareError, match="no string field 'text'"):
        jsonl_prepare.prepare([tmp_path / "bad.jsonl"], tmp_path / "out2", verbose=False)
    assert not (tmp_path / "out2").exists()
    meta = jsonl_prepare.prepare(
        [tmp_path / "bad.jsonl"],
        tmp_path / "out2",
        text_field="content",
        validation_fraction=0.0,
        verbose=False,
    )
    assert meta["splits"]["train"]["num_docs"] == 1


def test_stdlib_preparer_is_deterministic(tmp_path):
    files = stdlib_prepare.list_stdlib_files()
    assert files == sorted(files) and len(files) > 100
    excluded = stdlib_prepare.EXCLUDED_DIRS
    assert not any(set(f.split("/")[:-1]) & excluded for f in files)
    a = stdlib_prepare.prepare(tmp_path / "a", max_files=60, verbose=False)
    b = stdlib_prepare.prepare(tmp_path / "b", max_files=60, verbose=False)
    assert a["splits"] == b["splits"]
    assert a["splits"]["train"]["num_docs"] > 0


def test_ensure_default_corpus(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HNET_DATA_DIR", str(tmp_path))
    full_list = stdlib_prepare.list_stdlib_files
    monkeypatch.setattr(stdlib_prepare, "list_stdlib_files", lambda root=None: full_list(root)[:80])
    assert stdlib_prepare.default_corpus_dir().parent == tmp_path
    corpus = hdata.ensure_default_corpus()
    assert corpus.path == stdlib_prepare.default_corpus_dir()
    assert "default corpus" in capsys.readouterr().out
    # Second call only loads: preparing again would fail.
    monkeypatch.setattr(stdlib_prepare, "prepare", lambda *a, **k: pytest.fail("re-prepared"))
    again = hdata.ensure_default_corpus(verbose=False)
    assert again.splits == corpus.splits


def test_enwik8_preparer(tmp_path, monkeypatch):
    monkeypatch.setattr(enwik8_prepare, "ENWIK8_BYTES", 1000)
    monkeypatch.setattr(enwik8_prepare, "SPLITS", (("train", 0, 900), ("validation", 900, 950), ("test", 950, 1000)))
    monkeypatch.setattr(enwik8_prepare, "READ_CHUNK", 64)
    raw = bytes(np.random.default_rng(0).integers(0, 254, 1000, dtype=np.uint8))
    (tmp_path / "enwik8").write_bytes(raw)
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w") as z:
        z.write(tmp_path / "enwik8", "enwik8")
    for i, src in enumerate(["enwik8", "enwik8.zip"]):
        enwik8_prepare.prepare(tmp_path / src, tmp_path / f"out{i}", verbose=False)
        corpus = PreparedCorpus(tmp_path / f"out{i}")
        for name, begin, end in enwik8_prepare.SPLITS:
            assert corpus.splits[name].num_docs == 1
            assert bytes(corpus.shard_data(name, 0)) == raw[begin:end]
    (tmp_path / "short").write_bytes(raw[:999])
    with pytest.raises(PrepareError, match="exactly"):
        enwik8_prepare.prepare(tmp_path / "short", tmp_path / "out3", verbose=False)


def test_parquet_preparer(tmp_path, capsys):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        code = dispatcher.main(["parquet", str(tmp_path), "--out", str(tmp_path / "out")])
        assert code == 2 and "pip install pyarrow" in capsys.readouterr().err
        return
    table = pa.table({"text": [f"row {i}" for i in range(50)] + [None, ""], "n": list(range(52))})
    pq.write_table(table, tmp_path / "part.parquet", row_group_size=16)
    meta = parquet_prepare.prepare([tmp_path], tmp_path / "out", verbose=False)
    assert sum(s["num_docs"] for s in meta["splits"].values()) == 50
