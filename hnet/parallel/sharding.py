"""Device mesh and array placement: how a run is laid out over devices.

`make_mesh` builds the Mesh over the axes hnet.logical_axes.MESH_AXES (data, fsdp, tensor) from the
run's `mesh` sizes; `tree_shardings` places parameters and optimizer state by their logical axis
names (hnet.logical_axes.LOGICAL_RULES, the one table that decides the layout); `check_batch` and
`place_local_batch` / `place_global_batch` split the batch over the processes and devices.

docs/ARCHITECTURE.md section 4 summarises the rules.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hnet.errors import ConfigError
from hnet.logical_axes import MESH_AXES, named_sharding

# With mesh.data and mesh.fsdp both left at -1, models with at least this many parameters put
# the devices on fsdp (float32 parameters + gradients + Adam moments are 16 bytes per parameter,
# 8 GB here, too much to replicate on every device next to the activations); smaller ones on data.
AUTO_FSDP_MIN_PARAMS = 500_000_000


# --------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------


def mesh_shape(data: int, fsdp: int, tensor: int, device_count: int, param_count: int) -> tuple[int, int, int]:
    """Resolve the configured axis sizes (-1 = the rest of the devices) to (data, fsdp, tensor).

    data and fsdp both -1 (the default): all devices left after tensor go to data, or to fsdp
    for models of at least AUTO_FSDP_MIN_PARAMS parameters. Raises ConfigError (one line).
    """
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if size != -1 and size < 1:
            raise ConfigError(f"mesh.{name}: expected a positive size or -1 (the rest), got {size}")
    if data == -1 and fsdp == -1:
        auto = "fsdp" if param_count >= AUTO_FSDP_MIN_PARAMS else "data"
        sizes["data" if auto == "fsdp" else "fsdp"] = 1
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ConfigError(f"mesh: only one of {', '.join(rest)} may be -1 (the rest of the devices)")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    described = " x ".join(f"{name}={size}" for name, size in sizes.items())
    if rest:
        if device_count % fixed:
            raise ConfigError(f"mesh: {described} does not divide the {device_count} devices")
        sizes[rest[0]] = device_count // fixed
    elif fixed != device_count:
        raise ConfigError(f"mesh: {described} needs {fixed} devices, but {device_count} are available")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(data: int = -1, fsdp: int = -1, tensor: int = 1, *, param_count: int = 0, devices=None) -> Mesh:
    """A Mesh over `devices` (default: all devices of all processes) with axes MESH_AXES."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, tensor, len(devices), param_count)
    try:  # topology-aware order on TPU (and id order on GPU)
        device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES)


def describe(mesh: Mesh) -> str:
    """ "data=2 fsdp=2 tensor=2 (8 devices, 2 processes)"."""
    axes = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
    processes = len({device.process_index for device in mesh.devices.flat})
    return (
        f"{axes} ({mesh.size} device{'s' if mesh.size > 1 else ''}, {processes} process{'es' if processes > 1 else ''})"
    )


# --------------------------------------------------------------------------------------------
# Parameters and optimizer state
# --------------------------------------------------------------------------------------------


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def tree_shardings(tree, mesh: Mesh):
    """NamedShardings for a pytree of (abstract) arrays holding nnx Variables.

    A Variable with logical axis names (its `out_sharding` metadata) is split by hnet.logical_axes.LOGICAL_RULES;
    every other leaf (step counters, optax's count) is replicated. Optax states built from the
    parameters (Adam's mu and nu) keep the parameters' Variables and metadata, so the optimizer
    state is sharded exactly like the parameters it mirrors. Returns the same tree structure with
    NamedSharding leaves.
    """

    def leaf_sharding(x):
        if _is_variable(x):
            names = x.get_metadata().get("out_sharding")
            sharding = replicated(mesh) if names is None else named_sharding(mesh, names, x.shape)
            return x.replace(sharding)
        return replicated(mesh)

    return jax.tree_util.tree_map(leaf_sharding, tree, is_leaf=_is_variable)


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings (for sharded init checks and restore)."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# --------------------------------------------------------------------------------------------
# Input placement
# --------------------------------------------------------------------------------------------


def check_batch(mesh: Mesh, rows: int, what: str = "train.batch_size / train.grad_accum") -> None:
    """The batch (`rows` global rows) must split evenly over data x fsdp, and each process must feed
    its own 1/P of it (so the process-spanning devices must lie on data or fsdp)."""
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % split:
        raise ConfigError(f"{what} = {rows} rows must be a multiple of mesh data x fsdp = {split}")
    processes = jax.process_count()
    if processes == 1:
        return
    sharding = named_sharding(mesh, ("activation_batch",), (rows,))
    local_rows = {index[0].indices(rows) for index in sharding.addressable_devices_indices_map((rows,)).values()}
    count = sum(len(range(*r)) for r in local_rows)
    if count != rows // processes:
        raise ConfigError(
            f"mesh: each of the {processes} processes must feed 1/{processes} of the batch, but "
            f"this one holds {count} of {rows} rows; put the devices that span processes on "
            f"data or fsdp (keep tensor within a host)"
        )


def place_local_batch(local: np.ndarray, sharding: NamedSharding, batch_dim: int) -> jax.Array:
    """This process's rows (its 1/P of the batch along `batch_dim`) -> one global array.

    The global batch is the processes' rows, process 0 first; no data crosses hosts.
    """
    global_shape = list(local.shape)
    global_shape[batch_dim] *= jax.process_count()
    return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))


def place_global_batch(full: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A batch every process holds in full (evaluation) -> one global array; each device takes its part."""
    return jax.make_array_from_callback(full.shape, sharding, lambda index: full[index])


def param_count(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
