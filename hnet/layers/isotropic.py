"""Isotropic stacks: a sequence of pre-norm residual blocks built from a layout string.

Rematerialisation (`rematerialise`, set by the train step from `train.remat`): each block of the
parallel forward runs under jax.checkpoint with a policy that decides what the backward pass may
keep (REMAT_POLICIES); the rest is recomputed block by block. It changes memory and time, never
values. Rematerialised, a run of identical blocks ("T12" in "T12m2") is one lax.scan over their
stacked parameters: XLA compiles one block instead of twelve (a deep stack's start-up time), and
what the scan stacks for the backward pass is what the blocks keep anyway, their inputs. Without
rematerialisation the blocks stay a Python loop: a scan would copy every activation of every
block into its stacked residuals.
"""

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from hnet.config import ModelConfig, parse_layout
from hnet.layers.attention import CausalSelfAttention
from hnet.layers.kernels.attention import ATTENTION_RESIDUALS
from hnet.layers.mamba2 import Mamba2
from hnet.layers.mlp import SwiGLU
from hnet.layers.norm import RMSNorm
from hnet.logical_axes import RESIDUAL_AXES, constrain
from hnet.segments import Segments


# train.remat name -> jax.checkpoint policy (None: no rematerialisation). Both keep the blockwise
# attention's output and log-sum-exp (small: L x D per layer), so that its backward pass does not
# run its forward again.
_KEEP_ATTENTION = jax.checkpoint_policies.save_only_these_names(*ATTENTION_RESIDUALS)
REMAT_POLICIES = {
    "none": None,
    "block": _KEEP_ATTENTION,  # keep each block's input (and the attention residuals)
    "dots": jax.checkpoint_policies.save_from_both_policies(  # keep matmul outputs too
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _KEEP_ATTENTION
    ),
}
_remat_policy: contextvars.ContextVar[str] = contextvars.ContextVar("remat_policy", default="none")


@contextlib.contextmanager
def rematerialise(policy: str):
    """Trace the parallel forward inside this block with blocks rematerialised under `policy`."""
    token = _remat_policy.set(policy)
    try:
        yield
    finally:
        _remat_policy.reset(token)


def _scan_blocks(blocks: list, x: jax.Array, segments: Segments, policy) -> jax.Array:
    """Identical blocks, one after the other, each rematerialised under `policy`: (B, L, D) -> (B, L, D).

    One block alone is called directly; several are one lax.scan over their parameters stacked
    along a new leading axis (the values are those of the loop; only the program is smaller).
    """
    graphdef = nnx.graphdef(blocks[0])

    @functools.partial(jax.checkpoint, policy=policy)
    def one_block(x, state):
        y = nnx.merge(graphdef, state).forward(x, segments)[0]
        return constrain(y, RESIDUAL_AXES)  # the residual stream: batch-split

    states = [nnx.state(block) for block in blocks]
    if len(blocks) == 1:
        return one_block(x, states[0])
    stacked = jax.tree_util.tree_map(lambda *values: jnp.stack(values), *states)
    x, _ = jax.lax.scan(lambda x, state: (one_block(x, state), None), x, stacked)
    return x


def residual_count(layout: str) -> int:
    """Residual additions in a stack: one per mixer, one more per MLP (upper-case letters)."""
    return sum(count * (2 if letter.isupper() else 1) for letter, count in parse_layout(layout))


class Block(nnx.Module):
    """(B, L, D) float32 -> (B, L, D) float32: x + mixer(norm(x)) [then x + mlp(norm(x))].

    letter: "m"/"M" Mamba2, "t"/"T" attention; upper case adds a SwiGLU MLP. Branches compute in
    the config's dtype; the residual stream stays float32.
    """

    def __init__(self, letter: str, config: ModelConfig, stage: int, out_scale: float, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(config.dtype)
        d_model = config.d_model[stage]
        self.norm1 = RMSNorm(d_model)
        self.is_attention = letter in "tT"
        if self.is_attention:
            attn = config.attn_cfg
            self.mixer = CausalSelfAttention(
                d_model,
                attn.num_heads[stage],
                config.num_kv_heads(stage),
                attn.rotary_emb_dim[stage],
                attn.window_size[stage],
                dtype=self.dtype,
                out_scale=out_scale,
                rngs=rngs,
            )
        else:
            self.mixer = Mamba2(d_model, config.ssm_cfg, dtype=self.dtype, out_scale=out_scale, rngs=rngs)
        self.has_mlp = letter.isupper()
        if self.has_mlp:
            self.norm2 = RMSNorm(d_model)
            self.mlp = SwiGLU(d_model, config.mlp_hidden(stage), dtype=self.dtype, out_scale=out_scale, rngs=rngs)

    def forward(self, x: jax.Array, segments: Segments, lengths=None, max_length=None):
        """(B, L, D) -> (y, mixer cache or None); see the mixers' `forward`. max_length sizes an
        attention cache (a Mamba2 state has a fixed size)."""
        if self.is_attention:
            return self._residual(x, lambda h: self.mixer.forward(h, segments, lengths, max_length))
        return self._residual(x, lambda h: self.mixer.forward(h, segments, lengths))

    def step(self, x: jax.Array, cache, doc_start: jax.Array):
        """One position per row: (B, D), doc_start (B,) bool -> (y (B, D), updated mixer cache)."""
        return self._residual(x, lambda h: self.mixer.step(h, cache, doc_start))

    def _residual(self, x, mix):
        mixed, cache = mix(self.norm1(x).astype(self.dtype))
        x = x + mixed.astype(jnp.float32)
        if self.has_mlp:
            x = x + self.mlp(self.norm2(x).astype(self.dtype)).astype(jnp.float32)
        return x, cache


class Isotropic(nnx.Module):
    """(B, L, D) -> float32 (B, L, D): the blocks of `layout` (e.g. "T1m4"), then a final RMSNorm.

    n_res: the residual count that scales this stack's residual-branch output projections (Mamba2
    and attention out_proj, MLP fc2): they are initialised with std 0.02 / sqrt(n_res). HNetStage
    counts it as the reference does (see HNetStage).
    """

    def __init__(self, layout: str, config: ModelConfig, stage: int, n_res: int, rngs: nnx.Rngs):
        out_scale = 1.0 / math.sqrt(n_res)
        self.blocks = nnx.List(
            [
                Block(letter, config, stage, out_scale, rngs)
                for letter, count in parse_layout(layout)
                for _ in range(count)
            ]
        )
        self.run_lengths = tuple(count for _, count in parse_layout(layout))  # consecutive identical blocks
        self.norm = RMSNorm(config.d_model[stage])

    def forward(self, x: jax.Array, segments: Segments, lengths=None, max_length=None):
        """(B, L, D) -> (y, tuple of block caches); caches only when `lengths` (B,) is given."""
        x = x.astype(jnp.float32)
        policy = REMAT_POLICIES[_remat_policy.get()] if lengths is None else None  # never when filling caches
        if policy is not None:
            first = 0
            for count in self.run_lengths:
                x = _scan_blocks(list(self.blocks[first : first + count]), x, segments, policy)
                first += count
            return self.norm(x), (None,) * len(self.blocks)
        caches = []
        for block in self.blocks:
            x, cache = block.forward(x, segments, lengths, max_length)
            x = constrain(x, RESIDUAL_AXES)  # the residual stream: batch-split
            caches.append(cache)
        return self.norm(x), tuple(caches)

    def step(self, x: jax.Array, caches: tuple, doc_start: jax.Array):
        """One position per row: (B, D), doc_start (B,) bool -> (y (B, D) float32, updated block caches)."""
        x = x.astype(jnp.float32)
        new_caches = []
        for block, cache in zip(self.blocks, caches):
            x, cache = block.step(x, cache, doc_start)
            new_caches.append(cache)
        return self.norm(x), tuple(new_caches)
