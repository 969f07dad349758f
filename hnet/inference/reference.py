"""The reference implementation's parameter names and layouts, mapped to ours.

The published H-Net checkpoints are state_dicts of the reference HNetForCausalLM (goombalab/hnet,
read at commit 3673fe1). `parameter_table(config)` lists, for a config, every tensor of that
state_dict with the parameter of ours that holds it and how its layout differs. The one table
serves both directions: hnet.inference.convert reads a published file into an export folder, and
`python -m hnet.inference.export --format reference` writes ours back in the reference's names.

    reference key                                     ours                                  layout
    embeddings.weight (V, D)                          embedding.embedding (V, D)            same
    lm_head.weight (V, D)                             lm_head.kernel (D, V)                 transposed
    backbone.encoder.layers.{i}.norm1.weight          backbone.encoder.blocks.{i}.norm1.weight
      Mamba2 mixer.in_proj.weight (Din, D)            .mixer.in_proj.kernel (D, Din)        transposed
             mixer.conv1d.weight (C, 1, K)            .mixer.conv_weight (K, C)             conv
             mixer.conv1d.bias, dt_bias, A_log, D,    the same names                        same
             mixer.norm.weight
             mixer.out_proj.weight                    .mixer.out_proj.kernel                transposed
      attention mixer.Wqkv.weight (3D, D)             .mixer.wqkv.kernel (D, 3D)            transposed
             mixer.out_proj.weight                    .mixer.out_proj.kernel                transposed
      MLP    norm2.weight, mlp.fc1.weight,            .norm2.weight, .mlp.fc1.kernel,       same,
             mlp.fc2.weight                           .mlp.fc2.kernel                       transposed
    backbone.encoder.rmsnorm.weight                   backbone.encoder.norm.weight          same
    backbone.routing_module.q_proj_layer.weight       backbone.routing.q_proj               transposed
    backbone.routing_module.k_proj_layer.weight       backbone.routing.k_proj               transposed
    backbone.residual_proj.weight, .bias              backbone.residual_proj.kernel, .bias  transposed, same
    backbone.main_network.pad_dimension               backbone.pad_dimension                same
    backbone.main_network.{encoder,...}               backbone.inner.{encoder,...}          (next stage)
    backbone.main_network....main_network.layers.{i}  backbone.inner....main.blocks.{i}     (main network)
    backbone.decoder....                              backbone.decoder....

Semantics that make the names line up (each checked against the reference's code):
- A linear layer's weight is (out, in) there and (in, out) here; so are the routing projections
  (the reference's q_proj_layer(h) is h @ W.T, ours h @ q_proj).
- Wqkv's rows are [q (all heads), k, v], each head-major ("(three h d)"), as our wqkv's columns.
- fc1's output is [value, gate] and the MLP computes value * silu(gate) in both (the reference's
  swiglu(gate, value) = silu(gate) * value).
- in_proj's output is [z, x, B, C, dt] in both; the gated norm is RMSNorm(y * silu(z)) in both.
- The reference's depthwise Conv1d (padding K-1, first L outputs) is our causal conv: tap k reads
  position t - (K-1-k), so conv_weight[k, c] = conv1d.weight[c, 0, k].
- pad_dimension belongs to the inner stage there (it widens its own input) and to the outer stage
  here (it widens the chunks it passes in): the same vector.
- Rotary frequencies are recomputed, not stored (rotary_emb.inv_freq is a non-persistent buffer).
  A file that holds one anyway has it skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hnet.config import ModelConfig, parse_layout
from hnet.errors import ConvertError

SAME = "same"  # the same array
TRANSPOSED = "transposed"  # (out, in) there, (in, out) here
CONV = "conv"  # Conv1d weight (C, 1, K) there, (K, C) here

# Keys of non-persistent buffers that a file may hold anyway; they are recomputed, never read.
SKIPPED_SUFFIXES = (".inv_freq",)

# (reference name, our name, layout) inside a block, by mixer kind, and of a block's MLP.
MAMBA_MIXER = (
    ("in_proj.weight", "in_proj.kernel", TRANSPOSED),
    ("conv1d.weight", "conv_weight", CONV),
    ("conv1d.bias", "conv_bias", SAME),
    ("dt_bias", "dt_bias", SAME),
    ("A_log", "A_log", SAME),
    ("D", "D", SAME),
    ("norm.weight", "norm.weight", SAME),
    ("out_proj.weight", "out_proj.kernel", TRANSPOSED),
)
ATTENTION_MIXER = (
    ("Wqkv.weight", "wqkv.kernel", TRANSPOSED),
    ("out_proj.weight", "out_proj.kernel", TRANSPOSED),
)
BLOCK_MLP = (
    ("norm2.weight", "norm2.weight", SAME),
    ("mlp.fc1.weight", "mlp.fc1.kernel", TRANSPOSED),
    ("mlp.fc2.weight", "mlp.fc2.kernel", TRANSPOSED),
)
# Of a chunking stage, besides its encoder, inner stage and decoder.
STAGE_ROUTING = (
    ("routing_module.q_proj_layer.weight", "routing.q_proj", TRANSPOSED),
    ("routing_module.k_proj_layer.weight", "routing.k_proj", TRANSPOSED),
)
STAGE_RESIDUAL = (
    ("residual_proj.weight", "residual_proj.kernel", TRANSPOSED),
    ("residual_proj.bias", "residual_proj.bias", SAME),
)

# The reference's Mamba2 head size: its configs cannot set another one.
REFERENCE_SSM_HEAD_DIM = 64


@dataclass(frozen=True)
class Tensor:
    """One tensor of the reference's state_dict.

    key: its name there; path: our parameter's dotted path; layout: SAME, TRANSPOSED or CONV.
    tied: the entry repeats another parameter (lm_head.weight with tie_embeddings): the reference
    writes it, a file may leave it out, and when present it must equal the one it repeats.
    """

    key: str
    path: str
    layout: str
    tied: bool = False


def to_reference(array: np.ndarray, layout: str) -> np.ndarray:
    """Our array -> the reference's layout (a contiguous array)."""
    if layout == TRANSPOSED:
        array = array.T
    elif layout == CONV:
        array = array.T[:, None, :]  # (K, C) -> (C, 1, K)
    return np.ascontiguousarray(array)


def from_reference(array: np.ndarray, layout: str) -> np.ndarray:
    """The reference's array -> ours (a contiguous array)."""
    if layout == TRANSPOSED:
        array = array.T
    elif layout == CONV:
        array = array[:, 0, :].T  # (C, 1, K) -> (K, C)
    return np.ascontiguousarray(array)


def reference_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """Our parameter's shape -> the shape the reference stores it in."""
    if layout == TRANSPOSED:
        return tuple(reversed(shape))
    if layout == CONV:
        kernel, channels = shape
        return (channels, 1, kernel)
    return tuple(shape)


def _isotropic_table(layout: str, ref: str, ours: str) -> list[Tensor]:
    """An isotropic stack: layers.{i} / blocks.{i}, then its final norm."""
    table = []
    letters = [letter for letter, count in parse_layout(layout) for _ in range(count)]
    for i, letter in enumerate(letters):
        block_ref, block_ours = f"{ref}.layers.{i}", f"{ours}.blocks.{i}"
        table.append(Tensor(f"{block_ref}.norm1.weight", f"{block_ours}.norm1.weight", SAME))
        mixer = MAMBA_MIXER if letter in "mM" else ATTENTION_MIXER
        table += [Tensor(f"{block_ref}.mixer.{r}", f"{block_ours}.mixer.{o}", lay) for r, o, lay in mixer]
        if letter.isupper():
            table += [Tensor(f"{block_ref}.{r}", f"{block_ours}.{o}", lay) for r, o, lay in BLOCK_MLP]
    table.append(Tensor(f"{ref}.rmsnorm.weight", f"{ours}.norm.weight", SAME))
    return table


def _stage_table(config: ModelConfig, stage: int, ref: str, ours: str) -> list[Tensor]:
    """Stage `stage`, named `ref` there (backbone, backbone.main_network, ...) and `ours` here
    (backbone, backbone.inner, ...)."""
    if stage == config.depth:
        (main_layout,) = config.stage_layout(stage)
        return _isotropic_table(main_layout, f"{ref}.main_network", f"{ours}.main")
    encoder_layout, decoder_layout = config.stage_layout(stage)
    table = _isotropic_table(encoder_layout, f"{ref}.encoder", f"{ours}.encoder")
    if config.routing_mode(stage)[0] == "learned":
        table += [Tensor(f"{ref}.{r}", f"{ours}.{o}", lay) for r, o, lay in STAGE_ROUTING]
    table += [Tensor(f"{ref}.{r}", f"{ours}.{o}", lay) for r, o, lay in STAGE_RESIDUAL]
    if config.d_model[stage + 1] > config.d_model[stage]:
        table.append(Tensor(f"{ref}.main_network.pad_dimension", f"{ours}.pad_dimension", SAME))
    table += _stage_table(config, stage + 1, f"{ref}.main_network", f"{ours}.inner")
    table += _isotropic_table(decoder_layout, f"{ref}.decoder", f"{ours}.decoder")
    return table


def parameter_table(config: ModelConfig) -> list[Tensor]:
    """Every tensor of the reference's state_dict for `config`, in its module order."""
    table = [Tensor("embeddings.weight", "embedding.embedding", SAME)]
    table += _stage_table(config, 0, "backbone", "backbone")
    if config.tie_embeddings:
        table.append(Tensor("lm_head.weight", "embedding.embedding", SAME, tied=True))
    else:
        table.append(Tensor("lm_head.weight", "lm_head.kernel", TRANSPOSED))
    return table


def _first(names, limit: int = 3) -> str:
    names = list(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_file_keys(
    table: list[Tensor], file_shapes: dict[str, tuple], model_shapes: dict[str, tuple], what: str
) -> None:
    """Strict match of a file's keys and shapes with the table: every key used once, every
    parameter filled, every shape as the model expects. Raises one ConvertError, starting with
    `what`, naming the first missing, unexpected and mismatched keys."""
    used = {t.key for t in table}
    missing = [t.key for t in table if t.key not in file_shapes and not t.tied]
    unexpected = [k for k in file_shapes if k not in used and not k.endswith(SKIPPED_SUFFIXES)]
    mismatched = []
    for t in table:
        if t.key in file_shapes:
            expected = reference_shape(model_shapes[t.path], t.layout)
            if tuple(file_shapes[t.key]) != expected:
                mismatched.append(f"{t.key} is {tuple(file_shapes[t.key])}, the config needs {expected}")
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_first(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_first(mismatched)}")
    if problems:
        raise ConvertError(f"{what}: " + "; ".join(problems))


def check_model_covered(table: list[Tensor], model_shapes: dict[str, tuple]) -> None:
    """Every parameter of the model has exactly one untied entry (a table that missed one would
    leave it unfilled)."""
    paths = [t.path for t in table if not t.tied]
    uncovered = sorted(set(model_shapes) - set(paths))
    if uncovered or len(paths) != len(set(paths)) or set(paths) - set(model_shapes):
        raise ConvertError(
            f"internal: the reference table does not cover the model's parameters (e.g. {_first(uncovered)})"
        )


def reference_config(config: ModelConfig) -> dict:
    """Our config -> the reference's config.json (its fields only). Raises ConvertError for what
    the reference cannot express."""
    if config.ssm_cfg.head_dim != REFERENCE_SSM_HEAD_DIM and any(
        letter in "mM"
        for stage in range(config.depth + 1)
        for layout in config.stage_layout(stage)
        for letter, _ in parse_layout(layout)
    ):
        raise ConvertError(
            f"the reference's Mamba2 heads have {REFERENCE_SSM_HEAD_DIM} dims; this model's have {config.ssm_cfg.head_dim}"
        )
    attn = config.attn_cfg
    if attn.num_kv_heads is not None and tuple(attn.num_kv_heads) != tuple(attn.num_heads):
        raise ConvertError(
            f"the reference has no grouped KV heads; this model has num_kv_heads {list(attn.num_kv_heads)}"
        )
    heuristic = [mode for mode in config.routing if mode != "learned"]
    if heuristic:
        raise ConvertError(f"the reference routes with learned boundaries only; this model uses {heuristic[0]!r}")
    ssm = config.ssm_cfg
    return {
        "arch_layout": config.to_dict()["arch_layout"],
        "d_model": list(config.d_model),
        "d_intermediate": list(config.d_intermediate),
        "vocab_size": config.vocab_size,
        "ssm_cfg": {"chunk_size": ssm.chunk_size, "d_conv": ssm.d_conv, "d_state": ssm.d_state, "expand": ssm.expand},
        "attn_cfg": {
            "num_heads": list(attn.num_heads),
            "rotary_emb_dim": list(attn.rotary_emb_dim),
            "window_size": list(attn.window_size),
        },
        "tie_embeddings": config.tie_embeddings,
    }
