"""Chunk boundaries in byte coordinates: mapping inner stages back to bytes, statistics, rendering.

An H-Net's stage s decides its boundaries over its own input positions: bytes for stage 0, the
stage-(s-1) chunks for s >= 1. `byte_boundaries` maps every stage's decisions back to the byte
(input) positions they start at, through each stage's `chunk_position` (the input position of
each selected chunk). So a stage-1 boundary at stage-1 position m starts at byte
chunk_position_0[m]; stage-s boundaries are always a subset of stage-(s-1) boundaries.

Statistics per stage (`BoundaryStats`), over the positions given to it:
- bytes per chunk: positions / chunks (what training reports as StageOutput.bytes_per_chunk);
- dropped rate: boundaries the router chose that the capacity rule did not keep / boundaries;
- share after separators: of the boundaries that the model chose (not the forced ones at a
  document or window start), the share whose preceding byte is ASCII whitespace or punctuation
  (hnet.chunking.SEPARATOR_BYTES, the same set "space" routing uses, so a "space" model scores 1);
- chunk length histogram: lengths in bytes of the chunks of each document, lengths >= HIST_MAX
  pooled into the last bin.

Rendering: `render_terminal` (ANSI colours alternating per chunk, or plain `|` markers) and
`render_html` (one self-contained page). Boundaries are shown on whole characters: a boundary
inside a multi-byte UTF-8 character (learned routing can place one there) is drawn before that
character.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import numpy as np

from hnet.chunking import SEPARATOR_TABLE

HIST_MAX = 32  # chunk lengths >= HIST_MAX bytes share the last histogram bin


# --------------------------------------------------------------------------------------------
# Inner stages -> byte positions
# --------------------------------------------------------------------------------------------


def byte_boundaries(stages) -> tuple[np.ndarray, np.ndarray]:
    """Every stage's chunk starts and dropped boundaries as masks over the model's input positions.

    stages: per chunking stage (outermost first) a tuple of host arrays
        boundary_mask (B, L_s) bool, chunk_mask (B, L_s) bool, chunk_position (B, M_s) int
    (StageOutput fields; L_0 = L is the input length, L_{s+1} = M_s).
    Returns (chunk_starts, dropped): bool (depth, B, L). chunk_starts[s, b, t] is True when a
    stage-s chunk starts at input position t; dropped marks the stage-s boundaries the router
    chose that the capacity rule did not keep.
    """
    depth = len(stages)
    batch, length = stages[0][0].shape if depth else (0, 0)
    chunk_starts = np.zeros((depth, batch, length), bool)
    dropped = np.zeros((depth, batch, length), bool)
    rows = np.arange(batch)[:, None]
    # position_of[b, i]: input position of stage-s position i (length for an empty slot).
    position_of = np.broadcast_to(np.arange(length), (batch, length))
    for s, (boundary_mask, chunk_mask, chunk_position) in enumerate(stages):
        chunk_mask = np.asarray(chunk_mask)
        for out, selected in ((chunk_starts[s], chunk_mask), (dropped[s], np.asarray(boundary_mask) & ~chunk_mask)):
            b, i = np.nonzero(selected)
            out[b, position_of[b, i]] = True
        # Stage s+1 position m is stage-s position chunk_position[m]; empty slots point past the end.
        padded = np.concatenate([position_of, np.full((batch, 1), length)], axis=1)
        position_of = padded[rows, np.minimum(np.asarray(chunk_position), padded.shape[1] - 1)]
    return chunk_starts, dropped


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def on_separator(stream: np.ndarray) -> np.ndarray:
    """uint8/int (n,) input positions -> bool (n,): the byte at position t is a separator."""
    return SEPARATOR_TABLE[np.clip(np.asarray(stream), 0, 255)]


def after_separator(stream: np.ndarray) -> np.ndarray:
    """uint8/int (n,) input positions -> bool (n,): the byte before position t is a separator."""
    out = np.zeros(len(stream), bool)
    out[1:] = on_separator(np.asarray(stream)[:-1])
    return out


def chunk_lengths(boundary: np.ndarray) -> np.ndarray:
    """bool (n,) boundaries of one document (position 0 always starts a chunk) -> int (chunks,)."""
    starts = np.flatnonzero(boundary)
    if len(starts) == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    return np.diff(np.concatenate([starts, [len(boundary)]]))


@dataclass
class BoundaryStats:
    """Running chunk statistics of one chunking stage over whole documents."""

    positions: int = 0  # input positions seen (bytes; a document's BOS counts as one)
    chunks: int = 0  # chunk starts
    dropped: int = 0  # boundaries the router chose that did not become chunks
    chosen: int = 0  # chunk starts not forced by a document or window start
    chosen_after_separator: int = 0
    chosen_on_separator: int = 0  # the chunk begins with the separator (a GPT-2 style " word" cut)
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(HIST_MAX + 1, np.int64))

    def add(self, stream, chunk_start, dropped=None, forced=None) -> None:
        """One document's positions: stream (n,) byte values at the input positions, chunk_start
        (n,) bool, dropped (n,) bool, forced (n,) bool (chunk starts the model did not choose:
        the document start, window starts). Position 0 always starts a chunk, a forced one."""
        chunk_start = np.array(chunk_start, bool)
        n = len(chunk_start)
        forced = np.zeros(n, bool) if forced is None else np.array(forced, bool)
        if n:
            chunk_start[0] = forced[0] = True
        chosen = chunk_start & ~forced
        self.positions += n
        self.chunks += int(chunk_start.sum())
        self.dropped += 0 if dropped is None else int(np.asarray(dropped).sum())
        self.chosen += int(chosen.sum())
        self.chosen_after_separator += int((chosen & after_separator(stream)).sum())
        self.chosen_on_separator += int((chosen & on_separator(stream)).sum())
        if n:
            lengths = np.minimum(chunk_lengths(chunk_start), HIST_MAX)
            self.histogram += np.bincount(lengths, minlength=HIST_MAX + 1)

    @property
    def bytes_per_chunk(self) -> float:
        return self.positions / max(self.chunks, 1)

    @property
    def dropped_rate(self) -> float:
        """Dropped / the router's boundaries (chunks + dropped)."""
        return self.dropped / max(self.chunks + self.dropped, 1)

    @property
    def share_after_separator(self) -> float:
        """Share of chosen boundaries right after whitespace/punctuation (nan if none)."""
        return self.chosen_after_separator / self.chosen if self.chosen else float("nan")

    @property
    def share_on_separator(self) -> float:
        """Share of chosen boundaries at a whitespace/punctuation byte: the chunk begins with it,
        so the cut lies just before the separator (nan if none)."""
        return self.chosen_on_separator / self.chosen if self.chosen else float("nan")

    def to_dict(self) -> dict:
        return {
            "positions": self.positions,
            "chunks": self.chunks,
            "bytes_per_chunk": self.bytes_per_chunk,
            "dropped": self.dropped,
            "dropped_rate": self.dropped_rate,
            "share_after_separator": None if self.chosen == 0 else self.share_after_separator,
            "share_on_separator": None if self.chosen == 0 else self.share_on_separator,
            # chunk_length_histogram[k]: chunks of k bytes (k = HIST_MAX: HIST_MAX or more).
            "chunk_length_histogram": [int(c) for c in self.histogram],
        }


def format_histogram(histogram, width: int = 12) -> str:
    """'1:12% 2:30% ... 12+:3%' for a chunk length histogram (index = length in bytes)."""
    histogram = np.asarray(histogram)
    total = max(int(histogram.sum()), 1)
    head = [f"{k}:{histogram[k] / total:.0%}" for k in range(1, min(width, len(histogram)))]
    tail = histogram[width:].sum() if len(histogram) > width else 0
    return " ".join(head + [f"{width}+:{tail / total:.0%}"])


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def character_starts(text: bytes, positions) -> list[int]:
    """Byte positions moved back to the start of the UTF-8 character containing them, sorted,
    without duplicates, always including 0 when the text is not empty."""
    data = np.frombuffer(text, np.uint8)
    snapped = set()
    for p in positions:
        p = int(p)
        while p > 0 and (data[p] & 0xC0) == 0x80:  # continuation byte: step back
            p -= 1
        snapped.add(p)
    if len(text):
        snapped.add(0)
    return sorted(snapped)


def split_chunks(text: bytes, positions) -> list[str]:
    """The text cut at the given byte positions (snapped to character starts), decoded."""
    starts = character_starts(text, positions) + [len(text)]
    return [text[a:b].decode("utf-8", errors="backslashreplace") for a, b in zip(starts[:-1], starts[1:]) if b > a]


_COLOURS = ("\x1b[48;5;153m\x1b[30m", "\x1b[48;5;223m\x1b[30m")  # light blue, light orange; black text
_RESET = "\x1b[0m"


def render_terminal(text: bytes, positions, colour: bool) -> str:
    """The text with chunk starts marked: alternating background colours, or `|` before each
    chunk but the first. Newlines stay newlines (colour is reset before them)."""
    chunks = split_chunks(text, positions)
    if not colour:
        return "|".join(chunks)
    out = []
    for i, chunk in enumerate(chunks):
        paint = _COLOURS[i % 2]
        out.append(paint + chunk.replace("\n", _RESET + "\n" + paint) + _RESET)
    return "".join(out)


@dataclass
class ShownModel:
    """What one model's boundaries on a text look like, for the renderers.

    positions: per stage, the byte positions (into `text`) where the stage's chunks start;
    stats: per stage, BoundaryStats over the text; labels: per stage, its name ("stage 0
    (learned)", or "tokens" for a BPE model, whose tokens are its chunks).
    """

    name: str
    description: str
    positions: list
    stats: list
    labels: list


_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>H-Net chunk boundaries</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 80em; }}
pre {{ white-space: pre-wrap; word-break: break-all; font-size: 15px; line-height: 1.7;
       border: 1px solid #ccc; padding: 0.6em; }}
.c0 {{ background: #cfe3ff; }} .c1 {{ background: #ffe2c2; }}
.c0, .c1 {{ border-left: 1px solid #555; }}
table {{ border-collapse: collapse; margin: 0.4em 0 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }}
</style></head><body>
<h1>Chunk boundaries</h1>
<p>Each coloured span is one chunk; a new chunk starts at each change of colour (thin left rule).
Stage 0 chunks bytes; stage s &ge; 1 chunks the chunks of stage s-1, drawn here at the bytes
they start at. {nbytes} bytes of text.</p>
{sections}
</body></html>
"""


def render_html(text: bytes, models: list[ShownModel]) -> str:
    """A self-contained HTML page: per model and stage, the text with its chunks coloured."""
    sections = []
    for model in models:
        rows = "".join(
            f"<tr><td>{html.escape(label)}</td><td>{st.chunks}</td><td>{st.bytes_per_chunk:.2f}</td>"
            f"<td>{_percent(st.share_after_separator)}</td><td>{_percent(st.share_on_separator)}</td></tr>"
            for label, st in zip(model.labels, model.stats)
        )
        parts = [f"<h2>{html.escape(model.name)}</h2><p>{html.escape(model.description)}</p>"]
        if rows:
            parts.append(
                "<table><tr><th>stage</th><th>chunks</th><th>bytes/chunk</th>"
                "<th>after whitespace/punctuation</th><th>at whitespace/punctuation</th></tr>" + rows + "</table>"
            )
        else:
            parts.append("<p>No chunking stages (a flat byte model).</p>")
        for label, positions in zip(model.labels, model.positions):
            spans = "".join(
                f'<span class="c{i % 2}">{html.escape(chunk)}</span>'
                for i, chunk in enumerate(split_chunks(text, positions))
            )
            parts.append(f"<h3>{html.escape(label)}</h3><pre>{spans}</pre>")
        sections.append("\n".join(parts))
    return _PAGE.format(nbytes=len(text), sections="\n".join(sections))


def _percent(value: float) -> str:
    return "-" if value != value else f"{value:.1%}"


def format_separator_shares(stats: BoundaryStats) -> str:
    """'X% of boundaries after whitespace/punctuation, Y% at one' (nan shares shown as '-')."""
    return (
        f"{_percent(stats.share_after_separator)} of boundaries after whitespace/punctuation, "
        f"{_percent(stats.share_on_separator)} at one"
    )
