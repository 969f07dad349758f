"""Building blocks: norms, SwiGLU MLP, causal attention, the Mamba2 mixer and isotropic stacks; the
numerical kernels under attention and Mamba2 (attention paths, the SSD scan) are hnet.layers.kernels."""

from hnet.layers.attention import CausalSelfAttention
from hnet.layers.isotropic import Block, Isotropic
from hnet.layers.mamba2 import Mamba2
from hnet.layers.mlp import SwiGLU
from hnet.layers.norm import RMSNorm

__all__ = ["Block", "CausalSelfAttention", "Isotropic", "Mamba2", "RMSNorm", "SwiGLU"]
