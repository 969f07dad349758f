"""Shared parameter constructors, so every layer initialises and names its weights one way.

Every parameter carries logical axis names (MaxText style: "embed", "mlp", "heads", "vocab", ...);
hnet.logical_axes maps them to mesh axes.
"""

import flax
import jax.numpy as jnp
from flax import nnx

# Parameters carry logical axis names; hnet.parallel.sharding places them on a mesh explicitly, so Flax
# must not try to shard variables eagerly when they are created (every parameter is made here).
flax.config.update("flax_always_shard_variable", False)

INIT_STD = 0.02


def linear(
    in_features: int,
    out_features: int,
    axes: tuple[str, str],
    rngs: nnx.Rngs,
    *,
    dtype=jnp.float32,
    std: float = INIT_STD,
    param_dtype=jnp.float32,
    bias: bool = False,
) -> nnx.Linear:
    """A linear layer with N(0, std) weights of shape (in, out) named `axes`; bias-free unless
    `bias` (a zero-initialised (out,) vector named axes[1]).

    Parameters stay in `param_dtype`; inputs and weights are cast to `dtype` for the matmul.
    """
    init = nnx.initializers.normal(stddev=std)
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(init, axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), axes[1:]),
        rngs=rngs,
    )


def param(value, axes: tuple[str, ...]) -> nnx.Param:
    """A parameter holding `value` with logical axis names."""
    return nnx.Param(value, out_sharding=axes)
