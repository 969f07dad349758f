"""Model configuration: dataclasses, loading from JSON, validation, parameter-count report.

The field names match the published H-Net JSON configs (goombalab/hnet `configs/*.json`), so those
files load unchanged; fields we add (target_ratio, routing, capacity, dtype, ...) have defaults.

A model is a hierarchy described by a nested layout list:

    ["T12"]                                  depth 0: a plain isotropic model (Transformer baseline)
    ["m4", ["T22"], "m4"]                    depth 1: encoder, main network, decoder
    ["m4", ["T1m4", ["T26"], "m4T1"], "m4"]  depth 2

Per-stage lists (d_model, d_intermediate, attention heads, ...) have depth + 1 entries, outermost
stage first; per-chunking-stage lists (target_ratio, routing) have depth entries.

    python -m hnet.config configs/hnet_1stage_L.json          # parameter table
    python -m hnet.config configs/hnet_1stage_L.json --json   # one JSON object
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hnet.vocab import BOS_ID, BYTE_VOCAB_SIZE, TOKEN_BOS_ID


class ConfigError(ValueError):
    """A configuration problem, with a one-line message naming the offending field."""


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


EXACT = "exact"  # capacity_slack setting under which no boundary is ever dropped
RATE_UNIT = 4096  # chunk rates are whole multiples of 1 / RATE_UNIT, so the rule is integer arithmetic


@dataclass(frozen=True)
class CapacityRule:
    """How many chunks a document may have started by each of its positions: a token bucket.

    Chunk k of a document (k = 0, 1, ...) may start at document position u only while
    k < burst + rate * (u + 1), rate = rate_units / RATE_UNIT (= capacity_slack / N, at most 1).
    The same allowance then applies to the row over what the documents kept (chunk k of the row
    at row position t while k < burst + rate * (t + 1)), which binds only in rows packing several
    documents. So whether a position starts a chunk depends only on earlier positions, never on
    the row length, padding, an evaluation window or a cache size (prefix consistency), and a row
    of L positions never needs more than row_capacity(L) chunk slots. With rate 1 nothing is ever
    dropped: the exact setting.
    """

    rate_units: int
    burst: int
    multiple: int

    @property
    def is_exact(self) -> bool:
        return self.rate_units >= RATE_UNIT

    def allowance(self, doc_position):
        """ceil(burst + rate * (u + 1)) for document positions u: a Python int or an int32 array.

        Integer arithmetic only (split so that nothing overflows int32), so the parallel forward
        and the one-step decode compute exactly the same numbers.
        """
        count = doc_position + 1
        whole, part = count // RATE_UNIT, count % RATE_UNIT
        return self.burst + whole * self.rate_units + (part * self.rate_units + RATE_UNIT - 1) // RATE_UNIT

    def row_capacity(self, length: int) -> int:
        """Static chunk slots M for rows of `length` positions (at most `length`)."""
        if self.is_exact:
            return length
        wanted = self.allowance(length - 1)
        return min(length, -(-wanted // self.multiple) * self.multiple)


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
    # Chunk capacity (CapacityRule): a token bucket of `capacity_burst` chunks plus
    # capacity_slack / N chunks per position, per document and per row; "exact" (or a slack >= N)
    # never drops a boundary. Static chunk slots are rounded up to a multiple of `capacity_multiple`.
    capacity_slack: float | str = 2.0
    capacity_burst: int = 16
    capacity_multiple: int = 128
    # Id that starts every document (byte models: BOS_ID = 254; hnet.tokenizer puts <|bos|> at 0).
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

    @property
    def capacity_is_exact(self) -> bool:
        """True when no chunking stage can ever drop a boundary."""
        return all(self.capacity_rule(s).is_exact for s in range(self.depth))

    def capacity_rule(self, stage: int) -> CapacityRule:
        """The chunk capacity rule of a chunking stage (see CapacityRule)."""
        if self.capacity_slack == EXACT:
            rate_units = RATE_UNIT
        else:
            rate_units = min(RATE_UNIT, math.ceil(self.capacity_slack / self.ratio(stage) * RATE_UNIT))
        return CapacityRule(rate_units=rate_units, burst=self.capacity_burst, multiple=self.capacity_multiple)

    def capacity(self, length: int, stage: int) -> int:
        """Static chunk capacity M of a chunking stage whose input rows have `length` positions."""
        return self.capacity_rule(stage).row_capacity(length)

    def stage_lengths(self, length: int) -> list[int]:
        """Static sequence length at each stage for an input of `length` bytes."""
        lengths = [length]
        for stage in range(self.depth):
            lengths.append(self.capacity(lengths[-1], stage))
        return lengths

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["arch_layout"] = _layout_to_lists(self.arch_layout)
        return out


# --------------------------------------------------------------------------------------------
# Layout helpers
# --------------------------------------------------------------------------------------------

_LAYOUT_TOKEN = re.compile(r"([A-Za-z])(\d+)")


def parse_layout(layout: str) -> list[tuple[str, int]]:
    """"T1m4" -> [("T", 1), ("m", 4)]. Raises ConfigError on anything else."""
    if not isinstance(layout, str):
        raise ConfigError(f"arch_layout: expected a layout string like 'm4' or 'T1m4', got {layout!r}")
    pos, parts = 0, []
    for match in _LAYOUT_TOKEN.finditer(layout):
        if match.start() != pos:
            break
        letter, count = match.group(1), int(match.group(2))
        if letter not in LAYER_LETTERS:
            raise ConfigError(
                f"arch_layout: unknown layer letter {letter!r} in {layout!r} "
                f"(known: {', '.join(LAYER_LETTERS)})"
            )
        parts.append((letter, count))
        pos = match.end()
    if pos != len(layout) or not layout:
        raise ConfigError(f"arch_layout: cannot parse {layout!r}; expected letters {''.join(LAYER_LETTERS)} each followed by a count")
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


def _layout_to_lists(layout):
    return [_layout_to_lists(x) if isinstance(x, (list, tuple)) else x for x in layout]


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
    data["arch_layout"] = _layout_to_tuples(data["arch_layout"]) if isinstance(data["arch_layout"], (list, tuple)) else data["arch_layout"]
    for key in ("d_model", "d_intermediate", "target_ratio", "routing"):
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
            raise ConfigError(f"{name}: expected {n} entries (one per {what}, from arch_layout's depth {depth}), got {got}")

    def positive_ints(name, values, allow_zero=False):
        for v in values:
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (v == 0 and not allow_zero):
                raise ConfigError(f"{name}: expected {'non-negative' if allow_zero else 'positive'} integers, got {list(values)}")

    per_stage("d_model", config.d_model)
    positive_ints("d_model", config.d_model)
    per_stage("d_intermediate", config.d_intermediate)
    positive_ints("d_intermediate", config.d_intermediate, allow_zero=True)
    for s, stage_layout in enumerate(stages):
        if config.d_intermediate[s] == 0 and any(l.isupper() for layout in stage_layout for l, _ in parse_layout(layout)):
            raise ConfigError(f"d_intermediate[{s}] is 0 but stage {s}'s layout {list(stage_layout)} has MLP blocks (M or T)")
    for s in range(1, n_stages):
        if config.d_model[s] < config.d_model[s - 1]:
            raise ConfigError(f"d_model: inner stages must be at least as wide as outer ones, got {list(config.d_model)}")
    positive_ints("vocab_size", [config.vocab_size])
    if depth > 0 and config.vocab_size != 256:
        raise ConfigError(f"vocab_size: an H-Net works on bytes and needs 256, got {config.vocab_size}")

    ssm = config.ssm_cfg
    positive_ints("ssm_cfg", [ssm.d_state, ssm.d_conv, ssm.expand, ssm.chunk_size, ssm.head_dim])

    uses_mamba = any(letter in "mM" for stage in stages for layout in stage for letter, _ in parse_layout(layout))
    if uses_mamba:
        for s, d in enumerate(config.d_model):
            if (ssm.expand * d) % ssm.head_dim:
                raise ConfigError(f"ssm_cfg.head_dim {ssm.head_dim} does not divide expand*d_model[{s}] = {ssm.expand * d}")

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
                raise ConfigError(f"attn_cfg.rotary_emb_dim[{s}] = {rotary[s]} must be even and at most the head dim {head_dim}")
            if kv is not None and h % kv[s]:
                raise ConfigError(f"attn_cfg.num_kv_heads[{s}] = {kv[s]} must divide num_heads[{s}] = {h}")
    attn = AttnConfig(num_heads=tuple(num_heads), rotary_emb_dim=tuple(rotary), window_size=tuple(window), num_kv_heads=kv)

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


# --------------------------------------------------------------------------------------------
# Parameter-count report
# --------------------------------------------------------------------------------------------


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters per component, keyed like "stage0.encoder", "stage1.main", "embedding".

    Uses abstract evaluation, so even XL configs are counted without allocating memory.
    """
    import jax
    from flax import nnx

    from hnet.model import build_model

    abstract = nnx.eval_shape(lambda: build_model(config, seed=0))
    state = nnx.state(abstract, nnx.Param)
    counts: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        counts[_component_name(keys)] = counts.get(_component_name(keys), 0) + math.prod(leaf.shape)
    return counts


def _component_name(keys: list[str]) -> str:
    """Map a parameter path to a report row: walk `.inner` links to count the stage."""
    if keys[0] != "backbone":
        return keys[0]  # embedding, lm_head
    stage, rest = 0, keys[1:]
    while rest and rest[0] == "inner":
        stage, rest = stage + 1, rest[1:]
    return f"stage{stage}.{rest[0]}"


def format_report(config: ModelConfig, counts: dict[str, int]) -> str:
    total = sum(counts.values())
    width = max(len(k) for k in counts) + 2
    lines = [f"{'component':<{width}}{'params':>15}{'share':>8}", "-" * (width + 23)]
    for name in sorted(counts, key=_report_order):
        lines.append(f"{name:<{width}}{counts[name]:>15,}{counts[name] / total:>8.1%}")
    lines.append("-" * (width + 23))
    lines.append(f"{'total':<{width}}{total:>15,}")
    return "\n".join(lines)


_STAGE_PARTS = ["encoder", "routing", "residual_proj", "pad_dimension", "main", "decoder"]


def _report_order(name: str):
    """Embedding first, then stages outermost-in in data-flow order, then the LM head."""
    if name == "embedding":
        return (-1, 0)
    if name == "lm_head":
        return (10**6, 0)
    stage, part = name.split(".", 1)
    return (int(stage[len("stage"):]), _STAGE_PARTS.index(part) if part in _STAGE_PARTS else len(_STAGE_PARTS))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hnet.config", description="Validate a model config and print its parameter counts.")
    parser.add_argument("config", help="path to a model config JSON")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = parameter_counts(config)
    if args.json:
        print(json.dumps({"config": args.config, "depth": config.depth, "params": counts, "total_params": sum(counts.values())}))
    else:
        print(f"{args.config}: depth {config.depth}, layout {_layout_to_lists(config.arch_layout)}, d_model {list(config.d_model)}")
        print(format_report(config, counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
