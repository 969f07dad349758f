"""SwiGLU feed-forward block."""

import jax
from flax import nnx

from hnet.layers.common import INIT_STD, linear
from hnet.logical_axes import MLP_AXES, constrain


class SwiGLU(nnx.Module):
    """(B, L, D) -> (B, L, D): fc2(value * silu(gate)), [value, gate] = fc1(x).

    d_hidden: the hidden size (ModelConfig.mlp_hidden: d_intermediate rounded up to 128, as in
    the published models). fc2 is a residual-branch output, so its init std is scaled by
    `out_scale` (1/sqrt(n_res)).
    """

    def __init__(self, d_model: int, d_hidden: int, *, dtype, out_scale: float, rngs: nnx.Rngs):
        self.d_hidden = d_hidden
        self.fc1 = linear(d_model, 2 * self.d_hidden, ("embed", "mlp"), rngs, dtype=dtype)
        self.fc2 = linear(self.d_hidden, d_model, ("mlp", "embed"), rngs, dtype=dtype, std=INIT_STD * out_scale)

    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jax.numpy.split(self.fc1(x), 2, axis=-1)
        hidden = constrain(value * jax.nn.silu(gate), MLP_AXES)  # split over tensor
        return self.fc2(hidden)
