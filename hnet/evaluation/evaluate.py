"""Scoring documents: bits per byte of byte and token models on the same bytes, with chunk statistics.

Every document is scored on its own, from a fresh start:

    stream = [BOS] + document          BOS = byte 254 (byte models) or the tokenizer's bos_id,
                                       the document as bytes, or as its BPE tokens (token models)

The model reads stream[t] and is scored on predicting stream[t + 1], for t = 0 .. n - 1 (n =
bytes or tokens of the document): every byte (token) of the document is predicted exactly once,
the BOS never. Bits per byte = summed NLL in nats / (ln 2 x bytes), where bytes is always the
document's length in bytes; for a token model the summed token NLL is divided by the bytes the
tokens stand for, which equal the document's length exactly (checked per document). So byte and
token models are scored on the same bytes and their bpb compare directly.

Windowing. The model sees at most W positions at a time (W = the run's train.seq_len, or
--window; in tokens for a token model). A document with n <= W is one window. A longer one is
scored with windows of exactly W positions and stride S (default W // 2):

    window 0 reads stream[0 : W]                       and scores targets 1 .. W
    window k reads stream[a_k : a_k + W],  a_k = min(k S, n - W),
                                                      and scores the targets not scored yet,
                                                      i.e. a_{k-1} + W + 1 .. a_k + W
    until target n is scored.

So every target is scored exactly once; each target after the first window has at least W - S
positions of context inside its window (the last window is aligned to the document's end and
has more). A window that starts inside a document starts its model pass there, as training
windows do. Windows are batched (B rows of W positions, short documents and the last batch
right-padded and masked out), so a model compiles for one input shape only; right padding never
influences real positions (the models are causal).

Chunk statistics (H-Nets) are counted over the input positions whose prediction is scored (the
BOS and every byte but the last, n per document), each once, with each stage's boundaries
mapped to byte positions (hnet.evaluation.boundaries). Evaluation uses the model's own capacity rule, the
one it was trained with (a document is chunked exactly as in training and generation); the
capacity slack can be overridden (Scorer's capacity_slack, eval.py --capacity-slack), which then
shows in the result. Boundaries the rule dropped are reported per stage.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hnet import config as config_lib
from hnet.errors import EvalError
from hnet.evaluation.boundaries import BoundaryStats, byte_boundaries
from hnet.io.data import PreparedCorpus
from hnet.model import bits_per_byte, build_model, cross_entropy

PAD_ID = 0  # right padding of short windows (never scored, never seen by real positions)


# --------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------


@dataclass
class Documents:
    """The documents to score (bytes each) and a one-line description of where they came from."""

    docs: list
    description: str

    @property
    def num_bytes(self) -> int:
        return sum(len(d) for d in self.docs)


def corpus_documents(corpus: PreparedCorpus, split: str, max_bytes: int | None = None) -> Documents:
    """The documents of a prepared corpus split, in order, optionally cut to `max_bytes`."""
    if getattr(corpus, "is_tokens", False):
        raise EvalError(f"{corpus.path} is a token corpus; evaluate on the byte corpus it was made from")
    info = corpus.split_info(split)
    docs = take_prefix((bytes(d) for d in corpus.documents(split)), max_bytes)
    return Documents(docs, f"{corpus.path} split '{split}' ({info.num_docs:,d} documents, {info.num_bytes:,d} bytes)")


def text_file_documents(path: str | Path, separator: bytes | None = None, max_bytes: int | None = None) -> Documents:
    """A plain text file as one document, or split on `separator` (dropped) as the text preparer
    does (python -m data.prepare text --doc-separator); empty pieces are dropped."""
    from data.text.prepare import iter_documents

    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such file or prepared corpus folder")
    docs = take_prefix((d for d in iter_documents(path, separator) if d), max_bytes)
    how = "one document" if separator is None else f"documents split on {separator!r}"
    return Documents(docs, f"{path} ({how})")


def take_prefix(docs: Iterable[bytes], max_bytes: int | None) -> list[bytes]:
    """The documents in order until `max_bytes` bytes; the last one is cut at a UTF-8 character
    start so that the total is at most max_bytes (None: all documents)."""
    out, total = [], 0
    for doc in docs:
        if max_bytes is not None and total + len(doc) > max_bytes:
            cut = max_bytes - total
            while 0 < cut < len(doc) and (doc[cut] & 0xC0) == 0x80:  # not inside a character
                cut -= 1
            if cut > 0:
                out.append(doc[:cut])
            break
        out.append(doc)
        total += len(doc)
    return out


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------


def plan_windows(num_targets: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a stream with `num_targets` targets (stream length num_targets + 1).

    Returns (start, score_from, length) per window: the window reads stream[start : start +
    length] and scores its positions score_from .. length - 1 (position i predicts stream[start +
    i + 1]). See the module docstring; every target is scored exactly once.
    """
    if not 1 <= stride <= window:
        raise EvalError(f"stride must be between 1 and the window ({window}), got {stride}")
    if num_targets <= window:
        return [(0, 0, num_targets)] if num_targets else []
    windows = [(0, 0, window)]
    scored = window  # targets 1 .. scored are done
    while scored < num_targets:
        start = min(scored + stride - window, num_targets - window)
        windows.append((start, scored - start, window))
        scored = start + window
    return windows


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


@dataclass
class DocumentScores:
    """One scored document. n = targets (bytes or tokens).

    stream: int32 (n + 1,) [BOS] + ids; nll: float32 (n,), NLL in nats of predicting stream[t+1]
    from position t; chunk_starts, dropped, forced: bool (depth, n) per stage over the input
    positions 0 .. n-1 (byte positions of the stream); forced marks window starts inside the
    document, where the model starts a chunk whatever it would otherwise choose.
    """

    stream: np.ndarray
    nll: np.ndarray
    chunk_starts: np.ndarray
    dropped: np.ndarray
    forced: np.ndarray


@partial(jax.jit, static_argnums=0)
def score_batch(graphdef, state, input_ids, targets):
    """-> (nll, greedy, stages) of a model split as (graphdef, state) on int32 (B, L) inputs and targets:
    nll float32 (B, L), the NLL in nats of each target; greedy bool (B, L), whether the target is the
    model's most likely next id; stages, per chunking stage, (boundary_mask, chunk_mask,
    chunk_position). Compiled once per model structure and input shape, so scorers of models with
    equal structure (e.g. checkpoints of one run) share it."""
    out = nnx.merge(graphdef, state)(input_ids)
    stages = tuple((s.boundary_mask, s.chunk_mask, s.chunk_position) for s in out.stages)
    greedy = jnp.argmax(out.logits, axis=-1) == targets
    return cross_entropy(out.logits, targets), greedy, stages


def with_config(model, config: config_lib.ModelConfig):
    """The same parameters under a config that changes no parameter shape (e.g. capacity_slack)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(config)))
    return nnx.merge(graphdef, nnx.state(model))


class Scorer:
    """A model ready to score documents: one jitted function over batches of (batch_size, window).

    model: a LanguageModel; tokenizer: a BPETokenizer for token models (not config.is_byte_model), else
    None; window W and stride S as in the module docstring (stride None: W // 2);
    capacity_slack: None (the model's own capacity rule, as trained) or an override (a number
    or "exact"), recorded in the result.
    """

    def __init__(
        self,
        model,
        *,
        window: int,
        stride: int | None = None,
        batch_size: int = 8,
        tokenizer=None,
        capacity_slack: float | None = None,
    ):
        config = model.config
        if not config.is_byte_model and tokenizer is None:
            raise EvalError(f"a token model (vocab_size {config.vocab_size}) needs its tokenizer (tokenizer.json)")
        if tokenizer is not None and tokenizer.vocab_size != config.vocab_size:
            raise EvalError(
                f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {config.vocab_size}"
            )
        if window < 1 or batch_size < 1:
            raise EvalError(f"window and batch size must be positive, got {window} and {batch_size}")
        if tokenizer is not None and tokenizer.bos_id != config.bos_id:
            raise EvalError(f"the tokenizer's BOS id is {tokenizer.bos_id} but the model's bos_id is {config.bos_id}")
        self.trained_capacity_slack = config.capacity_slack if config.depth else None
        if config.depth and capacity_slack is not None:
            try:
                config = config_lib.replace(config, capacity_slack=capacity_slack)
            except config_lib.ConfigError as err:
                raise EvalError(f"--capacity-slack: {err}") from None
            model = with_config(model, config)
        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.window, self.stride, self.batch_size = window, stride or max(window // 2, 1), batch_size
        plan_windows(1, self.window, self.stride)  # check the stride once
        self.bos_id = config.bos_id
        self._graphdef, state = nnx.split(model)
        # Committed to one device like load_model's parameters, so that a built model and a loaded
        # one of the same structure share score_batch's compiled code (committedness is part of
        # jit's cache key).
        self._state = jax.device_put(state, jax.local_devices()[0])

    @property
    def depth(self) -> int:
        return self.config.depth

    def stream(self, doc: bytes) -> np.ndarray:
        """int32 [BOS] + the document's bytes or tokens."""
        ids = self.tokenizer.encode(bytes(doc)) if self.tokenizer is not None else np.frombuffer(bytes(doc), np.uint8)
        return np.concatenate([[self.bos_id], ids]).astype(np.int32)

    def score_rows(self, input_ids: np.ndarray, targets: np.ndarray):
        """score_batch on this model, fetched to the host: (nll, greedy, stages) as numpy arrays."""
        return jax.device_get(score_batch(self._graphdef, self._state, input_ids, targets))

    def score_streams(self, streams: Iterable[np.ndarray]) -> Iterator[DocumentScores]:
        """Score each stream ([BOS] + ids), yielding DocumentScores in order."""
        pending: OrderedDict[int, list] = OrderedDict()  # doc -> [DocumentScores, windows left]
        batch: list[tuple[int, tuple[int, int, int]]] = []
        for doc, stream in enumerate(streams):
            n = len(stream) - 1
            plan = plan_windows(n, self.window, self.stride)
            scores = DocumentScores(
                stream=np.asarray(stream, np.int32),
                nll=np.zeros(n, np.float32),
                chunk_starts=np.zeros((self.depth, n), bool),
                dropped=np.zeros((self.depth, n), bool),
                forced=np.zeros((self.depth, n), bool),
            )
            pending[doc] = [scores, len(plan)]
            for window in plan:
                batch.append((doc, window))
                if len(batch) == self.batch_size:
                    self._run(batch, pending)
                    batch = []
            yield from _finished(pending)
        if batch:
            self._run(batch, pending)
        yield from _finished(pending)

    def _run(self, batch, pending) -> None:
        """One model call over up to batch_size windows; writes into the documents' scores."""
        rows, width = self.batch_size, self.window
        input_ids = np.full((rows, width), PAD_ID, np.int32)
        targets = np.zeros((rows, width), np.int32)
        for r, (doc, (start, _, length)) in enumerate(batch):
            stream = pending[doc][0].stream
            input_ids[r, :length] = stream[start : start + length]
            targets[r, :length] = stream[start + 1 : start + length + 1]
        nll, _, stages = self.score_rows(input_ids, targets)
        chunk_starts, dropped = byte_boundaries(stages) if stages else (None, None)
        for r, (doc, (start, score_from, length)) in enumerate(batch):
            scores = pending[doc][0]
            span = slice(start + score_from, start + length)
            scores.nll[span] = nll[r, score_from:length]
            if chunk_starts is not None:
                scores.chunk_starts[:, span] = chunk_starts[:, r, score_from:length]
                scores.dropped[:, span] = dropped[:, r, score_from:length]
                if start > 0 and score_from == 0:
                    scores.forced[:, start] = True
            pending[doc][1] -= 1

    def evaluate(self, documents: Documents | list, progress=None) -> "EvalResult":
        """Score every document; bits per byte and chunk statistics over all of them."""
        docs = documents.docs if isinstance(documents, Documents) else list(documents)
        result = EvalResult(
            window=self.window,
            stride=self.stride,
            capacity_slack=self.config.capacity_slack if self.depth else None,
            trained_capacity_slack=self.trained_capacity_slack,
            stages=[BoundaryStats() for _ in range(self.depth)],
        )
        began = time.perf_counter()
        streams = (self.stream(doc) for doc in docs)
        for doc, scores in zip(docs, self.score_streams(streams)):
            if self.tokenizer is not None:
                covered = int(self.tokenizer.byte_lengths[scores.stream[1:]].sum())
                if covered != len(doc):
                    raise EvalError(f"the tokenizer's tokens cover {covered} bytes of a {len(doc)}-byte document")
            result.nll += float(np.sum(scores.nll, dtype=np.float64))
            result.bytes += len(doc)
            result.positions += len(scores.nll)
            result.documents += 1
            for s, stats in enumerate(result.stages):
                stats.add(scores.stream[:-1], scores.chunk_starts[s], scores.dropped[s], scores.forced[s])
            if progress is not None:
                progress(len(doc))
        result.seconds = time.perf_counter() - began
        return result

    def boundary_positions(self, text: bytes) -> tuple[list[np.ndarray], list[BoundaryStats]]:
        """Where each stage's chunks start in `text` (byte positions, one array per stage) and
        each stage's statistics over the text's bytes (the text's start starts a chunk). The text
        is read after a BOS, like a document (windowed if long). A token model has one "stage",
        its tokens; a flat byte model has none."""
        data = np.frombuffer(text, np.uint8)
        if self.tokenizer is not None:
            lengths = self.tokenizer.byte_lengths[self.tokenizer.encode(text)]
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            boundary = np.zeros(len(text), bool)
            boundary[starts] = True
            stats = BoundaryStats()
            stats.add(data, boundary)
            return [starts], [stats]
        if not self.depth:
            return [], []
        # One extra target so that the last text byte is an input too (its prediction is unused).
        stream = np.concatenate([[self.bos_id], data, [PAD_ID]]).astype(np.int32)
        (scores,) = self.score_streams([stream])
        positions, stats = [], []
        for s in range(self.depth):
            # Stream position p >= 1 is text byte p - 1.
            chunk_start, dropped, forced = scores.chunk_starts[s][1:], scores.dropped[s][1:], scores.forced[s][1:]
            st = BoundaryStats()
            st.add(data, chunk_start, dropped, forced)
            positions.append(np.flatnonzero(chunk_start))
            stats.append(st)
        return positions, stats


def _finished(pending: OrderedDict) -> Iterator[DocumentScores]:
    """Pop and yield the documents at the front whose windows are all scored (in order)."""
    while pending:
        doc, (scores, left) = next(iter(pending.items()))
        if left:
            return
        del pending[doc]
        yield scores


@dataclass
class EvalResult:
    """Totals of an evaluation. nll in nats; positions = scored predictions (bytes or tokens)."""

    window: int
    stride: int
    capacity_slack: float | str | None  # the capacity slack evaluated with (H-Nets)
    trained_capacity_slack: float | str | None  # the model's own; differs when overridden
    nll: float = 0.0
    bytes: int = 0
    positions: int = 0
    documents: int = 0
    seconds: float = 0.0
    stages: list = field(default_factory=list)

    @property
    def bpb(self) -> float:
        return bits_per_byte(self.nll, max(self.bytes, 1))

    @property
    def nats_per_byte(self) -> float:
        return self.nll / max(self.bytes, 1)

    @property
    def perplexity(self) -> float:
        """Per-byte perplexity, 2 ** bpb."""
        return 2.0**self.bpb

    def to_dict(self) -> dict:
        out = {
            "bpb": self.bpb,
            "perplexity": self.perplexity,
            "nats_per_byte": self.nats_per_byte,
            "bytes": self.bytes,
            "documents": self.documents,
            "positions": self.positions,
            "bytes_per_position": self.bytes / max(self.positions, 1),
            "window": self.window,
            "stride": self.stride,
            "capacity_slack": self.capacity_slack,
            "trained_capacity_slack": self.trained_capacity_slack,
            "seconds": self.seconds,
        }
        out["stages"] = [stats.to_dict() for stats in self.stages]
        return out
