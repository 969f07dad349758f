"""Model FLOPs of H-Nets and Transformer baselines: per sequence, per training step, per byte.

Conventions
- A matmul (m x k) @ (k x n) costs 2·m·n·k FLOPs (one multiply and one add per term).
- Training costs 3 x the forward pass (the backward pass does two matmuls per forward matmul:
  gradients with respect to the inputs and to the weights).
- Counted: every matmul (linear layers, attention scores and values, the SSD scan's einsums), the
  Mamba2 depthwise convolution, the dechunking EMA and the SSD state carry. Not counted:
  elementwise work (norms, activations, RoPE, softmax, the SSD decay exponentials, the
  straight-through multiply, residual adds), whose cost is a small fraction of the matmuls'.
  The embedding is a table lookup and costs 0 FLOPs; a tied LM head still costs its matmul.
- These are *model* FLOPs (the useful work): attention counts only the keys a query can see
  (causal mask, sliding window), although the kernels compute whole blocks (the plain path the
  full L x L score matrix) and recompute scores in the backward pass (hnet.perf.bench memory counts
  what a step executes); inner
  stages count their real length, not the padded static capacity. MFU = model FLOPs per step /
  (step time x peak FLOP/s), as in the PaLM paper.

Per layer at a stage of width d and length L (positions per sequence):
- attention (H heads of dim Dh, Hkv KV heads): qkv 2·L·d·(H + 2·Hkv)·Dh, out 2·L·d·d, scores
  and values 2 x 2·H·Dh·K, where K = sum over queries of the visible keys: L(L+1)/2 for global
  attention; with window w a query sees min(i, w) + 1 keys.
- SwiGLU (hidden h = d_intermediate rounded up to a multiple of 128): 2·L·d·2h + 2·L·h·d.
- Mamba2 (Di = expand·d, H = Di / P heads of dim P, state S, conv width K_conv, scan chunk
  Q = min(chunk_size, L), n = L / Q chunks): in_proj 2·L·d·(2·Di + 2·S + H), conv
  2·L·(Di + 2·S)·K_conv, out_proj 2·L·Di·d, and the SSD scan as `ssd_scan` computes it:
  C·Bᵀ per chunk 2·n·Q²·S, intra-chunk outputs 2·n·Q²·H·P (the full Q x Q block), chunk states
  2·L·H·P·S, outputs from carried states 2·L·H·P·S, state carry 2·n·H·P·S.
- Per chunking stage: routing q/k projections 2 x 2·L·d² (learned routing only), residual_proj
  2·L·d², dechunk EMA 3·M·d over the M = L_{s+1} chunks.
- LM head 2·L·d·V.

Stage lengths: L_0 is the sequence length (bytes; tokens for a token model). An inner stage has
L_{s+1} = L_0 / bytes_per_chunk[s] when a measured (cumulative) bytes per chunk is given, as
reported by the model's StageOutput.bytes_per_chunk; otherwise L_s / N_s for learned routing
(target_ratio) and L_s / K for "stride:K". "space" routing has no target and needs a measured or
assumed bytes per chunk.

    python -m hnet.flops configs/hnet_1stage_S.json --seq-len 8192
    python -m hnet.flops configs/hnet_1stage_S.json --bytes-per-chunk 4.8 --json
    python -m hnet.flops configs/transformer_bpe_S.json --bytes-per-token 3.933    # 8192 / 3.933 tokens
    python -m hnet.flops --family tiny          # a compute-matched family (configs/families.json)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from hnet.config import ModelConfig, load_config, parse_layout, read_json
from hnet.errors import ConfigError, FlopsError, report

FAMILIES_FILE = Path(__file__).resolve().parents[1] / "configs" / "families.json"
TRAINING_MULTIPLIER = 3  # forward + backward (2 x forward)
OPS = ("linear", "attention", "ssd", "other")  # kinds of work in a report row


# --------------------------------------------------------------------------------------------
# Stage lengths
# --------------------------------------------------------------------------------------------


def stage_lengths(config: ModelConfig, seq_len: float, bytes_per_chunk=None) -> list[float]:
    """Real (average) positions per sequence at each stage, outermost first: depth + 1 numbers.

    bytes_per_chunk: None, or one entry per chunking stage, each None (use the routing rule) or
    the cumulative outermost-input positions per stage-s chunk (StageOutput.bytes_per_chunk).
    """
    if bytes_per_chunk is None:
        bytes_per_chunk = [None] * config.depth
    bytes_per_chunk = [None if b is None else float(b) for b in bytes_per_chunk]  # also takes JAX scalars
    if len(bytes_per_chunk) != config.depth:
        raise FlopsError(
            f"bytes_per_chunk: expected {config.depth} entries (one per chunking stage), got {len(bytes_per_chunk)}"
        )
    lengths = [float(seq_len)]
    for stage, measured in enumerate(bytes_per_chunk):
        mode, stride = config.routing_mode(stage)
        if measured is not None:
            cumulative_before = seq_len / lengths[-1]
            if not measured >= cumulative_before or measured < 1:
                raise FlopsError(
                    f"bytes_per_chunk[{stage}] = {measured}: must be at least 1 and at least stage {stage}'s own "
                    f"bytes per position {cumulative_before:.3g} (values are cumulative, outermost bytes per chunk)"
                )
            lengths.append(seq_len / measured)
        elif mode == "learned":
            lengths.append(lengths[-1] / config.ratio(stage))
        elif mode == "stride":
            lengths.append(lengths[-1] / stride)
        else:
            raise FlopsError(
                f"stage {stage} uses 'space' routing, which has no target ratio: give its measured bytes per chunk"
            )
    return lengths


# --------------------------------------------------------------------------------------------
# Per-layer counts (forward FLOPs for one sequence of `length` positions)
# --------------------------------------------------------------------------------------------


def visible_keys(length: float, window: int) -> float:
    """Sum over the queries of a causal sequence of the keys each can see (itself included).

    window -1: query i sees i + 1 keys, L(L+1)/2 in all. window w: min(i, w) + 1 keys.
    A real (non-integer) length is allowed: the formula is used as is.
    """
    if window < 0:
        return length * (length + 1) / 2
    ramp = min(length, window + 1)  # queries 0 .. w see i + 1 keys, the rest see w + 1
    return ramp * (ramp + 1) / 2 + (length - ramp) * (window + 1)


def attention_flops(config: ModelConfig, stage: int, length: float) -> dict[str, float]:
    d_model = config.d_model[stage]
    heads, kv_heads = config.attn_cfg.num_heads[stage], config.num_kv_heads(stage)
    head_dim = d_model // heads
    projections = 2 * length * d_model * (heads + 2 * kv_heads) * head_dim + 2 * length * d_model * d_model
    scores_and_values = 2 * (2 * heads * head_dim * visible_keys(length, config.attn_cfg.window_size[stage]))
    return {"linear": projections, "attention": scores_and_values}


def mlp_flops(config: ModelConfig, stage: int, length: float) -> dict[str, float]:
    d_model, hidden = config.d_model[stage], config.mlp_hidden(stage)
    return {"linear": 2 * length * d_model * 2 * hidden + 2 * length * hidden * d_model}


def ssd_scan_flops(length: float, chunk_size: int, heads: int, head_dim: int, d_state: int) -> float:
    """The SSD scan of hnet.layers.kernels.ssd.ssd_scan on one sequence (see the module docstring)."""
    chunk = min(chunk_size, length)
    n_chunks = length / chunk
    return (
        2 * n_chunks * chunk * chunk * d_state  # C·Bᵀ within each chunk
        + 2 * n_chunks * chunk * chunk * heads * head_dim  # intra-chunk outputs (full Q x Q block)
        + 2 * length * heads * head_dim * d_state  # each chunk's final state
        + 2 * length * heads * head_dim * d_state  # outputs from the carried state
        + 2 * n_chunks * heads * head_dim * d_state  # carrying the state across chunks
    )


def mamba2_flops(config: ModelConfig, stage: int, length: float) -> dict[str, float]:
    ssm, d_model = config.ssm_cfg, config.d_model[stage]
    d_inner = ssm.expand * d_model
    heads, head_dim, d_state = d_inner // ssm.head_dim, ssm.head_dim, ssm.d_state
    conv_dim = d_inner + 2 * d_state
    projections = 2 * length * d_model * (d_inner + conv_dim + heads) + 2 * length * d_inner * d_model
    conv = 2 * length * conv_dim * ssm.d_conv
    scan = ssd_scan_flops(length, ssm.chunk_size, heads, head_dim, d_state)
    return {"linear": projections, "ssd": scan + conv}


def stack_flops(config: ModelConfig, stage: int, layout: str, length: float) -> dict[str, float]:
    """An isotropic stack (e.g. "T1m4") at `stage`: FLOPs by kind of work."""
    total = dict.fromkeys(OPS, 0.0)
    for letter, count in parse_layout(layout):
        parts = [mamba2_flops(config, stage, length) if letter in "mM" else attention_flops(config, stage, length)]
        if letter.isupper():
            parts.append(mlp_flops(config, stage, length))
        for part in parts:
            for op, flops in part.items():
                total[op] += count * flops
    return total


# --------------------------------------------------------------------------------------------
# Whole model
# --------------------------------------------------------------------------------------------


def forward_flops(config: ModelConfig, seq_len: float, bytes_per_chunk=None) -> dict[str, dict[str, float]]:
    """Forward FLOPs for one sequence: {component: {op: FLOPs}} with op in OPS.

    Components, in data-flow order: "embedding", per chunking stage s "stage{s}.encoder",
    "stage{s}.routing", "stage{s}.residual_proj", then the innermost "stage{depth}.main", then
    "stage{s}.dechunk" and "stage{s}.decoder" from the inside out, and "lm_head".
    """
    lengths = stage_lengths(config, seq_len, bytes_per_chunk)

    def row(**flops):
        return {op: float(flops.get(op, 0.0)) for op in OPS}

    rows = {"embedding": row()}  # a table lookup
    for stage in range(config.depth):
        length, d_model = lengths[stage], config.d_model[stage]
        encoder, _ = config.stage_layout(stage)
        rows[f"stage{stage}.encoder"] = stack_flops(config, stage, encoder, length)
        learned = config.routing_mode(stage)[0] == "learned"
        rows[f"stage{stage}.routing"] = row(linear=2 * (2 * length * d_model * d_model) if learned else 0.0)
        rows[f"stage{stage}.residual_proj"] = row(linear=2 * length * d_model * d_model)
    (main,) = config.stage_layout(config.depth)
    rows[f"stage{config.depth}.main"] = stack_flops(config, config.depth, main, lengths[-1])
    for stage in reversed(range(config.depth)):
        _, decoder = config.stage_layout(stage)
        rows[f"stage{stage}.dechunk"] = row(other=3 * lengths[stage + 1] * config.d_model[stage])
        rows[f"stage{stage}.decoder"] = stack_flops(config, stage, decoder, lengths[stage])
    rows["lm_head"] = row(linear=2 * seq_len * config.d_model[0] * config.vocab_size)
    return rows


def total_flops(forward: dict[str, dict[str, float]]) -> float:
    """Sum of a forward_flops breakdown."""
    return sum(sum(ops.values()) for ops in forward.values())


@dataclass(frozen=True)
class FlopsReport:
    """FLOPs of one model on sequences of `seq_len` positions (bytes, or tokens for a token model).

    forward: {component: {op: forward FLOPs per sequence}} (see forward_flops);
    stage_lengths: real positions per sequence at each stage; bytes_per_sequence: seq_len for a
    byte model, seq_len x bytes_per_token for a token model.
    """

    seq_len: float
    bytes_per_sequence: float
    stage_lengths: tuple[float, ...]
    forward: dict

    @property
    def forward_per_sequence(self) -> float:
        return total_flops(self.forward)

    @property
    def training_per_sequence(self) -> float:
        return TRAINING_MULTIPLIER * self.forward_per_sequence

    @property
    def forward_per_byte(self) -> float:
        return self.forward_per_sequence / self.bytes_per_sequence

    @property
    def training_per_byte(self) -> float:
        return self.training_per_sequence / self.bytes_per_sequence

    def to_dict(self) -> dict:
        return {
            "seq_len": self.seq_len,
            "bytes_per_sequence": self.bytes_per_sequence,
            "stage_lengths": list(self.stage_lengths),
            "forward": self.forward,
            "forward_per_sequence": self.forward_per_sequence,
            "training_per_sequence": self.training_per_sequence,
            "forward_per_byte": self.forward_per_byte,
            "training_per_byte": self.training_per_byte,
        }


def flops_per_byte(config: ModelConfig, seq_len: float, *, bytes_per_chunk=None, bytes_per_token=None) -> FlopsReport:
    """FLOPs report for sequences of `seq_len` positions; see the module docstring.

    A token model (not config.is_byte_model) needs bytes_per_token (its seq_len is in tokens); a byte
    model must not get one. bytes_per_chunk: see stage_lengths.
    """
    if not config.is_byte_model:
        if bytes_per_token is None:
            raise FlopsError(
                f"a token model (vocab_size {config.vocab_size}) needs bytes_per_token to count FLOPs per byte"
            )
        if not bytes_per_token > 0:
            raise FlopsError(f"bytes_per_token must be positive, got {bytes_per_token}")
        bytes_per_sequence = seq_len * bytes_per_token
    else:
        if bytes_per_token is not None:
            raise FlopsError("bytes_per_token is only for token models (not bytes); this model reads bytes")
        bytes_per_sequence = seq_len
    if not seq_len >= 1:
        raise FlopsError(f"seq_len must be at least 1, got {seq_len}")
    forward = forward_flops(config, seq_len, bytes_per_chunk)
    return FlopsReport(seq_len, bytes_per_sequence, tuple(stage_lengths(config, seq_len, bytes_per_chunk)), forward)


def training_flops_per_step(config: ModelConfig, batch_size: int, seq_len: int, bytes_per_chunk=None) -> float:
    """Model FLOPs of one training step (forward + backward) on batch_size sequences of seq_len.

    For MFU: pass the bytes per chunk measured in that step (StageOutput.bytes_per_chunk, one per
    chunking stage) to count the inner stages at their real length.
    """
    return TRAINING_MULTIPLIER * batch_size * total_flops(forward_flops(config, seq_len, bytes_per_chunk))


# --------------------------------------------------------------------------------------------
# Compute-matched families (configs/families.json)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilyMember:
    """One model of a family and the assumption its FLOPs per byte are counted under."""

    name: str
    config_path: Path
    config: ModelConfig
    seq_len: int  # positions per sequence (tokens for a token model)
    bytes_per_token: float | None
    bytes_per_chunk: tuple | None
    report: FlopsReport

    @property
    def assumption(self) -> str:
        if self.bytes_per_token is not None:
            return f"{self.bytes_per_token:g} bytes/token"
        if self.bytes_per_chunk is not None:
            return "bytes/chunk " + ", ".join(f"{b:g}" for b in self.bytes_per_chunk)
        parts = []
        for stage in range(self.config.depth):
            mode, stride = self.config.routing_mode(stage)
            parts.append(f"N={self.config.ratio(stage):g}" if mode == "learned" else f"stride {stride}")
        return ", ".join(parts) or "-"


@dataclass(frozen=True)
class Family:
    """A compute-matched family: members[0] is the reference."""

    name: str
    seq_len_bytes: int
    members: list[FamilyMember]

    def ratio(self, member: FamilyMember) -> float:
        """Training FLOPs per byte relative to the reference member."""
        return member.report.training_per_byte / self.members[0].report.training_per_byte


def load_family(name: str, path: str | Path = FAMILIES_FILE) -> Family:
    """Family `name` of a families file, with every member's FLOPs report (reference first).

    Config paths in the file are relative to the file's folder; a member's bytes_per_token and
    bytes_per_chunk name entries of the file's "measurements". A BPE member's sequence length is
    the family's bytes per sequence / bytes_per_token, rounded.
    """
    path = Path(path)
    data = read_json(path, "families file")
    families, measurements = data.get("families", {}), data.get("measurements", {})
    if name not in families:
        raise FlopsError(f"{path}: no family {name!r} (has {', '.join(families) or 'none'})")
    family = families[name]
    seq_bytes, reference = family["seq_len_bytes"], family["reference"]

    def measured(key: str) -> float:
        if key not in measurements:
            raise FlopsError(f"{path}: family {name!r} names measurement {key!r}, which is not in 'measurements'")
        return float(measurements[key]["value"])

    members = []
    for member_name, spec in family["members"].items():
        unknown = sorted(set(spec) - {"config", "bytes_per_token", "bytes_per_chunk"})
        if unknown:
            raise FlopsError(
                f"{path}: member {member_name!r} of family {name!r} has unknown field(s) {', '.join(unknown)}"
            )
        config_path = path.parent / spec["config"]
        config = load_config(config_path)
        bytes_per_token = measured(spec["bytes_per_token"]) if "bytes_per_token" in spec else None
        bytes_per_chunk = tuple(measured(k) for k in spec["bytes_per_chunk"]) if "bytes_per_chunk" in spec else None
        seq_len = round(seq_bytes / bytes_per_token) if bytes_per_token else seq_bytes
        counted = flops_per_byte(config, seq_len, bytes_per_chunk=bytes_per_chunk, bytes_per_token=bytes_per_token)
        members.append(
            FamilyMember(member_name, config_path, config, seq_len, bytes_per_token, bytes_per_chunk, counted)
        )
    if reference not in {m.name for m in members}:
        raise FlopsError(f"{path}: family {name!r} names reference {reference!r}, which is not a member")
    members.sort(key=lambda m: m.name != reference)
    return Family(name, seq_bytes, members)


def family_names(path: str | Path = FAMILIES_FILE) -> list[str]:
    return list(read_json(Path(path), "families file").get("families", {}))


# --------------------------------------------------------------------------------------------
# Printing and CLI
# --------------------------------------------------------------------------------------------


def human(flops: float) -> str:
    """1.234e9 -> '1.23 G'."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(flops) >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} "


def format_report(report: FlopsReport) -> str:
    total = report.forward_per_sequence
    width = max(len(name) for name in report.forward) + 2
    header = f"{'component':<{width}}" + "".join(f"{op:>11}" for op in OPS) + f"{'total':>11}{'share':>8}"
    lines = [header, "-" * len(header)]
    for name, ops in report.forward.items():
        row_total = sum(ops.values())
        lines.append(
            f"{name:<{width}}"
            + "".join(f"{human(ops[op]):>11}" for op in OPS)
            + f"{human(row_total):>11}{row_total / total:>8.1%}"
        )
    lines.append("-" * len(header))
    lines.append(
        f"forward per sequence {human(total)}FLOP; training (x{TRAINING_MULTIPLIER}) {human(report.training_per_sequence)}FLOP"
    )
    lines.append(
        f"training per byte {human(report.training_per_byte)}FLOP ({report.bytes_per_sequence:g} bytes per sequence)"
    )
    return "\n".join(lines)


def format_family(family: Family) -> str:
    reference = family.members[0].name
    header = (
        f"{'member':<18}{'config':<28}{'seq_len':>8}  {'matched under':<20}{'train FLOP/byte':>16}"
        f"{'vs ' + reference:>16}"
    )
    lines = [
        f"family {family.name}: {family.seq_len_bytes} bytes per sequence, training = 3 x forward",
        header,
        "-" * len(header),
    ]
    for m in family.members:
        lines.append(
            f"{m.name:<18}{m.config_path.name:<28}{m.seq_len:>8}  {m.assumption:<20}"
            f"{human(m.report.training_per_byte) + 'FLOP':>16}{family.ratio(m):>16.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hnet.flops",
        description="Training FLOPs per byte of a model config, or of a compute-matched family.",
    )
    parser.add_argument("config", nargs="?", help="path to a model config JSON")
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="positions per sequence: bytes, or tokens for a token model (default 8192 bytes, or 8192 / bytes-per-token tokens)",
    )
    parser.add_argument(
        "--bytes-per-chunk",
        type=float,
        nargs="+",
        default=None,
        help="measured cumulative bytes per chunk, one per chunking stage",
    )
    parser.add_argument(
        "--bytes-per-token", type=float, default=None, help="bytes per token of a token model's tokenizer"
    )
    parser.add_argument("--family", help="print a family from the families file instead (e.g. tiny, S, M)")
    parser.add_argument("--families-file", default=str(FAMILIES_FILE), help="default: %(default)s")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if (args.config is None) == (args.family is None):
        return report("give either a config path or --family NAME")
    try:
        if args.family is not None:
            family = load_family(args.family, args.families_file)
            if args.json:
                print(
                    json.dumps(
                        {
                            "family": family.name,
                            "seq_len_bytes": family.seq_len_bytes,
                            "members": [
                                {
                                    "name": m.name,
                                    "config": str(m.config_path),
                                    "seq_len": m.seq_len,
                                    "matched_under": m.assumption,
                                    "training_per_byte": m.report.training_per_byte,
                                    "ratio_to_reference": family.ratio(m),
                                }
                                for m in family.members
                            ],
                        }
                    )
                )
            else:
                print(format_family(family))
            return 0
        config = load_config(args.config)
        seq_len = args.seq_len
        if seq_len is None:
            seq_len = round(8192 / args.bytes_per_token) if args.bytes_per_token and not config.is_byte_model else 8192
        counted = flops_per_byte(
            config, seq_len, bytes_per_chunk=args.bytes_per_chunk, bytes_per_token=args.bytes_per_token
        )
    except (ConfigError, FlopsError) as err:
        return report(err)
    except (KeyError, TypeError) as err:
        return report(f"{args.families_file}: malformed families file ({type(err).__name__}: {err})")
    if args.json:
        print(json.dumps({"config": args.config, **counted.to_dict()}))
    else:
        lengths = ", ".join(f"{length:.1f}" for length in counted.stage_lengths)
        print(f"{args.config}: seq_len {counted.seq_len:g}, stage lengths {lengths}")
        print(format_report(counted))
    return 0


if __name__ == "__main__":
    sys.exit(main())
