"""H-Net language models: the recursive stage, HNetLM, and the TransformerLM baseline.

    bytes (B, L) -> embedding -> HNetStage 0 -> lm_head -> logits (B, L, V)

HNetStage s:  encoder -> routing -> chunk -> HNetStage s+1 (or the main network) -> dechunk
              (+ residual_proj of the encoder output) -> decoder.
The outermost decoder's final RMSNorm is the model's final norm.

Every level (layer, block, stack, stage, model) has a `forward`: the parallel pass over whole
sequences, which training, evaluation and `LanguageModel.__call__` run. Generation: `prefill` runs
that forward over (right-padded) prompts and also returns the caches after each row's last prompt
position; `step` then advances one byte per row. An inner stage advances only for the rows that
start a chunk at that byte (see HNetStage.step).

Exactness: each document of a packed row is computed as if alone (hnet.segments), and whether a
position starts a chunk depends only on earlier positions of its document (hnet.chunking.
CapacityRule), so the forward over any row length, evaluation windows and decoding agree.

docs/ARCHITECTURE.md section 1 maps each H-Net equation to its function.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from hnet import chunking, slots
from hnet.config import ModelConfig
from hnet.layers.common import linear, param
from hnet.layers.isotropic import Isotropic, residual_count
from hnet.logical_axes import LOGITS_AXES, RESIDUAL_AXES, constrain
from hnet.segments import Segments, at_positions


@struct.dataclass
class StageOutput:
    """What one chunking stage reports (outermost stage first in ModelOutput.stages).

    Arrays over the stage's input positions (B, L_s; right padding of inner stages is False/0):
    boundary_mask (bool, the router's boundaries), chunk_mask (bool, the positions that start a
    chunk: the boundaries the capacity rule kept), boundary_prob (float32). chunk_position
    (B, M_s): input position of each chunk, L_s for empty slots. Scalars over the batch:
    ratio_loss, selected_fraction (F of the ratio loss), boundary_count, chunk_count,
    bytes_per_chunk (input bytes per chunk of this stage), dropped (boundaries that did not
    become chunks: boundary_count - chunk_count), chunk_slots (the slots the inner stacks computed
    these chunks on, hnet.slots; chunk_count / chunk_slots is the slot utilisation).
    """

    boundary_mask: jax.Array
    chunk_mask: jax.Array
    boundary_prob: jax.Array
    chunk_position: jax.Array
    ratio_loss: jax.Array
    selected_fraction: jax.Array
    boundary_count: jax.Array
    chunk_count: jax.Array
    bytes_per_chunk: jax.Array
    dropped: jax.Array
    chunk_slots: jax.Array


@struct.dataclass
class ModelOutput:
    """logits: float32 (B, L, V); stages: tuple of StageOutput, empty for a TransformerLM."""

    logits: jax.Array
    stages: tuple = ()


@struct.dataclass
class StageCache:
    """Generation state of one chunking stage for B rows.

    encoder, decoder: block caches of the two stacks; inner: the next stage's StageCache, or the
    main network's block caches. last_hidden (B, D) float32: encoder output at the previous
    position (routing compares it with the current one). last_smoothed (B, D) float32: the
    dechunked value of the latest chunk. last_byte (B,) int32: the previous input byte ("space"
    routing). length (B,): positions seen; chunks (B,): chunks passed to the inner stage;
    doc_length (B,): positions of the current document seen; doc_chunks (B,): chunks the capacity
    rule let the current document keep (ChunkLayout.doc_chunks).
    """

    encoder: tuple
    decoder: tuple
    inner: Any
    last_hidden: jax.Array
    last_smoothed: jax.Array
    last_byte: jax.Array
    length: jax.Array
    chunks: jax.Array
    doc_length: jax.Array
    doc_chunks: jax.Array


@struct.dataclass
class ModelCache:
    """Generation state of a LanguageModel: the outermost stage's cache (a StageCache, or the
    block caches of a TransformerLM), positions seen per row (B,), and the static per-stage
    sequence lengths the caches were sized for (chunking.stage_lengths of the maximum length)."""

    stage: Any
    length: jax.Array
    max_lengths: tuple = struct.field(pytree_node=False)


def _keep_rows(active: jax.Array, new, old):
    """Per row: the new cache where `active` (B,), else the old one."""

    def pick(n, o):
        return jnp.where(active.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

    return jax.tree_util.tree_map(pick, new, old)


class HNetStage(nnx.Module):
    """One level of the hierarchy: (B, L, D_s) float32 -> (B, L, D_s) float32 plus stage reports.

    At stage == config.depth it is just the main network (an isotropic stack).

    n_res_outer: residual additions in the encoders and decoders of all enclosing stages. Output
    projections are initialised with std 0.02 / sqrt(n_res), counted as the reference's
    HNet._init_weights counts: a stage's encoder and decoder both use n_res_outer + encoder +
    decoder residuals, the main network n_res_outer + its own.
    """

    def __init__(self, config: ModelConfig, stage: int, n_res_outer: int, rngs: nnx.Rngs):
        self.stage, self.config = stage, config
        self.is_main = stage == config.depth
        if self.is_main:
            (main_layout,) = config.stage_layout(stage)
            self.main = Isotropic(main_layout, config, stage, n_res_outer + residual_count(main_layout), rngs)
            return
        encoder_layout, decoder_layout = config.stage_layout(stage)
        d_model, d_inner = config.d_model[stage], config.d_model[stage + 1]
        n_res = n_res_outer + residual_count(encoder_layout) + residual_count(decoder_layout)
        self.encoder = Isotropic(encoder_layout, config, stage, n_res, rngs)
        self.routing_mode, self.stride = config.routing_mode(stage)
        if self.routing_mode == "learned":
            self.routing = chunking.Routing(d_model)
        self.capacity_rule = chunking.CapacityRule.for_stage(config, stage)
        self.inner = HNetStage(config, stage + 1, n_res, rngs)
        self.decoder = Isotropic(decoder_layout, config, stage, n_res, rngs)
        # Zero weight at init, so the decoder starts from the dechunked chunks alone. The bias is the
        # reference's too (its checkpoints hold trained non-zero ones); ours starts at zero.
        self.residual_proj = linear(
            d_model, d_model, ("embed", "embed_out"), rngs, dtype=jnp.float32, std=0.0, bias=True
        )
        if d_inner > d_model:  # learned padding that widens chunk features to the inner width
            self.pad_dimension = param(jnp.zeros((d_inner - d_model,), jnp.float32), ("embed",))

    def boundaries(self, hidden, segments: Segments, byte_ids):
        """-> boundary_prob (B, L) float32, boundary_mask (B, L) bool, before validity masking."""
        if self.routing_mode == "learned":
            prob = self.routing(hidden, segments.start)
            return prob, chunking.is_boundary(prob)
        if self.routing_mode == "space":
            mask = chunking.space_boundaries(byte_ids)
        else:
            mask = chunking.stride_boundaries(segments.position, self.stride)
        mask = mask | segments.start
        return mask.astype(jnp.float32), mask

    def forward(
        self,
        x,
        valid,
        segments: Segments,
        byte_ids=None,
        num_bytes=None,
        lengths=None,
        max_lengths=None,
        rows: slots.SlotRows | None = None,
        ladders=None,
    ):
        """The forward pass over x (B, L, D) float32, each document of a row on its own.

        valid (B, L) bool (False on right padding); segments: the rows' documents; byte_ids (B, L)
        int (outermost stage only, for "space" routing); num_bytes: scalar, real bytes in the batch.
        With `lengths` (B,) real lengths (valid = positions < lengths) and static per-stage
        `max_lengths`, also returns the cache after each row's last real position.
        rows: this stage's input rows on the slot ladder (an inner stage in training and
        evaluation, hnet.slots), so that its stacks run on the chunks kept; ladders: every chunking
        stage's slot ladder (None: the inner stages run on their static cap).

        Returns (y (B, L, D), stage reports, StageCache / main block caches / None).
        """
        max_length = None if max_lengths is None else max_lengths[self.stage]
        if self.is_main:
            y, caches = self._run_stack(self.main, x, segments, rows, lengths, max_length)
            return y, (), caches
        d_model = x.shape[-1]
        hidden, encoder_cache = self._run_stack(self.encoder, x, segments, rows, lengths, max_length)
        boundary_prob, boundary_mask = self.boundaries(hidden, segments, byte_ids)
        boundary_mask = boundary_mask & valid
        boundary_prob = jnp.where(valid, boundary_prob, 0.0)

        capacity = self.capacity_rule.row_capacity(x.shape[1])
        layout = chunking.chunk_layout(boundary_mask, segments, self.capacity_rule, capacity)
        chunks = constrain(self.widen(chunking.gather_chunks(hidden, layout)), RESIDUAL_AXES)
        inner_segments = Segments.from_starts(chunking.gather_chunks(segments.start, layout) & layout.chunk_valid)
        chunk_counts = layout.chunk_valid.sum(axis=1, dtype=jnp.int32)
        inner_lengths = None if lengths is None else chunk_counts
        inner_rows = (
            None
            if ladders is None
            else slots.SlotRows(chunk_counts, ladders[self.stage], self.config.slot_groups, self.stage)
        )
        inner_out, inner_stages, inner_cache = self.inner.forward(
            chunks,
            layout.chunk_valid,
            inner_segments,
            num_bytes=num_bytes,
            lengths=inner_lengths,
            max_lengths=max_lengths,
            rows=inner_rows,
            ladders=ladders,
        )

        chunk_prob = chunking.gather_chunks(boundary_prob, layout)
        smoothed = chunking.dechunk(inner_out[..., :d_model], chunk_prob, inner_segments.start, layout)
        smoothed = constrain(smoothed, RESIDUAL_AXES)
        confidence = chunking.confidence(boundary_prob, layout.chunk_mask)
        y = smoothed * chunking.straight_through(confidence)[..., None] + self.residual_proj(hidden)
        out, decoder_cache = self._run_stack(self.decoder, y, segments, rows, lengths, max_length)

        chunk_slots = (
            jnp.asarray(x.shape[0] * capacity, jnp.float32) if inner_rows is None else slots.slots_computed(inner_rows)
        )
        report = self.report(boundary_mask, boundary_prob, valid, layout, num_bytes, chunk_slots)
        cache = None
        if lengths is not None:
            last = jnp.maximum(lengths - 1, 0)
            last_byte = jnp.zeros_like(lengths) if byte_ids is None else at_positions(byte_ids, last)
            cache = StageCache(
                encoder=encoder_cache,
                decoder=decoder_cache,
                inner=inner_cache,
                last_hidden=at_positions(hidden, last),
                last_smoothed=at_positions(smoothed, last),
                last_byte=last_byte.astype(jnp.int32),
                length=lengths.astype(jnp.int32),
                chunks=inner_lengths,
                doc_length=at_positions(segments.position, last) + 1,
                doc_chunks=at_positions(layout.doc_chunks, last),
            )
        return out, (report,) + inner_stages, cache

    @staticmethod
    def _run_stack(stack, x, segments: Segments, rows, lengths, max_length):
        """stack.forward over this stage's input: on the slot ladder when `rows` is given (no
        caches then), else on all L positions -> (y (B, L, D), block caches or None)."""
        if rows is None:
            return stack.forward(x, segments, lengths, max_length)
        return slots.run_stack(stack, x, segments, rows), None

    def widen(self, chunks):
        """(..., D_s) chunk features -> (..., D_{s+1}): append the learned padding when wider."""
        if not hasattr(self, "pad_dimension"):
            return chunks
        pad = jnp.broadcast_to(self.pad_dimension[...], chunks.shape[:-1] + self.pad_dimension.shape)
        return jnp.concatenate([chunks, pad], axis=-1)

    def step_boundary(self, hidden, doc_start, doc_position, byte, cache: StageCache):
        """One position: hidden (B, D), doc_start (B,), doc_position (B,), byte (B,)
        -> (prob (B,) float32, mask (B,) bool), as `boundaries` computes them."""
        if self.routing_mode == "learned":
            prob = self.routing.step(cache.last_hidden, hidden, doc_start)
            return prob, chunking.is_boundary(prob)
        if self.routing_mode == "space":
            pair = jnp.stack([cache.last_byte, byte], axis=1)
            mask = chunking.space_boundaries(pair)[:, 1]
        else:
            mask = chunking.stride_boundaries(doc_position, self.stride)
        mask = mask | doc_start
        return mask.astype(jnp.float32), mask

    def step(self, x, doc_start, byte, cache, active, max_lengths):
        """Advance the rows where `active` (B,) by one position; the other rows keep their state.

        x (B, D) float32, doc_start (B,) bool, byte (B,) int32 (outermost stage; else ignored).
        Returns (y (B, D) float32, the updated cache, chunk starts): a tuple of (B,) bool, one per
        stage from this one inward, True where that stage starts a chunk at this position. The
        inner stage runs only when some row starts a chunk, and only those rows' inner state changes.
        """
        if self.is_main:
            y, caches = self.main.step(x, cache, doc_start)
            return y, _keep_rows(active, caches, cache), ()
        d_model = x.shape[-1]
        hidden, encoder_cache = self.encoder.step(x, cache.encoder, doc_start)
        doc_position = jnp.where(doc_start, 0, cache.doc_length)
        doc_chunks = jnp.where(doc_start, 0, cache.doc_chunks)
        boundary_prob, boundary_mask = self.step_boundary(hidden, doc_start, doc_position, byte, cache)
        # The capacity rule as in the forward (chunking.chunk_layout): per document, then per row.
        kept = chunking.bucket_keeps(doc_chunks, boundary_mask, doc_position, self.capacity_rule)
        chunk_mask = chunking.bucket_keeps(cache.chunks, kept, cache.length, self.capacity_rule)
        to_inner = active & chunk_mask
        chunk = self.widen(hidden)

        def run_inner():
            return self.inner.step(chunk, doc_start, byte, cache.inner, to_inner, max_lengths)

        def skip_inner():
            no_chunks = tuple(jnp.zeros_like(to_inner) for _ in range(self.config.depth - self.stage - 1))
            return jnp.zeros_like(chunk), cache.inner, no_chunks

        inner_out, inner_cache, inner_chunks = jax.lax.cond(jnp.any(to_inner), run_inner, skip_inner)
        updated = chunking.ema_step(cache.last_smoothed, inner_out[:, :d_model], boundary_prob, doc_start)
        smoothed = jnp.where(to_inner[:, None], updated, cache.last_smoothed)
        confidence = chunking.confidence(boundary_prob, chunk_mask)
        y = smoothed * chunking.straight_through(confidence)[:, None] + self.residual_proj(hidden)
        out, decoder_cache = self.decoder.step(y, cache.decoder, doc_start)
        new_cache = StageCache(
            encoder=encoder_cache,
            decoder=decoder_cache,
            inner=inner_cache,
            last_hidden=hidden.astype(jnp.float32),
            last_smoothed=smoothed,
            last_byte=byte.astype(jnp.int32),
            length=cache.length + 1,
            chunks=cache.chunks + chunk_mask.astype(jnp.int32),
            doc_length=doc_position + 1,
            doc_chunks=doc_chunks + kept.astype(jnp.int32),
        )
        return out, _keep_rows(active, new_cache, cache), (to_inner,) + inner_chunks

    def report(
        self, boundary_mask, boundary_prob, valid, layout: chunking.ChunkLayout, num_bytes, chunk_slots
    ) -> StageOutput:
        loss, selected, _ = chunking.ratio_loss(boundary_mask, boundary_prob, valid, self.config.ratio(self.stage))
        if self.routing_mode != "learned":
            loss = jnp.zeros((), jnp.float32)  # heuristic boundaries have nothing to learn
        chunk_count = layout.chunk_mask.sum(dtype=jnp.float32)
        return StageOutput(
            boundary_mask=boundary_mask,
            chunk_mask=layout.chunk_mask,
            boundary_prob=boundary_prob,
            chunk_position=layout.chunk_position,
            ratio_loss=loss,
            selected_fraction=selected,
            boundary_count=boundary_mask.sum(dtype=jnp.float32),
            chunk_count=chunk_count,
            bytes_per_chunk=num_bytes / jnp.maximum(chunk_count, 1.0),
            dropped=layout.dropped.sum(dtype=jnp.float32),
            chunk_slots=chunk_slots,
        )


class LanguageModel(nnx.Module):
    """input_ids (B, L) int32 -> ModelOutput. Embedding -> HNetStage 0 -> LM head."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(config.dtype)
        d_model = config.d_model[0]
        self.embedding = nnx.Embed(
            config.vocab_size,
            d_model,
            param_dtype=jnp.float32,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(stddev=1.0), ("vocab", "embed")),
            rngs=rngs,
        )
        self.backbone = HNetStage(config, 0, 0, rngs)
        if not config.tie_embeddings:
            self.lm_head = linear(d_model, config.vocab_size, ("embed", "vocab"), rngs, dtype=self.dtype)

    def __call__(self, input_ids: jax.Array) -> ModelOutput:
        """The forward pass of training and scoring: input_ids (B, L) -> ModelOutput."""
        return self.forward(input_ids)[0]

    def prefill(self, input_ids: jax.Array, lengths: jax.Array, max_length: int):
        """Generation's first pass: the forward over prompts input_ids (B, L), right-padded to
        `lengths` (B,), -> (ModelOutput, ModelCache after each row's last prompt position, sized
        for sequences of up to the static `max_length`), ready for `step`."""
        return self.forward(input_ids, lengths, max_length)

    def forward(self, input_ids: jax.Array, lengths: jax.Array | None = None, max_length: int | None = None):
        """The forward pass over input_ids (B, L) -> (ModelOutput, ModelCache or None).

        A row may hold several documents, each starting at config.bos_id; each is computed as if
        it were alone. With `lengths` (B,) (each row's prompt length; the rest is right padding,
        which never influences real positions) and a static `max_length` (the longest sequence
        generation will reach), also returns the caches after each row's last prompt position.
        """
        batch, length = input_ids.shape
        x = constrain(self.embedding(input_ids).astype(jnp.float32), RESIDUAL_AXES)
        positions = jnp.arange(length)[None, :]
        valid = jnp.ones((batch, length), bool) if lengths is None else positions < lengths[:, None]
        segments = Segments.from_starts((input_ids == self.config.bos_id) & valid)  # padding starts nothing
        max_lengths = None if lengths is None else tuple(chunking.stage_lengths(self.config, max_length))
        # Filling generation caches needs the static lengths; otherwise the inner stages follow the chunks kept.
        ladders = slots.model_ladders(self.config, length) if lengths is None else None
        num_bytes = jnp.sum(valid, dtype=jnp.float32)
        hidden, stages, stage_cache = self.backbone.forward(
            x,
            valid,
            segments,
            byte_ids=input_ids,
            num_bytes=num_bytes,
            lengths=lengths,
            max_lengths=max_lengths,
            ladders=ladders,
        )
        output = ModelOutput(logits=constrain(self.logits(hidden), LOGITS_AXES), stages=stages)
        if lengths is None:
            return output, None
        return output, ModelCache(stage=stage_cache, length=lengths.astype(jnp.int32), max_lengths=max_lengths)

    def step(self, ids: jax.Array, cache: ModelCache):
        """One token per row: ids (B,) int32 -> (logits (B, V) float32 for the next token,
        ModelCache, boundaries: tuple of (B,) bool per stage, True where ids start a chunk)."""
        x = self.embedding(ids).astype(jnp.float32)
        doc_start = (ids == self.config.bos_id) | (cache.length == 0)
        active = jnp.ones(ids.shape, bool)
        hidden, stage_cache, boundaries = self.backbone.step(x, doc_start, ids, cache.stage, active, cache.max_lengths)
        cache = ModelCache(stage=stage_cache, length=cache.length + 1, max_lengths=cache.max_lengths)
        return self.logits(hidden), cache, boundaries

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final hidden states (..., D) float32 -> float32 logits (..., V)."""
        hidden = hidden.astype(self.dtype)
        if self.config.tie_embeddings:
            logits = hidden @ self.embedding.embedding[...].astype(self.dtype).T
        else:
            logits = self.lm_head(hidden)
        return logits.astype(jnp.float32)


class HNetLM(LanguageModel):
    """Byte-level H-Net (config depth >= 1)."""


class TransformerLM(LanguageModel):
    """The baseline: the same blocks with no chunking (config depth 0), over bytes or BPE tokens."""


def build_model(config: ModelConfig, seed: int = 0) -> LanguageModel:
    """HNetLM for hierarchical configs, TransformerLM for flat ones, initialised from `seed`."""
    cls = HNetLM if config.is_hierarchical else TransformerLM
    return cls(config, nnx.Rngs(params=seed))


LN2 = math.log(2.0)


def bits_per_byte(nll_nats, num_bytes):
    """Total next-byte (or token) NLL in nats over the bytes it covers -> bits per byte."""
    return nll_nats / (LN2 * num_bytes)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-position next-token negative log-likelihood in nats: (B, L, V), (B, L) -> float32 (B, L)."""
    logits = logits.astype(jnp.float32)
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return log_norm - target_logit
