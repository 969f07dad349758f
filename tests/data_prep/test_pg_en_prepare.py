"""data/pg_en/prepare.py on a fake 3-book pg_en set (never reads ../shared)."""

import gzip
import hashlib
import lzma

import numpy as np
import pytest

from data.pg_en.prepare import prepare
from data.shards import PrepareError

BOOKS = {
    "train": [b"First train book.\nIt has two lines.", "Caf\u00e9 au lait, second train book.".encode()],
    "valid": [b"The only validation book."],
    "test": [b"The test book,\n\nwith a blank line."],
}


def make_pg_en(folder, corrupt=None):
    rows = ["split\toffset\tbytes\tsha256\tauthor\ttitle"]
    for split, books in BOOKS.items():
        offset = 0
        for i, book in enumerate(books):
            digest = hashlib.sha256(book).hexdigest()
            if (split, i) == corrupt:
                digest = "0" * 64
            rows.append(f"{split}\t{offset}\t{len(book) + 1}\t{digest}\tAuthor {i}\tTitle {split} {i}")
            offset += len(book) + 1
        with lzma.open(folder / f"pg_en_{split}.txt.xz", "wb") as f:
            f.write(b"".join(book + b"\n" for book in books))
    with gzip.open(folder / "pg_en_manifest.tsv.gz", "wt") as f:
        f.write("\n".join(rows) + "\n")
    return folder


def read_docs(out, split):
    bin_data = (out / f"{split}_00000.bin").read_bytes()
    offsets = np.load(out / f"{split}_00000.idx.npy")
    return [bin_data[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def test_splits_documents_and_contents(tmp_path):
    (tmp_path / "pg").mkdir()
    data_dir = make_pg_en(tmp_path / "pg")
    meta = prepare(tmp_path / "out", data_dir=data_dir, verbose=False)
    assert set(meta["splits"]) == {"train", "validation", "test"}
    assert meta["splits"]["train"]["num_docs"] == 2
    assert meta["splits"]["validation"]["num_docs"] == 1
    assert read_docs(tmp_path / "out", "train") == BOOKS["train"]
    assert read_docs(tmp_path / "out", "validation") == BOOKS["valid"]
    assert read_docs(tmp_path / "out", "test") == BOOKS["test"]


def test_max_train_bytes_keeps_whole_books(tmp_path):
    (tmp_path / "pg").mkdir()
    data_dir = make_pg_en(tmp_path / "pg")
    meta = prepare(tmp_path / "out", data_dir=data_dir, max_train_bytes=len(BOOKS["train"][0]) + 5, verbose=False)
    assert read_docs(tmp_path / "out", "train") == BOOKS["train"][:1]
    assert meta["splits"]["test"]["num_docs"] == 1


def test_sha256_mismatch_and_missing_file(tmp_path):
    (tmp_path / "pg").mkdir()
    data_dir = make_pg_en(tmp_path / "pg", corrupt=("train", 1))
    with pytest.raises(PrepareError, match="sha256 mismatch for book 'Title train 1'"):
        prepare(tmp_path / "out", data_dir=data_dir, verbose=False)
    assert not (tmp_path / "out").exists()
    (data_dir / "pg_en_test.txt.xz").unlink()
    with pytest.raises(PrepareError, match="pg_en_test.txt.xz does not exist"):
        prepare(tmp_path / "out", data_dir=data_dir, verbose=False)


def test_cli_error_is_one_line(tmp_path, capsys):
    from data.prepare import main

    assert main(["pg_en", "--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
