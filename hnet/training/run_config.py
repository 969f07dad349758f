"""Run configuration for train.py: model, data, optimisation and loop settings, all explicit.

A run config is JSON with these sections; every key is known (unknown keys are errors):

    {
      "model": {"config": "hnet_1stage_tiny.json", "dtype": "float32"},   # base file + overrides
      "data":  {"corpus": "default", "tokenizer": null},                  # or a prepared folder; BPE
      "train": {"steps": 600, "batch_size": 8, "seq_len": 512, "lr": 2e-3, ...},
      "mesh":  {"data": -1, "fsdp": -1, "tensor": 1}                      # optional: device layout
    }

`model` may also be a path string, or a full inline model config. Paths are looked up as given,
then next to the run config, then in the repository's configs/ folder. Command-line overrides
(`--set train.lr=3e-4 --set model.dtype=bfloat16`) take JSON values (or bare strings) and reach
any depth: `--set model.attn_cfg.num_heads=[4,4]`, `--set model.ssm_cfg.d_state=64`. Every key
of the dotted path must be a field at its level; an unknown one is an error naming the path.

`data.tokenizer` chooses what the model reads: null = bytes (vocab_size 256); {"vocab_size": V}
= train a byte-level BPE tokenizer of V ids on the training split at the start of the run; or a
path to a tokenizer.json (made by hnet.io.tokenizer). The model's vocab_size must equal V. In a token
run `train.seq_len` counts tokens; bytes_seen, bytes/s and bits per byte still count text bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hnet.config import ModelConfig, check_fields, config_from_dict, read_json
from hnet.errors import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_RUN = CONFIGS_DIR / "run_tiny.json"
SCHEDULES = ("wsd", "cosine", "constant")
REMAT_CHOICES = ("auto", "none", "block", "dots")  # see hnet.layers.isotropic.REMAT_POLICIES
SLOT_RESIDUAL_CHOICES = ("auto", "keep", "recompute")  # see hnet.slots.ladder_residuals
SECTIONS = ("model", "data", "train", "mesh")


@dataclass(frozen=True)
class DataConfig:
    corpus: str = "default"  # "default" (Python stdlib sources) or a prepared corpus folder
    train_split: str = "train"
    eval_split: str = "validation"
    tokenizer: None | str | dict = None  # None: bytes; {"vocab_size": V}: train BPE; or a tokenizer.json path


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 400
    batch_size: int = 8  # global sequences per optimizer step
    seq_len: int = 512  # elements per sequence: bytes, or tokens in a token run
    grad_accum: int = 1  # the batch is split into this many micro-batches
    seed: int = 0
    # Optimizer: AdamW with global-norm clipping.
    lr: float = 2e-3
    schedule: str = "wsd"  # warmup-stable-decay, cosine, or constant (after warmup)
    warmup_frac: float = 0.1
    decay_frac: float = 0.2  # wsd: final fraction of steps decaying linearly to min_lr
    min_lr_frac: float = 0.0  # final lr as a fraction of lr
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    stage_lr_multipliers: tuple[float, ...] | None = None  # per stage, outermost first (depth + 1)
    ratio_loss_weight: float = 0.03  # alpha in CE + alpha * sum of ratio losses
    # Rematerialisation of the blocks in the backward pass: none, block (keep only each block's
    # input and attention output), dots (keep matmul outputs too), or auto (by model size and
    # sequence length, see hnet.training.train_step.remat_policy).
    remat: str = "auto"
    # The backward pass of the inner stacks on the chunk-slot ladder (hnet.slots): keep the taken
    # branch's residuals, recompute its forward, or auto (recompute on CPU, keep on GPU and TPU,
    # see hnet.training.train_step.slot_residual_mode).
    slot_residuals: str = "auto"
    # Where compiled programs are kept so that a restart does not compile again: "run"
    # (RUN_DIR/compile_cache), "none", a folder shared by runs, or auto (JAX_COMPILATION_CACHE_DIR
    # when set, else "run"; see hnet.training.compile_cache).
    compile_cache: str = "auto"
    # Loop.
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    max_nonfinite_steps: int = 5  # stop after this many skipped updates in a row


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes (hnet.parallel.sharding); -1 = the rest of the devices.

    data and fsdp both -1 (the default): all devices go to data, or to fsdp for large models
    (hnet.parallel.sharding.AUTO_FSDP_MIN_PARAMS). E.g. mesh.fsdp=8 on 8 devices is pure FSDP.
    """

    data: int = -1  # data parallel: parameters replicated, batch split
    fsdp: int = -1  # fully sharded data parallel: batch and parameters split
    tensor: int = 1  # tensor parallel: heads, MLP hidden and vocabulary split


@dataclass(frozen=True)
class RunConfig:
    model: dict  # the resolved model config dictionary
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    @functools.cached_property
    def model_config(self) -> ModelConfig:
        """`model` parsed into a ModelConfig, once (the dictionary stays what is saved and compared)."""
        return config_from_dict(self.model)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
            "mesh": dataclasses.asdict(self.mesh),
        }


def _find(path: str, base: Path | None, what: str = "model config") -> Path:
    candidates = [Path(path).expanduser()]
    if base is not None:
        candidates.append(base / path)
    candidates.append(CONFIGS_DIR / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{what} {path!r} not found (looked in ., {base or '-'}, {CONFIGS_DIR})")


def _resolve_model(value, base: Path | None) -> dict:
    """A path, {"config": path, **overrides}, or an inline dict -> a model config dictionary."""
    if isinstance(value, str):
        value = {"config": value}
    if not isinstance(value, dict):
        raise ConfigError(f"model: expected a config path or an object, got {value!r}")
    value = dict(value)
    if "config" in value:
        value = {**read_json(_find(value.pop("config"), base)), **value}
    return value


def _section(cls, data, name):
    check_fields(cls, data, name)
    defaults = cls()
    for key, value in data.items():
        expected = type(getattr(defaults, key))
        if expected in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{name}.{key}: expected a number, got {value!r}")
        if expected is int and not float(value).is_integer():
            raise ConfigError(f"{name}.{key}: expected an integer, got {value!r}")
        if expected is str and not isinstance(value, str):
            raise ConfigError(f"{name}.{key}: expected a string, got {value!r}")
    values = {k: (int(v) if type(getattr(defaults, k)) is int else v) for k, v in data.items()}
    if values.get("stage_lr_multipliers") is not None:
        values["stage_lr_multipliers"] = tuple(values["stage_lr_multipliers"])
    return cls(**values)


def parse_override(text: str) -> tuple[list[str], Any]:
    """ "train.lr=3e-4" -> (["train", "lr"], 0.0003); "model.ssm_cfg.d_state=64" -> (["model",
    "ssm_cfg", "d_state"], 64). Values are JSON, else plain strings."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    parts = key.strip().split(".")
    if parts == ["model"]:  # model=PATH or model={"config": PATH, ...}: replaces the whole model section
        return parts, value
    if len(parts) < 2 or parts[0] not in SECTIONS or not all(parts):
        raise ConfigError(
            f"--set {text!r}: key must be model.X, data.X, train.X or mesh.X (X may be dotted: model.ssm_cfg.d_state)"
        )
    return parts, value


def _field_schema(schema, key: str):
    """The dataclass a field holds (ModelConfig.ssm_cfg -> SSMConfig), or None for a plain value."""
    hint = typing.get_type_hints(schema).get(key)
    return hint if dataclasses.is_dataclass(hint) else None


def apply_override(sections: dict[str, dict], path: list[str], value, text: str) -> None:
    """Set sections[path[0]][path[1]]...[path[-1]] = value (an override at any depth).

    Each key must be a field of its level (the section's dataclass, then ModelConfig.ssm_cfg's
    SSMConfig, ...); a missing nested object is created, and nested objects are copied before
    they change. Raises ConfigError naming the full dotted path of an unknown key.
    """
    section, *keys = path
    target, schema = (
        sections[section],
        {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "mesh": MeshConfig}[section],
    )
    for depth, key in enumerate(keys):
        dotted = ".".join([section, *keys[: depth + 1]])
        if schema is None:
            raise ConfigError(f"--set {text!r}: {dotted.rsplit('.', 1)[0]} is a value, not an object with keys")
        known = sorted(f.name for f in dataclasses.fields(schema))
        if key not in known:
            raise ConfigError(f"--set {text!r}: unknown key {dotted} (known: {', '.join(known)})")
        if depth == len(keys) - 1:
            target[key] = value
            return
        schema = _field_schema(schema, key)
        if schema is not None:
            child = target.get(key) or {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {dotted} is {child!r}, not an object")
            target[key] = dict(child)
            target = target[key]


def add_override_argument(parser, example: str = "train.lr=3e-4") -> None:
    """The --set SECTION.KEY=VALUE option of every command that loads a run config (argparse);
    the values land in `args.overrides`, for load_run_config."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=f"override a run-config value, e.g. {example} (repeatable)",
    )


def run_config_from_dict(data: dict, overrides: list[str] = (), base: Path | None = None) -> RunConfig:
    """Resolve, apply overrides, validate. Raises ConfigError with a one-line message."""
    if not isinstance(data, dict):
        raise ConfigError("run config: expected a JSON object")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"run config: unknown section(s) {', '.join(unknown)} (known: {', '.join(sorted(SECTIONS))})")
    if "model" not in data:
        raise ConfigError("run config: missing the 'model' section")
    sections = {
        "model": _resolve_model(data["model"], base),
        "data": dict(data.get("data", {})),
        "train": dict(data.get("train", {})),
        "mesh": dict(data.get("mesh", {})),
    }
    for text in overrides:
        path, value = parse_override(text)
        if path == ["model"]:
            sections["model"] = _resolve_model(value, base)
        else:
            apply_override(sections, path, value, text)
    model_config = config_from_dict(sections["model"])
    tokenizer = sections["data"].get("tokenizer")
    if isinstance(tokenizer, str) and not Path(tokenizer).is_absolute():  # saved runs keep working from any folder
        sections["data"]["tokenizer"] = str(_find(tokenizer, base, "data.tokenizer").resolve())
    run = RunConfig(
        model=json.loads(json.dumps(model_config.to_dict())),  # plain JSON types, as saved in checkpoints
        data=_section(DataConfig, sections["data"], "data"),
        train=_section(TrainConfig, sections["train"], "train"),
        mesh=_section(MeshConfig, sections["mesh"], "mesh"),
    )
    validate_run(run, model_config)
    return run


def validate_run(run: RunConfig, model_config: ModelConfig) -> None:
    for name, size in dataclasses.asdict(run.mesh).items():  # fitting the devices is checked in hnet.parallel.sharding
        if size != -1 and size < 1:
            raise ConfigError(f"mesh.{name}: expected a positive size or -1 (the rest of the devices), got {size}")
    t = run.train
    for name in (
        "steps",
        "batch_size",
        "seq_len",
        "grad_accum",
        "log_every",
        "eval_every",
        "eval_batches",
        "checkpoint_every",
        "keep_checkpoints",
        "max_nonfinite_steps",
    ):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}: must be >= 1, got {getattr(t, name)}")
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.grad_accum {t.grad_accum} must divide train.batch_size {t.batch_size}")
    if t.remat not in REMAT_CHOICES:
        raise ConfigError(f"train.remat: expected one of {REMAT_CHOICES}, got {t.remat!r}")
    if t.slot_residuals not in SLOT_RESIDUAL_CHOICES:
        raise ConfigError(f"train.slot_residuals: expected one of {SLOT_RESIDUAL_CHOICES}, got {t.slot_residuals!r}")
    if not t.compile_cache.strip():
        raise ConfigError(f'train.compile_cache: expected "auto", "run", "none" or a folder, got {t.compile_cache!r}')
    if t.schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule: expected one of {SCHEDULES}, got {t.schedule!r}")
    if not (0 <= t.warmup_frac < 1 and 0 <= t.decay_frac <= 1 and t.warmup_frac + t.decay_frac <= 1):
        raise ConfigError("train.warmup_frac/decay_frac: need 0 <= warmup, decay and warmup + decay <= 1")
    if t.lr <= 0 or t.grad_clip <= 0 or t.weight_decay < 0 or t.ratio_loss_weight < 0:
        raise ConfigError("train.lr and train.grad_clip must be > 0; weight_decay and ratio_loss_weight >= 0")
    if t.stage_lr_multipliers is not None and len(t.stage_lr_multipliers) != model_config.depth + 1:
        raise ConfigError(
            f"train.stage_lr_multipliers: expected {model_config.depth + 1} entries "
            f"(one per stage), got {len(t.stage_lr_multipliers)}"
        )
    validate_tokenizer_spec(run.data.tokenizer, model_config)


def validate_tokenizer_spec(spec, model_config: ModelConfig) -> None:
    """data.tokenizer: None, {"vocab_size": V} matching the model, or a path (checked when loaded)."""
    vocab = model_config.vocab_size
    if spec is None:
        if not model_config.is_byte_model:
            raise ConfigError(
                f"model vocab_size is {vocab} but data.tokenizer is null (bytes need 256); "
                f'set data.tokenizer, e.g. {{"vocab_size": {vocab}}}'
            )
    elif isinstance(spec, dict):
        if set(spec) != {"vocab_size"}:
            raise ConfigError(f'data.tokenizer: expected {{"vocab_size": V}}, got keys {sorted(spec)}')
        size = spec["vocab_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 257:
            raise ConfigError(f"data.tokenizer.vocab_size: expected an integer >= 257 (256 bytes + BOS), got {size!r}")
        if size != vocab:
            raise ConfigError(f"data.tokenizer.vocab_size {size} differs from the model's vocab_size {vocab}")
    elif not isinstance(spec, str):
        raise ConfigError(f'data.tokenizer: expected null, {{"vocab_size": V}} or a tokenizer.json path, got {spec!r}')
    elif model_config.is_hierarchical:
        raise ConfigError("data.tokenizer: an H-Net reads bytes; tokenizers are for flat Transformer baselines")


def load_run_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Load a run config file (default: configs/run_tiny.json) and apply --set overrides."""
    path = Path(path) if path is not None else DEFAULT_RUN
    return run_config_from_dict(read_json(path, "run config"), overrides, base=path.parent)
