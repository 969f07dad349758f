"""Chunk slots that follow the data: an inner stack runs on the fewest static slots that hold the
chunks its rows actually keep.

XLA compiles static shapes, but how many chunks a row keeps is data-dependent. A chunking stage
gathers its chunks into its static cap of slots per row (chunking.stage_lengths: the most the
capacity rule can ever keep), and the glue around the inner network (routing, the capacity rule,
gather, dechunk: cheap elementwise work) runs there. The heavy part, the isotropic stacks that run
on those chunks (the next stage's encoder and decoder, or the main network), runs on one of a few
static lengths instead, the stage's *slot ladder* (`slot_ladder`): config.slot_ladder x the
stage's target chunk count (seq_len / N_0 / ... / N_s), rounded up to config.capacity_multiple
(those under 90% of the cap), then the cap. In each step:

1. the rows of a micro-batch are ordered by the chunks they keep (on each device, its own rows)
   and cut into config.slot_groups groups of similar rows;
2. each group runs the stack on the smallest ladder length that holds its longest row: one
   lax.switch, one branch per ladder length, inside one lax.scan over the groups, so the step
   compiles once and never synchronises with the host; every process computes the same branch
   index from the same global counts;
3. the outputs go back to the rows' places, padded with zeros beyond the length computed.

Slots past a row's last chunk are right padding, which nothing real attends to or reads, so
which length a row runs on changes its chunks' values only by float32 rounding (a document's
outputs do not depend on the other rows of its batch). Only the shapes the stack sees change; the
capacity rule, and so which boundaries are kept, does not depend on the ladder at all.

The backward pass (`ladder_residuals`, set by the train step from train.slot_residuals): a plain
lax.switch under jax.grad keeps the residuals of every branch (each branch's shapes differ, so
none share a buffer). Two ways out, the same values:
- "keep": `switch_keeping_taken_residuals` keeps those of the branch taken, in buffers sized for
  the largest branch (the static cap), so the backward pass recomputes nothing;
- "recompute": each branch is rematerialised as a whole, so the backward pass keeps only the
  stack's input and runs the taken branch's forward again. On CPU this is the faster one: padding
  the taken branch's residuals into cap-sized buffers and stacking them over the groups is memory
  traffic that costs more than the stack's forward (docs/PERFORMANCE.md); on a GPU such copies
  are cheap and the forward is not.

docs/ARCHITECTURE.md section 2 ("Chunk slots") describes the rule; docs/PERFORMANCE.md measures it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from dataclasses import dataclass

import jax
import jax.extend
import jax.numpy as jnp
from flax import nnx
from flax import struct

from hnet import chunking, logical_axes
from hnet.config import ModelConfig, round_up
from hnet.segments import Segments


CLOSE_TO_CAP = 0.9
RESIDUAL_MODES = ("keep", "recompute")
_residual_mode: contextvars.ContextVar[str] = contextvars.ContextVar("slot_residuals", default="keep")


@contextlib.contextmanager
def ladder_residuals(mode: str):
    """Trace stacks on the ladder with their backward pass's residuals kept ("keep") or their
    forward recomputed ("recompute"); see the module docstring."""
    if mode not in RESIDUAL_MODES:
        raise ValueError(f"ladder residuals: expected one of {RESIDUAL_MODES}, got {mode!r}")
    token = _residual_mode.set(mode)
    try:
        yield
    finally:
        _residual_mode.reset(token)


def slot_ladder(config: ModelConfig, stage: int, seq_len: int) -> tuple[int, ...]:
    """Chunk slots per row that chunking stage `stage`'s chunks may run on, for rows of `seq_len`
    positions: ascending, the last one the stage's static cap (its length in chunking.stage_lengths)."""
    cap = chunking.stage_lengths(config, seq_len)[stage + 1]
    target = seq_len / math.prod(config.ratio(s) for s in range(stage + 1))
    sizes = {round_up(math.ceil(fraction * target), config.capacity_multiple) for fraction in config.slot_ladder}
    # A length within 10% of the cap would save little and cost one more compiled branch.
    return tuple(sorted({n for n in sizes if n < CLOSE_TO_CAP * cap} | {cap}))


def model_ladders(config: ModelConfig, seq_len: int) -> tuple[tuple[int, ...], ...]:
    """slot_ladder of every chunking stage, outermost first."""
    return tuple(slot_ladder(config, stage, seq_len) for stage in range(config.depth))


@struct.dataclass
class SlotRows:
    """What an inner stage needs to run its stacks on the ladder: counts (B,) int32, the real
    positions (chunks of the stage outside) of each row; ladder: the static lengths (the last is
    the input's length); groups: groups of rows per micro-batch (config.slot_groups); stage: the
    chunking stage whose chunks these are (names the branches, `branch_scope`)."""

    counts: jax.Array
    ladder: tuple = struct.field(pytree_node=False)
    groups: int = struct.field(pytree_node=False)
    stage: int = struct.field(pytree_node=False)


def branch_scope(stage: int, length: int) -> str:
    """The name scope of the ladder branch running stage `stage`'s chunks on `length` slots, which
    hnet.perf.xla_stats reads to count the matmuls of the branch a batch takes."""
    return f"stage{stage}_slots{length}"


def ladder_index(counts: jax.Array, ladder: tuple[int, ...]) -> jax.Array:
    """The smallest ladder length holding `counts` (any shape, int) -> its index, int32."""
    index = jnp.searchsorted(jnp.asarray(ladder, jnp.int32), counts.astype(jnp.int32), side="left")
    return jnp.minimum(index, len(ladder) - 1).astype(jnp.int32)


# ---- Groups of rows ----


def _batch_shards(rows: int) -> int:
    """How many pieces the active mesh splits a batch of `rows` rows into (1 without a mesh)."""
    mesh = logical_axes.active_mesh()
    if mesh is None:
        return 1
    spec = logical_axes.logical_to_spec(("activation_batch",), (rows,), mesh)
    axes = spec[0] if spec else None
    if axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


@dataclass(frozen=True)
class RowGroups:
    """A micro-batch's B rows reordered into `groups` groups: group-major, (G, B / G, ...).

    On each of the `shards` pieces of a batch-split mesh, its b = B / shards rows are ordered by
    count (descending) and cut into G consecutive groups; group g then holds the g-th part of every
    device's rows, so grouping moves no data between devices. order: (shards, b) int32, the local
    row of each sorted position.
    """

    shards: int
    groups: int
    order: jax.Array

    @classmethod
    def by_count(cls, counts: jax.Array, groups: int) -> "RowGroups":
        rows = counts.shape[0]
        shards = _batch_shards(rows)
        local = rows // shards
        groups = max(g for g in range(1, min(groups, local) + 1) if local % g == 0)
        order = jnp.argsort(-counts.reshape(shards, local), axis=1, stable=True).astype(jnp.int32)
        return cls(shards, groups, order)

    def split(self, values: jax.Array) -> jax.Array:
        """(B, ...) -> (G, B / G, ...), rows ordered and grouped."""
        local = values.shape[0] // self.shards
        values = values.reshape((self.shards, local) + values.shape[1:])
        index = self.order.reshape(self.order.shape + (1,) * (values.ndim - 2))
        values = jnp.take_along_axis(values, index, axis=1)
        values = values.reshape((self.shards, self.groups, local // self.groups) + values.shape[2:])
        values = jnp.moveaxis(values, 1, 0)
        return values.reshape((self.groups, -1) + values.shape[3:])

    def merge(self, values: jax.Array) -> jax.Array:
        """The inverse of `split`: (G, B / G, ...) -> (B, ...) in the original row order."""
        per_group = values.shape[1] // self.shards
        values = values.reshape((self.groups, self.shards, per_group) + values.shape[2:])
        values = jnp.moveaxis(values, 0, 1).reshape((self.shards, self.groups * per_group) + values.shape[3:])
        inverse = jnp.argsort(self.order, axis=1).astype(jnp.int32)
        values = jnp.take_along_axis(values, inverse.reshape(inverse.shape + (1,) * (values.ndim - 2)), axis=1)
        return values.reshape((-1,) + values.shape[2:])


# ---- The switch ----


def switch_keeping_taken_residuals(index: jax.Array, branches, operands, names=None):
    """jax.lax.switch(index, branches, operands), differentiable with respect to `operands`, whose
    backward pass keeps only the taken branch's residuals.

    Every branch maps `operands` to outputs of the same shapes. A plain switch under jax.grad
    returns every branch's residuals from the forward (zeros for the branches not taken); when the
    branches run at different lengths none of them share a buffer, so the residual memory is the
    sum over branches. Here the forward runs jax.vjp of the taken branch and returns its residuals
    padded into one buffer per residual sized for the largest branch (or, when the branches'
    residuals differ in number or kind, one flat buffer per dtype), and the backward runs that
    branch's pullback on them: the memory of the largest branch alone, the same arithmetic.
    names: a name scope per branch, around its forward and its backward pass.
    """
    names = names or [f"branch{k}" for k in range(len(branches))]
    count = len(branches)

    @jax.custom_vjp
    def switch(index, operands):
        return jax.lax.switch(index, _named(branches, names), operands)

    backward = []  # per branch, its backward pass from the packed residuals (set while tracing the forward)

    def switch_forward(index, operands):
        # Each branch's forward with its pullback's residuals as outputs, traced once (the switch
        # below replays the jaxpr), and the treedef that turns those residuals back into the pullback.
        traced, pullbacks = [], []
        for k in range(count):

            def with_residuals(ops, k=k):
                out, pullback = jax.vjp(branches[k], ops)
                leaves, treedef = jax.tree_util.tree_flatten(pullback)
                pullbacks.append(treedef)
                return out, leaves

            with jax.named_scope(names[k]):
                traced.append(jax.make_jaxpr(with_residuals, return_shape=True)(operands))
        specs = [shapes[1] for _, shapes in traced]
        buffers = _residual_buffers(specs)

        def forward_branch(k):
            closed, shapes = traced[k]

            def run(ops):
                with jax.named_scope(names[k]):
                    results = jax.extend.core.jaxpr_as_fun(closed)(*jax.tree_util.tree_leaves(ops))
                    out, leaves = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), results)
                    return out, _pack(leaves, buffers)

            return run

        def backward_branch(k):
            def run(packed, cotangent):
                with jax.named_scope(names[k]):
                    pullback = jax.tree_util.tree_unflatten(pullbacks[k], _unpack(packed, specs[k], buffers))
                    return pullback(cotangent)[0]

            return run

        out, packed = jax.lax.switch(index, [forward_branch(k) for k in range(count)], operands)
        backward[:] = [backward_branch(k) for k in range(count)]
        return out, (index, packed)

    def switch_backward(residuals, cotangent):
        index, packed = residuals
        return None, jax.lax.switch(index, backward, packed, cotangent)

    switch.defvjp(switch_forward, switch_backward)
    return switch(index, operands)


def _residual_buffers(specs) -> list[jax.ShapeDtypeStruct]:
    """Buffers that hold any branch's residuals (specs: per branch, its residuals' shapes):
    when every branch has residuals of the same number, dtypes and ranks, one per residual with
    the largest extent of each dimension; otherwise one flat buffer per dtype, as long as the
    largest branch's residuals of that dtype."""
    if len({tuple((s.dtype, len(s.shape)) for s in spec) for spec in specs}) == 1:
        return [
            jax.ShapeDtypeStruct(tuple(max(dims) for dims in zip(*(s.shape for s in column))), column[0].dtype)
            for column in zip(*specs)
        ]
    dtypes = sorted({s.dtype for spec in specs for s in spec}, key=str)
    return [
        jax.ShapeDtypeStruct((max(sum(math.prod(s.shape) for s in spec if s.dtype == dtype) for spec in specs),), dtype)
        for dtype in dtypes
    ]


def _pack(leaves, buffers) -> list[jax.Array]:
    """One branch's residuals -> values shaped like `buffers` (zero padding)."""
    if len(leaves) == len(buffers) and all(
        leaf.ndim == b.ndim and leaf.dtype == b.dtype for leaf, b in zip(leaves, buffers)
    ):
        return [
            leaf if leaf.shape == b.shape else jnp.pad(leaf, [(0, n - m) for m, n in zip(leaf.shape, b.shape)])
            for leaf, b in zip(leaves, buffers)
        ]
    flat = []
    for buffer in buffers:
        parts = [leaf.ravel() for leaf in leaves if leaf.dtype == buffer.dtype]
        used = sum(part.shape[0] for part in parts)
        flat.append(jnp.concatenate(parts + [jnp.zeros((buffer.shape[0] - used,), buffer.dtype)]))
    return flat


def _unpack(packed, spec, buffers) -> list[jax.Array]:
    """The inverse of _pack for a branch whose residuals have the shapes `spec`."""
    if len(spec) == len(buffers) and all(s.ndim == b.ndim and s.dtype == b.dtype for s, b in zip(spec, buffers)):
        return [
            value if value.shape == s.shape else value[tuple(slice(0, n) for n in s.shape)]
            for value, s in zip(packed, spec)
        ]
    offsets = {buffer.dtype: 0 for buffer in buffers}
    flat = {buffer.dtype: value for buffer, value in zip(buffers, packed)}
    leaves = []
    for s in spec:
        start, size = offsets[s.dtype], math.prod(s.shape)
        leaves.append(flat[s.dtype][start : start + size].reshape(s.shape))
        offsets[s.dtype] = start + size
    return leaves


def _switch_recomputing(index: jax.Array, branches, operands, names):
    """jax.lax.switch(index, branches, operands) with each branch rematerialised whole: the backward
    pass keeps `operands` (the same for every branch) and runs the taken branch's forward again.
    names: a name scope per branch, around its forward and its backward pass."""
    return jax.lax.switch(index, _named([jax.checkpoint(branch) for branch in branches], names), operands)


def _named(branches, names) -> list:
    """Each branch called inside its name scope (which hnet.perf.xla_stats reads)."""

    def named(branch, name):
        def run(*args):
            with jax.named_scope(name):
                return branch(*args)

        return run

    return [named(branch, name) for branch, name in zip(branches, names)]


# ---- A stack on the ladder ----


def _truncate(values: jax.Array, length: int) -> jax.Array:
    return values[:, :length]


def run_stack(stack: nnx.Module, x: jax.Array, segments: Segments, rows: SlotRows) -> jax.Array:
    """stack.forward(x, segments)'s output (B, M, D) float32, computed for each group of rows on
    the smallest ladder length that holds its rows' `rows.counts` positions (zeros beyond it).

    x (B, M, D) with M = rows.ladder[-1]; segments over the M positions; positions at or past a
    row's count are padding (right-aligned), so the result at real positions is the stack's
    output on the whole row up to float32 rounding.
    """
    length = x.shape[1]
    ladder = rows.ladder
    if ladder[-1] != length:
        raise ValueError(f"the slot ladder {ladder} ends at {ladder[-1]}, the input has {length} positions")
    graphdef, state = nnx.split(stack)

    def branch(size):
        def run(operands):
            state, x, segments = operands
            y, _ = nnx.merge(graphdef, state).forward(
                _truncate(x, size), jax.tree_util.tree_map(lambda v: _truncate(v, size), segments)
            )
            return jnp.pad(y, ((0, 0), (0, length - size), (0, 0)))

        return run

    branches = [branch(size) for size in ladder]
    names = [branch_scope(rows.stage, size) for size in ladder]
    if len(ladder) == 1:
        return branches[0]((state, x, segments))
    if _residual_mode.get() == "recompute":
        switch = functools.partial(_switch_recomputing, names=names)
    else:
        switch = functools.partial(switch_keeping_taken_residuals, names=names)
    groups = RowGroups.by_count(rows.counts, rows.groups)
    grouped_counts = groups.split(rows.counts)  # (G, B / G)
    index = ladder_index(jnp.max(grouped_counts, axis=1), ladder)  # (G,)
    xs = groups.split(x)
    segment_groups = jax.tree_util.tree_map(groups.split, segments)
    if groups.groups == 1:
        out = switch(index[0], branches, (state, xs[0], jax.tree_util.tree_map(lambda v: v[0], segment_groups)))[None]
    else:

        def one_group(_, group):
            index_g, x_g, segments_g = group
            x_g = logical_axes.constrain(x_g, logical_axes.RESIDUAL_AXES)
            return None, switch(index_g, branches, (state, x_g, segments_g))

        _, out = jax.lax.scan(one_group, None, (index, xs, segment_groups))
    return logical_axes.constrain(groups.merge(out), logical_axes.RESIDUAL_AXES)


def slots_computed(rows: SlotRows) -> jax.Array:
    """Chunk slots the stack computes for these rows (the sum over groups of rows x the length
    each group runs on), float32 scalar: the denominator of the slot utilisation."""
    ladder = rows.ladder
    if len(ladder) == 1:
        return jnp.asarray(rows.counts.shape[0] * ladder[0], jnp.float32)
    groups = RowGroups.by_count(rows.counts, rows.groups)
    grouped = groups.split(rows.counts)
    lengths = jnp.asarray(ladder, jnp.float32)[ladder_index(jnp.max(grouped, axis=1), ladder)]
    return jnp.sum(lengths * grouped.shape[1])


def group_lengths(counts, ladder: tuple[int, ...], groups: int) -> list[int]:
    """On the host, for one micro-batch on one device: the ladder length each group of rows runs
    on, given the rows' counts (B,) (what run_stack computes in the step)."""
    counts = sorted((int(c) for c in counts), reverse=True)
    groups = max(g for g in range(1, min(groups, len(counts)) + 1) if len(counts) % g == 0)
    size = len(counts) // groups
    return [next((n for n in ladder if n >= max(counts[g * size : (g + 1) * size])), ladder[-1]) for g in range(groups)]
