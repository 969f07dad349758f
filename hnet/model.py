"""H-Net language models: the recursive stage, HNetLM, and the TransformerLM baseline.

    bytes (B, L) -> embedding -> HNetStage 0 -> lm_head -> logits (B, L, V)

HNetStage s:  encoder -> routing -> chunk -> HNetStage s+1 (or the main network) -> dechunk
              (+ residual_proj of the encoder output) -> decoder.
The outermost decoder's final RMSNorm is the model's final norm.

Generation: `prefill` runs the parallel forward over (right-padded) prompts and returns the caches
after each row's last prompt position; `step` then advances one byte per row. An inner stage
advances only for the rows whose routing emits a boundary at that byte (see HNetStage.step).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from hnet import chunking, sharding
from hnet.config import ModelConfig
from hnet.data import BOS_ID, EOS_ID  # noqa: F401  (EOS_ID is re-exported: hnet.EOS_ID)
from hnet.layers.common import linear, param
from hnet.layers.isotropic import Isotropic, residual_count



@struct.dataclass
class StageOutput:
    """What one chunking stage reports (outermost stage first in ModelOutput.stages).

    Arrays over the stage's input positions (B, L_s): boundary_mask (bool), boundary_prob
    (float32), valid_mask (bool; False on right padding of inner stages). chunk_position (B, M_s):
    input position of each chunk, L_s for empty slots. Scalars over the batch: ratio_loss,
    selected_fraction (F), mean_prob (G), boundary_count, position_count, bytes_per_chunk,
    overflow (boundaries dropped for lack of capacity).
    """

    boundary_mask: jax.Array
    boundary_prob: jax.Array
    valid_mask: jax.Array
    chunk_position: jax.Array
    ratio_loss: jax.Array
    selected_fraction: jax.Array
    mean_prob: jax.Array
    boundary_count: jax.Array
    position_count: jax.Array
    bytes_per_chunk: jax.Array
    overflow: jax.Array


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
    routing). length (B,): positions seen; chunks (B,): chunks passed to the inner stage.
    """

    encoder: tuple
    decoder: tuple
    inner: Any
    last_hidden: jax.Array
    last_smoothed: jax.Array
    last_byte: jax.Array
    length: jax.Array
    chunks: jax.Array


@struct.dataclass
class ModelCache:
    """Generation state of a LanguageModel: the outermost stage's cache (a StageCache, or the
    block caches of a TransformerLM), positions seen per row (B,), and the static per-stage
    sequence lengths the caches were sized for (config.stage_lengths of the maximum length)."""

    stage: Any
    length: jax.Array
    max_lengths: tuple = struct.field(pytree_node=False)


def _at_positions(values: jax.Array, positions: jax.Array) -> jax.Array:
    """values (B, L, ...) at one position per row (B,) -> (B, ...)."""
    index = positions.reshape((-1,) + (1,) * (values.ndim - 1))
    return jnp.take_along_axis(values, index, axis=1)[:, 0]


def _keep_rows(active: jax.Array, new, old):
    """Per row: the new cache where `active` (B,), else the old one."""
    def pick(n, o):
        return jnp.where(active.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
    return jax.tree_util.tree_map(pick, new, old)


class HNetStage(nnx.Module):
    """One level of the hierarchy: (B, L, D_s) float32 -> (B, L, D_s) float32 plus stage reports.

    At stage == config.depth it is just the main network (an isotropic stack).
    n_res_outer: residual additions in enclosing encoders (for the output-projection init scale).
    """

    def __init__(self, config: ModelConfig, stage: int, n_res_outer: int, rngs: nnx.Rngs):
        self.stage, self.config = stage, config
        self.is_main = stage == config.depth
        if self.is_main:
            (main_layout,) = config.stage_layout(stage)
            self.main = Isotropic(main_layout, config, stage, n_res_outer, rngs)
            return
        encoder_layout, decoder_layout = config.stage_layout(stage)
        d_model, d_inner = config.d_model[stage], config.d_model[stage + 1]
        self.encoder = Isotropic(encoder_layout, config, stage, n_res_outer, rngs)
        self.routing_mode, self.stride = config.routing_mode(stage)
        if self.routing_mode == "learned":
            self.routing = chunking.Routing(d_model)
        self.inner = HNetStage(config, stage + 1, n_res_outer + residual_count(encoder_layout), rngs)
        self.decoder = Isotropic(decoder_layout, config, stage, n_res_outer, rngs)
        self.residual_proj = linear(d_model, d_model, ("embed", "embed_out"), rngs, dtype=jnp.float32, std=0.0)
        if d_inner > d_model:  # learned padding that widens chunk features to the inner width
            self.pad_dimension = param(jnp.zeros((d_inner - d_model,), jnp.float32), ("embed",))

    def boundaries(self, hidden, doc_start, byte_ids):
        """-> boundary_prob (B, L) float32, boundary_mask (B, L) bool, before validity masking."""
        if self.routing_mode == "learned":
            prob = self.routing(hidden, doc_start)
            return prob, prob > 0.5
        if self.routing_mode == "space":
            mask = chunking.space_boundaries(byte_ids)
        else:
            mask = chunking.stride_boundaries(jnp.broadcast_to(jnp.arange(doc_start.shape[1]), doc_start.shape), self.stride)
        mask = mask | doc_start
        return mask.astype(jnp.float32), mask

    def __call__(self, x, valid, doc_start, byte_ids=None, num_bytes=None):
        """x (B, L, D) float32; valid, doc_start (B, L) bool; byte_ids (B, L) int (outermost only).

        Returns (y (B, L, D) float32, tuple of StageOutput for this stage and the ones inside).
        """
        y, stages, _ = self.prefill(x, valid, doc_start, byte_ids, num_bytes)
        return y, stages

    def prefill(self, x, valid, doc_start, byte_ids=None, num_bytes=None, lengths=None, max_lengths=None):
        """The forward pass; with `lengths` (B,) real lengths (valid = positions < lengths) and
        static per-stage `max_lengths`, also the cache after each row's last real position.

        Returns (y (B, L, D), stage reports, StageCache / main block caches / None).
        """
        max_length = None if max_lengths is None else max_lengths[self.stage]
        if self.is_main:
            y, caches = self.main.prefill(x, lengths, max_length)
            return y, (), caches
        config, stage = self.config, self.stage
        d_model = x.shape[-1]
        hidden, encoder_cache = self.encoder.prefill(x, lengths, max_length)
        boundary_prob, boundary_mask = self.boundaries(hidden, doc_start, byte_ids)
        boundary_mask = boundary_mask & valid
        boundary_prob = jnp.where(valid, boundary_prob, 0.0)

        layout = chunking.chunk_layout(boundary_mask, config.capacity(x.shape[1], stage))
        chunks = sharding.constrain(self.widen(chunking.gather_chunks(hidden, layout)), sharding.RESIDUAL_AXES)
        inner_doc_start = chunking.gather_chunks(doc_start, layout) & layout.chunk_valid
        inner_lengths = None if lengths is None else layout.chunk_valid.sum(axis=1, dtype=jnp.int32)
        inner_out, inner_stages, inner_cache = self.inner.prefill(
            chunks, layout.chunk_valid, inner_doc_start, num_bytes=num_bytes, lengths=inner_lengths, max_lengths=max_lengths)

        chunk_prob = chunking.gather_chunks(boundary_prob, layout)
        smoothed = sharding.constrain(chunking.dechunk(inner_out[..., :d_model], chunk_prob, layout), sharding.RESIDUAL_AXES)
        confidence = jnp.where(boundary_mask, boundary_prob, 1.0 - boundary_prob)
        y = smoothed * chunking.straight_through(confidence)[..., None] + self.residual_proj(hidden)
        out, decoder_cache = self.decoder.prefill(y, lengths, max_length)

        report = self.report(boundary_mask, boundary_prob, valid, layout, num_bytes)
        cache = None
        if lengths is not None:
            last = jnp.maximum(lengths - 1, 0)
            last_byte = jnp.zeros_like(lengths) if byte_ids is None else _at_positions(byte_ids, last)
            cache = StageCache(
                encoder=encoder_cache, decoder=decoder_cache, inner=inner_cache,
                last_hidden=_at_positions(hidden, last), last_smoothed=_at_positions(smoothed, last),
                last_byte=last_byte.astype(jnp.int32), length=lengths.astype(jnp.int32), chunks=inner_lengths,
            )
        return out, (report,) + inner_stages, cache

    def widen(self, chunks):
        """(..., D_s) chunk features -> (..., D_{s+1}): append the learned padding when wider."""
        if not hasattr(self, "pad_dimension"):
            return chunks
        pad = jnp.broadcast_to(self.pad_dimension[...], chunks.shape[:-1] + self.pad_dimension.shape)
        return jnp.concatenate([chunks, pad], axis=-1)

    def step_boundary(self, hidden, doc_start, byte, cache: StageCache):
        """One position: hidden (B, D), doc_start (B,), byte (B,) -> (prob (B,) float32, mask (B,) bool)."""
        if self.routing_mode == "learned":
            prob = self.routing.step(cache.last_hidden, hidden, doc_start)
            return prob, prob > 0.5
        if self.routing_mode == "space":
            pair = jnp.stack([cache.last_byte, byte], axis=1)
            mask = chunking.space_boundaries(pair)[:, 1] | (cache.length == 0)
        else:
            mask = chunking.stride_boundaries(cache.length, self.stride)
        mask = mask | doc_start
        return mask.astype(jnp.float32), mask

    def step(self, x, doc_start, byte, cache, active, max_lengths):
        """Advance the rows where `active` (B,) by one position; the other rows keep their state.

        x (B, D) float32, doc_start (B,) bool, byte (B,) int32 (outermost stage; else ignored).
        Returns (y (B, D) float32, the updated cache, boundaries): boundaries is a tuple of (B,)
        bool, one per stage from this one inward, True where that stage starts a chunk at this
        position. The inner stage runs only when some row emits a boundary, and only those rows'
        inner state changes.
        """
        if self.is_main:
            y, caches = self.main.step(x, cache)
            return y, _keep_rows(active, caches, cache), ()
        d_model = x.shape[-1]
        hidden, encoder_cache = self.encoder.step(x, cache.encoder)
        boundary_prob, boundary_mask = self.step_boundary(hidden, doc_start, byte, cache)
        # As in the forward: a boundary past the inner capacity is not passed on (overflow).
        to_inner = active & boundary_mask & (cache.chunks < max_lengths[self.stage + 1])
        chunk = self.widen(hidden)

        def run_inner():
            return self.inner.step(chunk, doc_start, byte, cache.inner, to_inner, max_lengths)

        def skip_inner():
            no_boundaries = tuple(jnp.zeros_like(to_inner) for _ in range(self.config.depth - self.stage - 1))
            return jnp.zeros_like(chunk), cache.inner, no_boundaries

        inner_out, inner_cache, inner_boundaries = jax.lax.cond(jnp.any(to_inner), run_inner, skip_inner)
        smoothing = jnp.clip(boundary_prob, chunking.PROB_CLIP, 1.0 - chunking.PROB_CLIP)[:, None]
        updated = smoothing * inner_out[:, :d_model] + (1.0 - smoothing) * cache.last_smoothed
        smoothed = jnp.where(to_inner[:, None], updated, cache.last_smoothed)
        confidence = jnp.where(boundary_mask, boundary_prob, 1.0 - boundary_prob)
        y = smoothed * chunking.straight_through(confidence)[:, None] + self.residual_proj(hidden)
        out, decoder_cache = self.decoder.step(y, cache.decoder)
        new_cache = StageCache(
            encoder=encoder_cache, decoder=decoder_cache, inner=inner_cache, last_hidden=hidden.astype(jnp.float32),
            last_smoothed=smoothed, last_byte=byte.astype(jnp.int32), length=cache.length + 1,
            chunks=cache.chunks + to_inner.astype(jnp.int32),
        )
        return out, _keep_rows(active, new_cache, cache), (boundary_mask & active,) + inner_boundaries

    def report(self, boundary_mask, boundary_prob, valid, layout, num_bytes) -> StageOutput:
        valid_f = valid.astype(jnp.float32)
        position_count = valid_f.sum()
        boundary_count = boundary_mask.astype(jnp.float32).sum()
        if self.routing_mode == "learned":
            loss = chunking.ratio_loss(boundary_mask, boundary_prob, valid, self.config.ratio(self.stage))
        else:
            loss = jnp.zeros((), jnp.float32)  # heuristic boundaries have nothing to learn
        return StageOutput(
            boundary_mask=boundary_mask,
            boundary_prob=boundary_prob,
            valid_mask=valid,
            chunk_position=layout.chunk_position,
            ratio_loss=loss,
            selected_fraction=boundary_count / jnp.maximum(position_count, 1.0),
            mean_prob=jnp.sum(boundary_prob * valid_f) / jnp.maximum(position_count, 1.0),
            boundary_count=boundary_count,
            position_count=position_count,
            bytes_per_chunk=num_bytes / jnp.maximum(boundary_count, 1.0),
            overflow=layout.overflow.sum(),
        )


class LanguageModel(nnx.Module):
    """input_ids (B, L) int32 -> ModelOutput. Embedding -> HNetStage 0 -> LM head."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(config.dtype)
        d_model = config.d_model[0]
        self.embedding = nnx.Embed(
            config.vocab_size, d_model, param_dtype=jnp.float32,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(stddev=1.0), ("vocab", "embed")),
            rngs=rngs,
        )
        self.backbone = HNetStage(config, 0, 0, rngs)
        if not config.tie_embeddings:
            self.lm_head = linear(d_model, config.vocab_size, ("embed", "vocab"), rngs, dtype=self.dtype)

    def __call__(self, input_ids: jax.Array) -> ModelOutput:
        return self.prefill(input_ids)[0]

    def prefill(self, input_ids: jax.Array, lengths: jax.Array | None = None, max_length: int | None = None):
        """The forward pass over input_ids (B, L) -> (ModelOutput, ModelCache or None).

        With `lengths` (B,) (each row's prompt length; the rest is right padding, which never
        influences real positions) and a static `max_length` (the longest sequence generation
        will reach), also returns the caches after each row's last prompt position.
        """
        batch, length = input_ids.shape
        x = sharding.constrain(self.embedding(input_ids).astype(jnp.float32), sharding.RESIDUAL_AXES)
        positions = jnp.arange(length)[None, :]
        valid = jnp.ones((batch, length), bool) if lengths is None else positions < lengths[:, None]
        doc_start = (input_ids == BOS_ID) | (positions == 0)
        max_lengths = None if lengths is None else tuple(self.config.stage_lengths(max_length))
        num_bytes = jnp.sum(valid, dtype=jnp.float32)
        hidden, stages, stage_cache = self.backbone.prefill(
            x, valid, doc_start, byte_ids=input_ids, num_bytes=num_bytes, lengths=lengths, max_lengths=max_lengths)
        output = ModelOutput(logits=sharding.constrain(self.logits(hidden), sharding.LOGITS_AXES), stages=stages)
        if lengths is None:
            return output, None
        return output, ModelCache(stage=stage_cache, length=lengths.astype(jnp.int32), max_lengths=max_lengths)

    def step(self, ids: jax.Array, cache: ModelCache):
        """One token per row: ids (B,) int32 -> (logits (B, V) float32 for the next token,
        ModelCache, boundaries: tuple of (B,) bool per stage, True where ids start a chunk)."""
        x = self.embedding(ids).astype(jnp.float32)
        doc_start = (ids == BOS_ID) | (cache.length == 0)
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


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-position next-token negative log-likelihood in nats: (B, L, V), (B, L) -> float32 (B, L)."""
    logits = logits.astype(jnp.float32)
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return log_norm - target_logit


def jit_forward(model: LanguageModel):
    """A jitted `input_ids -> ModelOutput` over the model's current parameters.

    The function compiles once per input shape; parameters are passed as arguments, so updating
    the model (nnx.update) does not retrace.
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, input_ids):
        return nnx.merge(graphdef, state)(input_ids)

    def call(input_ids):
        return forward(nnx.state(model), input_ids)

    call.jitted = forward
    return call
