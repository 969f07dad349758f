"""Reference lines for bits per byte: what standard compressors achieve on the same bytes.

    compressor_bpb(data)   # {"gzip -9": 2.98, "bzip2 -9": 2.34, "xz -9e": 2.39, "zstd --ultra -22": 2.42}
    compressor_bpb_per_document(docs)   # each document compressed alone, bits summed

A model scores each document from its own BOS, with nothing carried over from the one before;
the fair compressor line does the same: every document is compressed on its own (container
header included, as a file of it would be) and the compressed bits are summed over the
documents. Compressing the concatenation instead lets a compressor reuse earlier documents'
text, which the models cannot: on the default corpus's 38 validation files xz -9e gives 1.57
bpb over the concatenation and 1.91 per document.

bits per byte = 8 x compressed size / input size. bzip2 and xz use Python's bz2 and lzma
modules, which wrap the same libraries with the same settings (libbzip2 block size 9;
liblzma preset 9 | PRESET_EXTREME, .xz container with a CRC64 check) and give the same bytes as
the command-line tools. gzip and zstd run the command-line tools (/usr/bin/gzip, zstd), since
zlib's DEFLATE differs from GNU gzip's by about 0.1%; without a gzip binary, Python's gzip
module (zlib level 9) stands in. Without zstd (binary or Python 3.14's compression.zstd) its
value is None ("unavailable").

    python -m hnet.evaluation.compress FILE     # prints one line per compressor
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import subprocess
import sys

from hnet.errors import report

COMPRESSORS = ("gzip -9", "bzip2 -9", "xz -9e", "zstd --ultra -22")


def _run(argv: list[str], data: bytes) -> bytes:
    return subprocess.run(argv, input=data, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True).stdout


def compress(name: str, data: bytes) -> bytes | None:
    """`data` compressed by compressor `name` (one of COMPRESSORS); None when it is unavailable."""
    if name == "gzip -9":
        if shutil.which("gzip"):
            return _run(["gzip", "-9", "-n", "-c"], data)  # -n: no name or time stamp in the header
        return gzip.compress(data, compresslevel=9, mtime=0)
    if name == "bzip2 -9":
        return bz2.compress(data, compresslevel=9)
    if name == "xz -9e":
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9 | lzma.PRESET_EXTREME)
    if name == "zstd --ultra -22":
        if shutil.which("zstd"):
            # --stream-size: like compressing a file (size known up front), byte for byte.
            return _run(["zstd", "--ultra", "-22", "-c", "-q", f"--stream-size={len(data)}"], data)
        try:
            from compression import zstd  # Python >= 3.14
        except ImportError:
            return None
        return zstd.compress(data, level=22)
    raise ValueError(f"unknown compressor {name!r} (known: {', '.join(COMPRESSORS)})")


def compressor_bpb(data: bytes) -> dict[str, float | None]:
    """{compressor name: bits per byte on `data`, or None where the compressor is unavailable}."""
    return compressor_bpb_per_document([data])


def compressor_bpb_per_document(docs) -> dict[str, float | None]:
    """{compressor name: 8 x (sum of each document's compressed size) / (sum of document sizes),
    or None where the compressor is unavailable}."""
    docs = [bytes(d) for d in docs if len(d)]
    total = sum(len(d) for d in docs)
    if not total:
        raise ValueError("compressor_bpb needs at least one byte")
    results = {}
    for name in COMPRESSORS:
        compressed = [compress(name, d) for d in docs]
        results[name] = None if compressed[0] is None else 8 * sum(len(c) for c in compressed) / total
    return results


def format_bpb(results: dict[str, float | None]) -> str:
    """One line per compressor: name and bits per byte (or "unavailable")."""
    width = max(len(name) for name in results)
    return "\n".join(
        f"{name:<{width}}  " + ("unavailable" if bpb is None else f"{bpb:.4f} bpb") for name, bpb in results.items()
    )


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m hnet.evaluation.compress", description="Bits per byte of standard compressors on a file."
    )
    parser.add_argument("file", help="file whose bytes are compressed")
    args = parser.parse_args(argv)
    try:
        with open(args.file, "rb") as f:
            data = f.read()
    except OSError as err:
        return report(f"{args.file}: {err.strerror}")
    if not data:
        return report(f"{args.file} is empty")
    print(f"{args.file}: {len(data):,d} bytes")
    print(format_bpb(compressor_bpb(data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
