"""Character-level noise for robustness evaluations: case flips, drops, repeats, swaps, whitespace.

    noisy = perturb(text_bytes, "swap", rate=0.05, seed=0)

Perturbations act on characters (Unicode code points), never on the bytes inside one, so a
multi-byte UTF-8 character is never split. Bytes that are not valid UTF-8 are kept as they are:
each counts as one character (decoded with "surrogateescape") that only drop, repeat and swap
may move. The result is deterministic given (text, kind, rate, seed).

At rate r a perturbation changes exactly round(r x E) characters, E being its eligible ones:
- "case":       E = letters with a one-character other case; each chosen one has its case flipped.
- "drop":       E = all characters; each chosen one is deleted.
- "repeat":     E = all characters; each chosen one is written twice.
- "swap":       E = all characters; round(r x E / 2) disjoint adjacent pairs are exchanged, so
                about r x E characters move (fewer visibly when a pair holds equal characters).
- "whitespace": E = all characters; at each chosen one, a whitespace character is deleted and
                any other character gets a space inserted before it.
"""

from __future__ import annotations

import numpy as np

PERTURBATIONS = ("case", "drop", "repeat", "swap", "whitespace")


def _decode(text: bytes) -> list[str]:
    return list(text.decode("utf-8", errors="surrogateescape"))


def _encode(chars: list[str]) -> bytes:
    return "".join(chars).encode("utf-8", errors="surrogateescape")


def _choose(rng: np.random.Generator, candidates: int, rate: float) -> np.ndarray:
    """round(rate x candidates) distinct indices in [0, candidates), sorted."""
    count = round(rate * candidates)
    return np.sort(rng.choice(candidates, size=count, replace=False)) if count else np.zeros(0, np.int64)


def has_other_case(char: str) -> bool:
    """A letter whose case flip is one different character ('a' <-> 'A'; not 'ß' -> 'SS')."""
    flipped = char.swapcase()
    return len(flipped) == 1 and flipped != char


def perturb(text: bytes, kind: str, rate: float, seed: int = 0) -> bytes:
    """Apply perturbation `kind` (one of PERTURBATIONS) at `rate` in [0, 1] to UTF-8 `text`."""
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r} (known: {', '.join(PERTURBATIONS)})")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"perturbation rate must be in [0, 1], got {rate}")
    rng = np.random.default_rng(seed)
    chars = _decode(text)
    if kind == "case":
        eligible = [i for i, c in enumerate(chars) if has_other_case(c)]
        for j in _choose(rng, len(eligible), rate):
            chars[eligible[j]] = chars[eligible[j]].swapcase()
        return _encode(chars)
    if kind == "swap":
        # k disjoint adjacent pairs, uniformly: k sorted starts among n - k slots, the j-th
        # shifted right by j, so consecutive pairs never overlap.
        pairs = min(round(rate * len(chars) / 2), len(chars) // 2)
        slots = len(chars) - pairs
        starts = np.sort(rng.choice(slots, size=pairs, replace=False)) + np.arange(pairs) if pairs else []
        for start in starts:
            chars[start], chars[start + 1] = chars[start + 1], chars[start]
        return _encode(chars)
    chosen = set(_choose(rng, len(chars), rate).tolist())
    out = []
    for i, char in enumerate(chars):
        if i not in chosen:
            out.append(char)
        elif kind == "repeat":
            out += [char, char]
        elif kind == "whitespace" and not char.isspace():
            out += [" ", char]
        # otherwise ("drop", or a whitespace character under "whitespace") the character is deleted
    return _encode(out)
