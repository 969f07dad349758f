"""Documents inside packed rows: every layer treats each document as if it were alone.

A row may hold several documents, each starting at a BOS position (and position 0 always starts
one). Attention masks keys of other documents and uses positions within the document for RoPE;
the Mamba2 conv does not reach across a document start and the SSM state resets there; the
dechunk EMA restarts there. Inner H-Net stages get their documents from the chunk positions
(a document's first position always starts a chunk).

Shapes: B rows, L positions.

docs/ARCHITECTURE.md section 2 describes document isolation layer by layer.
"""

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Segments:
    """start (B, L) bool: the position starts a document; index (B, L) int32: the document's number
    within the row (0, 1, ...); position (B, L) int32: the position within its document."""

    start: jax.Array
    index: jax.Array
    position: jax.Array

    @classmethod
    def from_starts(cls, start: jax.Array) -> "Segments":
        """(B, L) bool document starts (position 0 is one whatever it holds) -> Segments."""
        start = start.at[:, 0].set(True)
        row_position = jnp.broadcast_to(jnp.arange(start.shape[1], dtype=jnp.int32), start.shape)
        begin = jax.lax.cummax(jnp.where(start, row_position, 0), axis=1)  # where each document began
        return cls(start=start, index=jnp.cumsum(start, axis=1, dtype=jnp.int32) - 1, position=row_position - begin)


def at_positions(values: jax.Array, positions: jax.Array) -> jax.Array:
    """values (B, L, ...) at one position per row (B,) -> (B, ...)."""
    index = positions.reshape((-1,) + (1,) * (values.ndim - 1))
    return jnp.take_along_axis(values, index, axis=1)[:, 0]
