"""Logical axes: the names the model gives its array dimensions, and the one table mapping them to
mesh axes.

The mesh has three named axes (outermost first):

    data    pure data parallelism: parameters replicated, the batch split
    fsdp    fully sharded data parallelism: the batch split, and parameters, gradients and
            optimizer state split along their model-width ("embed") axis
    tensor  tensor parallelism: attention heads, MLP hidden units and the vocabulary split

Every parameter carries logical axis names (hnet.layers.common: "embed", "mlp", "heads", ...),
and the model pins its activations with `constrain` by logical names too. LOGICAL_RULES below maps
both to mesh axes: the one place that decides the layout. A dimension that the mesh axes it maps
to do not divide evenly is replicated instead (see `logical_to_spec`), so small models run on any
mesh. Everything stays correct under any layout: XLA (GSPMD) inserts the communication, and the
model's code, losses and scans see global arrays.

This module is part of the model (the layers name their axes here); building a mesh and placing
arrays on it is hnet.parallel.sharding. docs/ARCHITECTURE.md section 4 summarises the rules.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis, tuple of mesh axes, or None (replicated).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # Parameters.
    "embed": "fsdp",  # model width: the FSDP axis of every matrix
    "embed_out": None,  # second width axis of square (D, D) maps (routing, residual_proj)
    "vocab": "tensor",  # embedding rows / LM-head columns
    "qkv": "tensor",  # fused [q | k | v] projection output
    "heads": "tensor",  # attention output-projection input (heads x head_dim)
    "mlp": "tensor",  # SwiGLU hidden (fc1 output, fc2 input)
    # Mamba2 (outer stages) stays FSDP-only: its fused in_proj [z | xBC | dt] and depthwise conv
    # do not split by head, and the SSD scan mixes the whole state per head.
    "mamba_in": None,
    "mamba_inner": None,
    "mamba_conv": None,
    "conv": None,
    "ssm_heads": None,
    "norm": None,  # RMSNorm weights: small, replicated
    # Activations (see `constrain`).
    "activation_batch": ("data", "fsdp"),
    "activation_length": None,
    "activation_embed": None,
    "activation_heads": "tensor",
    "activation_mlp": "tensor",
    "activation_vocab": "tensor",
}

# Batch-leading arrays fed to the steps: (B, L), or (A, B, L) for gradient-accumulation micro-batches.
BATCH_AXES = ("activation_batch", "activation_length")
MICRO_BATCH_AXES = (None,) + BATCH_AXES
# Activations the model pins with `constrain`.
RESIDUAL_AXES = ("activation_batch", "activation_length", "activation_embed")  # (B, L, D)
HEADS_AXES = ("activation_batch", "activation_length", "activation_heads", None)  # (B, L, H, Dh)
MLP_AXES = ("activation_batch", "activation_length", "activation_mlp")  # (B, L, hidden)
LOGITS_AXES = ("activation_batch", "activation_length", "activation_vocab")  # (B, L, V)


def logical_to_spec(logical_axes, shape, mesh: Mesh, rules=None) -> PartitionSpec:
    """Logical axis names (one per dimension; None = replicated) -> a PartitionSpec for `shape`.

    A dimension is split over the mesh axes its name maps to, except (the fallback rule):
    - mesh axes of size 1 and mesh axes already used by an earlier dimension are dropped;
    - if the remaining axes' total size does not divide the dimension, it is replicated.
    """
    rules = LOGICAL_RULES if rules is None else rules
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {logical_axes} do not match shape {shape}")
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule in hnet.logical_axes.LOGICAL_RULES")
        target = rules[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
        if not axes or size % math.prod(mesh.shape[a] for a in axes):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, logical_axes, shape) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))


# --------------------------------------------------------------------------------------------
# Activation constraints
# --------------------------------------------------------------------------------------------

_ACTIVE_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("hnet_active_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None):
    """Make `constrain` place activations on `mesh` while tracing inside this block."""
    token = _ACTIVE_MESH.set(mesh)
    try:
        yield mesh
    finally:
        _ACTIVE_MESH.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh set by `use_mesh` while tracing (None outside it)."""
    return _ACTIVE_MESH.get()


def constrain(x: jax.Array, logical_axes: tuple) -> jax.Array:
    """Pin an activation's layout by logical names, e.g. ("activation_batch", "activation_length",
    "activation_embed"). A no-op outside `use_mesh` or on a one-device mesh, so the layers run
    unchanged in eager code, decoding and single-device training."""
    mesh = _ACTIVE_MESH.get()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, logical_axes, x.shape))
