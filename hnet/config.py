"""Model configuration: dataclasses, loading from JSON, validation. Pure data: nothing here
imports JAX or the model (the parameter report is hnet/param_report.py).

The field names match the published H-Net JSON configs (goombalab/hnet `configs/*.json`), so those
files load unchanged; fields we add (target_ratio, routing, capacity, dtype, ...) have defaults.

A model is a hierarchy described by a nested layout list:

    ["T12"]                                  depth 0: a plain isotropic model (Transformer baseline)
    ["m4", ["T22"], "m4"]                    depth 1: encoder, main network, decoder
    ["m4", ["T1m4", ["T26"], "m4T1"], "m4"]  depth 2

Per-stage lists (d_model, d_intermediate, attention heads, ...) have depth + 1 entries, outermost
stage first; per-chunking-stage lists (target_ratio, routing) have depth entries.

    python -m hnet.param_report configs/hnet_1stage_L.json          # validate, parameter table
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hnet.errors import ConfigError
from hnet.vocab import BOS_ID, BYTE_VOCAB_SIZE, TOKEN_BOS_ID


LAYER_LETTERS = {
    "m": "Mamba2",
    "M": "Mamba2 + SwiGLU",
    "t": "attention",
    "T": "attention + SwiGLU",
}
ROUTING_MODES = ("learned", "space", "stride")
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class SSMConfig:
    """Mamba2 mixer settings, shared by all stages (as in the published configs)."""

    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    chunk_size: int = 256
    head_dim: int = 64


@dataclass(frozen=True)
class AttnConfig:
    """Attention settings, one entry per stage (outermost first).

    window_size: -1 for global attention, else a query attends to window_size previous
    positions and itself. num_kv_heads: grouped KV heads (None = num_heads, plain MHA).
    """

    num_heads: tuple[int, ...] = ()
    rotary_emb_dim: tuple[int, ...] = ()
    window_size: tuple[int, ...] = ()
    num_kv_heads: tuple[int, ...] | None = None


EXACT = "exact"  # capacity_slack setting under which no boundary is ever dropped (hnet.chunking.CapacityRule)
MLP_MULTIPLE = 128  # SwiGLU hidden sizes are rounded up to this, as the reference does


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= value (ints or int arrays)."""
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class ModelConfig:
    arch_layout: tuple  # nested tuple of layout strings, see module docstring
    d_model: tuple[int, ...]
    d_intermediate: tuple[int, ...]
    vocab_size: int = 256
    ssm_cfg: SSMConfig = field(default_factory=SSMConfig)
    attn_cfg: AttnConfig = field(default_factory=AttnConfig)
    tie_embeddings: bool = False
    # --- Our additions (not in the published files) ---
    # Target compression N_s per chunking stage (ratio loss); default 6 for 1-stage, 3 per stage else.
    target_ratio: tuple[float, ...] | None = None
    # Boundary rule per chunking stage: "learned", "space" (outermost stage only) or "stride:K".
    routing: tuple[str, ...] | None = None
    # Chunk capacity (hnet.chunking.CapacityRule): a token bucket of `capacity_burst` chunks plus
    # capacity_slack / N chunks per position, per document and per row; "exact" (or a slack >= N)
    # never drops a boundary. Static chunk slots are rounded up to a multiple of `capacity_multiple`.
    capacity_slack: float | str = 2.0
    capacity_burst: int = 128
    capacity_multiple: int = 128
    # Chunk slots that follow the data (hnet.slots): the stacks on a stage's chunks run on the
    # smallest of these fractions of the stage's target chunk count (seq_len / N_0 / ... / N_s),
    # rounded up to capacity_multiple, that holds the chunks kept, else on the static cap. Rows are
    # ordered by chunks kept and cut into `slot_groups` groups per micro-batch, each with its own
    # length. An empty ladder runs on the static cap alone.
    slot_ladder: tuple[float, ...] = (1.0, 1.25, 1.5, 1.75, 2.0)
    slot_groups: int = 4
    # Id that starts every document (byte models: BOS_ID = 254; hnet.io.tokenizer puts <|bos|> at 0).
    bos_id: int | None = None
    # Compute dtype of matmuls; parameters and the residual stream stay float32.
    dtype: str = "bfloat16"

    # ---- derived views ----
    @property
    def depth(self) -> int:
        """Number of chunking stages (0 = plain isotropic model)."""
        return len(stage_layouts(self.arch_layout)) - 1

    @property
    def is_hierarchical(self) -> bool:
        return self.depth > 0

    @property
    def is_byte_model(self) -> bool:
        """Reads raw bytes (H-Nets, byte Transformers), rather than BPE tokens."""
        return self.vocab_size == BYTE_VOCAB_SIZE

    def mlp_hidden(self, stage: int) -> int:
        """SwiGLU hidden size of a stage: d_intermediate rounded up to MLP_MULTIPLE."""
        return round_up(self.d_intermediate[stage], MLP_MULTIPLE)

    def stage_layout(self, stage: int) -> tuple[str, ...]:
        """(encoder, decoder) layout strings for a chunking stage, or (main,) for the innermost."""
        return stage_layouts(self.arch_layout)[stage]

    def num_kv_heads(self, stage: int) -> int:
        kv = self.attn_cfg.num_kv_heads
        return self.attn_cfg.num_heads[stage] if kv is None else kv[stage]

    def ratio(self, stage: int) -> float:
        return self.target_ratio[stage]

    def routing_mode(self, stage: int) -> tuple[str, int]:
        """("learned"|"space"|"stride", stride K or 0)."""
        mode = self.routing[stage]
        if mode.startswith("stride:"):
            return "stride", int(mode.split(":", 1)[1])
        return mode, 0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["arch_layout"] = layout_to_lists(self.arch_layout)
        return out


# --------------------------------------------------------------------------------------------
# Layout helpers
# --------------------------------------------------------------------------------------------

_LAYOUT_TOKEN = re.compile(r"([A-Za-z])(\d+)")


def parse_layout(layout: str) -> list[tuple[str, int]]:
    """ "T1m4" -> [("T", 1), ("m", 4)]. Raises ConfigError on anything else."""
    if not isinstance(layout, str):
        raise ConfigError(f"arch_layout: expected a layout string like 'm4' or 'T1m4', got {layout!r}")
    pos, parts = 0, []
    for match in _LAYOUT_TOKEN.finditer(layout):
        if match.start() != pos:
            break
        letter, count = match.group(1), int(match.group(2))
        if letter not in LAYER_LETTERS:
            raise ConfigError(
                f"arch_layout: unknown layer letter {letter!r} in {layout!r} (known: {', '.join(LAYER_LETTERS)})"
            )
        parts.append((letter, count))
        pos = match.end()
    if pos != len(layout) or not layout:
        raise ConfigError(
            f"arch_layout: cannot parse {layout!r}; expected letters {''.join(LAYER_LETTERS)} each followed by a count"
        )
    return parts


def stage_layouts(arch_layout) -> list[tuple[str, ...]]:
    """Flatten the nested layout: [(enc, dec) per chunking stage ..., (main,)]."""
    if not isinstance(arch_layout, (list, tuple)):
        raise ConfigError(f"arch_layout: expected a list, got {arch_layout!r}")
    if len(arch_layout) == 1:
        return [(arch_layout[0],)]
    if len(arch_layout) == 3 and isinstance(arch_layout[1], (list, tuple)):
        encoder, inner, decoder = arch_layout
        return [(encoder, decoder)] + stage_layouts(inner)
    raise ConfigError(
        f"arch_layout: each level must be [layout] or [encoder, [inner ...], decoder], got {arch_layout!r}"
    )


def _layout_to_tuples(layout):
    return tuple(_layout_to_tuples(x) if isinstance(x, (list, tuple)) else x for x in layout)


def layout_to_lists(layout):
    return [layout_to_lists(x) if isinstance(x, (list, tuple)) else x for x in layout]


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


def _as_tuple(value, name):
    if value is None:
        return None
    if isinstance(value, (int, float, str)):
        return (value,)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name}: expected a list, got {value!r}")
    return tuple(value)


def check_fields(cls, data: dict, name: str) -> dict:
    """`data` must be a dict whose keys are all fields of dataclass `cls`; returns it."""
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected an object, got {data!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{name}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return data


def config_from_dict(data: dict) -> ModelConfig:
    """Build and validate a ModelConfig from a (published-format) dictionary."""
    data = dict(check_fields(ModelConfig, data, "model config"))
    for required in ("arch_layout", "d_model"):
        if required not in data:
            raise ConfigError(f"model config: missing required field {required!r}")
    ssm = SSMConfig(**check_fields(SSMConfig, data.pop("ssm_cfg", {}) or {}, "ssm_cfg"))
    attn_raw = dict(check_fields(AttnConfig, data.pop("attn_cfg", {}) or {}, "attn_cfg"))
    attn = AttnConfig(**{k: _as_tuple(v, f"attn_cfg.{k}") for k, v in attn_raw.items()})
    data["arch_layout"] = (
        _layout_to_tuples(data["arch_layout"])
        if isinstance(data["arch_layout"], (list, tuple))
        else data["arch_layout"]
    )
    for key in ("d_model", "d_intermediate", "target_ratio", "routing", "slot_ladder"):
        if key in data:
            data[key] = _as_tuple(data[key], key)
    if "d_intermediate" not in data:
        data["d_intermediate"] = tuple(0 for _ in data["d_model"])
    config = ModelConfig(ssm_cfg=ssm, attn_cfg=attn, **data)
    return validate(config)


def validate(config: ModelConfig) -> ModelConfig:
    """Check every field; fill derived defaults. Returns the completed config."""
    stages = stage_layouts(config.arch_layout)
    n_stages = len(stages)
    depth = n_stages - 1
    for stage in stages:
        for layout in stage:
            parse_layout(layout)

    def per_stage(name, values, n=n_stages, what="stage"):
        if values is None or len(values) != n:
            got = "missing" if values is None else f"{len(values)} entries"
            raise ConfigError(
                f"{name}: expected {n} entries (one per {what}, from arch_layout's depth {depth}), got {got}"
            )

    def positive_ints(name, values, allow_zero=False):
        for v in values:
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (v == 0 and not allow_zero):
                raise ConfigError(
                    f"{name}: expected {'non-negative' if allow_zero else 'positive'} integers, got {list(values)}"
                )

    per_stage("d_model", config.d_model)
    positive_ints("d_model", config.d_model)
    per_stage("d_intermediate", config.d_intermediate)
    positive_ints("d_intermediate", config.d_intermediate, allow_zero=True)
    for s, stage_layout in enumerate(stages):
        if config.d_intermediate[s] == 0 and any(
            letter.isupper() for layout in stage_layout for letter, _ in parse_layout(layout)
        ):
            raise ConfigError(
                f"d_intermediate[{s}] is 0 but stage {s}'s layout {list(stage_layout)} has MLP blocks (M or T)"
            )
    for s in range(1, n_stages):
        if config.d_model[s] < config.d_model[s - 1]:
            raise ConfigError(
                f"d_model: inner stages must be at least as wide as outer ones, got {list(config.d_model)}"
            )
    positive_ints("vocab_size", [config.vocab_size])
    if depth > 0 and config.vocab_size != BYTE_VOCAB_SIZE:
        raise ConfigError(f"vocab_size: an H-Net works on bytes and needs {BYTE_VOCAB_SIZE}, got {config.vocab_size}")

    ssm = config.ssm_cfg
    positive_ints("ssm_cfg", [ssm.d_state, ssm.d_conv, ssm.expand, ssm.chunk_size, ssm.head_dim])

    uses_mamba = any(letter in "mM" for stage in stages for layout in stage for letter, _ in parse_layout(layout))
    if uses_mamba:
        for s, d in enumerate(config.d_model):
            if (ssm.expand * d) % ssm.head_dim:
                raise ConfigError(
                    f"ssm_cfg.head_dim {ssm.head_dim} does not divide expand*d_model[{s}] = {ssm.expand * d}"
                )

    attn = config.attn_cfg
    uses_attn = any(letter in "tT" for stage in stages for layout in stage for letter, _ in parse_layout(layout))
    num_heads = attn.num_heads or tuple(max(1, d // 64) for d in config.d_model)
    window = attn.window_size or tuple(-1 for _ in config.d_model)
    rotary = attn.rotary_emb_dim or tuple((d // h) // 2 for d, h in zip(config.d_model, num_heads))
    per_stage("attn_cfg.num_heads", num_heads)
    per_stage("attn_cfg.window_size", window)
    per_stage("attn_cfg.rotary_emb_dim", rotary)
    positive_ints("attn_cfg.num_heads", num_heads)
    positive_ints("attn_cfg.rotary_emb_dim", rotary, allow_zero=True)
    for s, w in enumerate(window):
        if not isinstance(w, int) or (w < 1 and w != -1):
            raise ConfigError(f"attn_cfg.window_size[{s}]: expected -1 (global) or a positive integer, got {w!r}")
    kv = attn.num_kv_heads
    if kv is not None:
        per_stage("attn_cfg.num_kv_heads", kv)
        positive_ints("attn_cfg.num_kv_heads", kv)
    if uses_attn:
        for s, (d, h) in enumerate(zip(config.d_model, num_heads)):
            if d % h:
                raise ConfigError(f"attn_cfg.num_heads[{s}] = {h} does not divide d_model[{s}] = {d}")
            head_dim = d // h
            if rotary[s] > head_dim or rotary[s] % 2:
                raise ConfigError(
                    f"attn_cfg.rotary_emb_dim[{s}] = {rotary[s]} must be even and at most the head dim {head_dim}"
                )
            if kv is not None and h % kv[s]:
                raise ConfigError(f"attn_cfg.num_kv_heads[{s}] = {kv[s]} must divide num_heads[{s}] = {h}")
    attn = AttnConfig(
        num_heads=tuple(num_heads), rotary_emb_dim=tuple(rotary), window_size=tuple(window), num_kv_heads=kv
    )

    target = config.target_ratio
    if target is None:
        target = (6.0,) if depth == 1 else tuple(3.0 for _ in range(depth))
    per_stage("target_ratio", target, n=depth, what="chunking stage")
    for r in target:
        if not isinstance(r, (int, float)) or r <= 1:
            raise ConfigError(f"target_ratio: each target compression N must be > 1, got {list(target)}")
    routing = config.routing or tuple("learned" for _ in range(depth))
    per_stage("routing", routing, n=depth, what="chunking stage")
    for s, mode in enumerate(routing):
        name = mode.split(":", 1)[0] if isinstance(mode, str) else None
        if name not in ROUTING_MODES:
            raise ConfigError(f"routing[{s}]: expected 'learned', 'space' or 'stride:K', got {mode!r}")
        if name == "stride":
            stride = mode.split(":", 1)[1] if ":" in mode else ""
            if not stride.isdigit() or int(stride) < 1:
                raise ConfigError(f"routing[{s}]: 'stride:K' needs a positive integer K, got {mode!r}")
        elif ":" in mode:
            raise ConfigError(f"routing[{s}]: {name!r} takes no argument, got {mode!r}")
        if name == "space" and s != 0:
            raise ConfigError(f"routing[{s}]: 'space' needs bytes as input, so only the outermost stage can use it")
    slack = config.capacity_slack
    if slack != EXACT and (not isinstance(slack, (int, float)) or isinstance(slack, bool) or not slack >= 1):
        raise ConfigError(f"capacity_slack: expected a number >= 1 or {EXACT!r}, got {slack!r}")
    positive_ints("capacity_burst", [config.capacity_burst], allow_zero=True)
    positive_ints("capacity_multiple", [config.capacity_multiple])
    ladder = () if config.slot_ladder is None else config.slot_ladder
    if any(not isinstance(f, (int, float)) or isinstance(f, bool) or not f > 0 for f in ladder):
        raise ConfigError(f"slot_ladder: expected positive fractions of the target chunk count, got {list(ladder)}")
    positive_ints("slot_groups", [config.slot_groups])
    bos_id = config.bos_id
    if bos_id is None:
        bos_id = BOS_ID if config.vocab_size == BYTE_VOCAB_SIZE else TOKEN_BOS_ID
    if not isinstance(bos_id, int) or isinstance(bos_id, bool) or not 0 <= bos_id < config.vocab_size:
        raise ConfigError(f"bos_id: expected an id below vocab_size {config.vocab_size}, got {bos_id!r}")
    if config.dtype not in DTYPES:
        raise ConfigError(f"dtype: expected one of {DTYPES}, got {config.dtype!r}")
    if not isinstance(config.tie_embeddings, bool):
        raise ConfigError(f"tie_embeddings: expected true or false, got {config.tie_embeddings!r}")
    return dataclasses.replace(
        config,
        attn_cfg=attn,
        target_ratio=tuple(float(r) for r in target),
        routing=tuple(routing),
        capacity_slack=slack if slack == EXACT else float(slack),
        slot_ladder=tuple(sorted(float(f) for f in ladder)),
        bos_id=bos_id,
    )


def read_json(path: Path, what: str = "config file"):
    """Parse a JSON file; a missing or malformed file is a one-line ConfigError."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None


def load_config(path: str | Path) -> ModelConfig:
    """Load and validate a model config JSON file. Raises ConfigError with a one-line message."""
    path = Path(path)
    data = read_json(path)
    try:
        return config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except TypeError as err:
        raise ConfigError(f"{path}: {err}") from None


def replace(config: ModelConfig, **changes) -> ModelConfig:
    """A validated copy with some fields changed (e.g. replace(cfg, dtype="float32"))."""
    return validate(dataclasses.replace(config, **changes))
