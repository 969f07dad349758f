"""Compressor reference lines are computed from the actual bytes."""

import bz2
import lzma
import shutil
import subprocess

import numpy as np
import pytest

from hnet.evaluation import compress
from hnet.evaluation.compress import COMPRESSORS, compressor_bpb, compressor_bpb_per_document

TEXT = b"".join(b"line %d: the quick brown fox jumps over the lazy dog\n" % (i % 50) for i in range(2000))
RANDOM = np.random.default_rng(0).integers(0, 256, size=len(TEXT), dtype=np.uint8).tobytes()


def decompress(name: str, blob: bytes) -> bytes:
    """Independent decompression of each format (CLI tools for gzip/zstd, Python modules else)."""
    if name == "gzip -9":
        import gzip

        return gzip.decompress(blob)
    if name == "bzip2 -9":
        return bz2.decompress(blob)
    if name == "xz -9e":
        return lzma.decompress(blob)
    if not shutil.which("zstd"):
        pytest.skip("no zstd binary to check the round trip")
    return subprocess.run(["zstd", "-d", "-c", "-q"], input=blob, stdout=subprocess.PIPE, check=True).stdout


@pytest.mark.parametrize("name", COMPRESSORS)
def test_bpb_is_eight_times_the_compressed_size_of_these_bytes(name):
    blob = compress.compress(name, TEXT)
    if blob is None:
        pytest.skip(f"{name} unavailable here")
    assert decompress(name, blob) == TEXT  # a real compression of exactly these bytes
    assert compressor_bpb(TEXT)[name] == 8 * len(blob) / len(TEXT)


def test_python_modules_match_the_command_line_tools():
    for name, argv in [("bzip2 -9", ["bzip2", "-9", "-c"]), ("xz -9e", ["xz", "-9e", "-c", "-T1"])]:
        if not shutil.which(argv[0]):
            continue
        cli = subprocess.run(argv, input=TEXT, stdout=subprocess.PIPE, check=True).stdout
        assert compress.compress(name, TEXT) == cli


def test_numbers_follow_the_data():
    text, noise = compressor_bpb(TEXT), compressor_bpb(RANDOM)
    for name in COMPRESSORS:
        if text[name] is None:
            assert noise[name] is None
            continue
        assert text[name] < 1.0  # highly repetitive text
        assert noise[name] > 7.9  # incompressible bytes cost (at least) 8 bits each
    changed = compressor_bpb(TEXT[: len(TEXT) // 2] + RANDOM[: len(TEXT) // 2])
    assert all(changed[n] is None or text[n] < changed[n] < noise[n] for n in COMPRESSORS)


def test_each_document_is_compressed_alone():
    """Per document: the sum of each document's own compressed size, so a repeated document
    costs as much as the first time (the concatenation gets it almost free)."""
    half = TEXT[: len(TEXT) // 2]
    alone, concatenated = compressor_bpb_per_document([half, half]), compressor_bpb(half + half)
    single = compressor_bpb(half)
    for name in COMPRESSORS:
        if single[name] is None:
            continue
        assert alone[name] == single[name]  # two copies: twice the bits over twice the bytes
        assert concatenated[name] < alone[name]
    mixed = compressor_bpb_per_document([half, RANDOM[:1000], b""])  # empty documents add nothing
    sizes = [len(compress.compress("bzip2 -9", d)) for d in (half, RANDOM[:1000])]
    assert mixed["bzip2 -9"] == 8 * sum(sizes) / (len(half) + 1000)
    with pytest.raises(ValueError, match="at least one byte"):
        compressor_bpb_per_document([b""])


def test_empty_input_and_unknown_compressor():
    with pytest.raises(ValueError, match="at least one byte"):
        compressor_bpb(b"")
    with pytest.raises(ValueError, match="unknown compressor"):
        compress.compress("lz4", TEXT)


def test_cli(tmp_path, capsys):
    path = tmp_path / "sample.txt"
    path.write_bytes(TEXT)
    assert compress.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMPRESSORS)
    assert compress.main([str(tmp_path / "absent.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
