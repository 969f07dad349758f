"""H-Net language models: the recursive stage, HNetLM, and the TransformerLM baseline.

    bytes (B, L) -> embedding -> HNetStage 0 -> lm_head -> logits (B, L, V)

HNetStage s:  encoder -> routing -> chunk -> HNetStage s+1 (or the main network) -> dechunk
              (+ residual_proj of the encoder output) -> decoder.
The outermost decoder's final RMSNorm is the model's final norm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from hnet import chunking
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
            mask = chunking.stride_boundaries(doc_start.shape, self.stride)
        mask = mask | doc_start
        return mask.astype(jnp.float32), mask

    def __call__(self, x, valid, doc_start, byte_ids=None, num_bytes=None):
        """x (B, L, D) float32; valid, doc_start (B, L) bool; byte_ids (B, L) int (outermost only).

        Returns (y (B, L, D) float32, tuple of StageOutput for this stage and the ones inside).
        """
        if self.is_main:
            return self.main(x), ()
        config, stage = self.config, self.stage
        d_model = x.shape[-1]
        hidden = self.encoder(x)
        boundary_prob, boundary_mask = self.boundaries(hidden, doc_start, byte_ids)
        boundary_mask = boundary_mask & valid
        boundary_prob = jnp.where(valid, boundary_prob, 0.0)

        layout = chunking.chunk_layout(boundary_mask, config.capacity(x.shape[1], stage))
        chunks = chunking.gather_chunks(hidden, layout)
        if hasattr(self, "pad_dimension"):
            pad = jnp.broadcast_to(self.pad_dimension[...], chunks.shape[:-1] + self.pad_dimension.shape)
            chunks = jnp.concatenate([chunks, pad], axis=-1)
        inner_doc_start = chunking.gather_chunks(doc_start, layout) & layout.chunk_valid
        inner_out, inner_stages = self.inner(chunks, layout.chunk_valid, inner_doc_start, num_bytes=num_bytes)

        chunk_prob = chunking.gather_chunks(boundary_prob, layout)
        smoothed = chunking.dechunk(inner_out[..., :d_model], chunk_prob, layout)
        confidence = jnp.where(boundary_mask, boundary_prob, 1.0 - boundary_prob)
        y = smoothed * chunking.straight_through(confidence)[..., None] + self.residual_proj(hidden)
        out = self.decoder(y)

        report = self.report(boundary_mask, boundary_prob, valid, layout, num_bytes)
        return out, (report,) + inner_stages

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
        batch, length = input_ids.shape
        x = self.embedding(input_ids).astype(jnp.float32)
        valid = jnp.ones((batch, length), bool)
        doc_start = (input_ids == BOS_ID) | (jnp.arange(length) == 0)[None, :]
        hidden, stages = self.backbone(x, valid, doc_start, byte_ids=input_ids, num_bytes=jnp.float32(batch * length))
        hidden = hidden.astype(self.dtype)
        if self.config.tie_embeddings:
            logits = hidden @ self.embedding.embedding[...].astype(self.dtype).T
        else:
            logits = self.lm_head(hidden)
        return ModelOutput(logits=logits.astype(jnp.float32), stages=stages)


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
