"""Inference artefacts: export a training run's parameters, and load a model from a run or an export.

    python -m hnet.export --checkpoint RUN_DIR --out DIR [--step N] [--dtype bf16]

An export folder holds only what inference needs:

    DIR/export.json      {"format": "hnet-export", "format_version": 1, "dtype", "source", "step"}
    DIR/config.json      the model config (the same fields as configs/*.json)
    DIR/params/          an orbax checkpoint of the parameter tree (no optimizer state)
    DIR/tokenizer.json   the run's BPE tokenizer (token models only)

`load_model` reads either kind of folder, so generate.py and eval.py accept both. Loading an
export needs only the model code: no run config, optimizer or data pipeline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from hnet.checkpoint import restore_newest
from hnet.config import ModelConfig, config_from_dict
from hnet.errors import CheckpointError, ConfigError, DataError, LoadError
from hnet.model import LanguageModel, build_model
from hnet.run_dir import RunDir
from hnet.tokenizer import BPETokenizer

EXPORT_FORMAT = "hnet-export"
EXPORT_VERSION = 1
EXPORT_DTYPES = {"fp32": jnp.float32, "float32": jnp.float32, "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16}


@dataclass
class LoadedModel:
    """A model ready for inference and where it came from."""

    model: LanguageModel
    config: ModelConfig
    kind: str                 # "run" or "export"
    path: Path
    step: int | None          # training step of the parameters
    tokenizer_path: Path | None   # tokenizer.json for token models, else None
    tokenizer: BPETokenizer | None  # that tokenizer, loaded


def abstract_params(config: ModelConfig):
    """(graphdef, parameter State of ShapeDtypeStructs) without allocating the parameters."""
    abstract_model = nnx.eval_shape(lambda: build_model(config))
    graphdef, params = nnx.split(abstract_model, nnx.Param)
    return graphdef, jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)


def _restore_params(directory: Path, abstract, *, partial: bool):
    """Read a parameter tree shaped like `abstract` from an orbax pytree folder."""
    item = {"params": abstract} if partial else abstract
    # Onto this process's first device, whatever mesh the checkpoint was saved from.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    restore_args = jax.tree_util.tree_map(lambda x: ocp.ArrayRestoreArgs(dtype=x.dtype, sharding=device), item)
    checkpointer = ocp.PyTreeCheckpointer()
    restored = checkpointer.restore(
        directory.absolute(),
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=partial),
    )
    return restored["params"] if partial else restored


def _restore_run_params(run_dir: Path, abstract, step: int | None):
    """-> (parameters, step) of a run's newest usable checkpoint, or of `step`; warnings on stderr."""
    def restore(candidate: int):
        return _restore_params(RunDir(run_dir).checkpoint(candidate) / "state", abstract, partial=True)

    try:
        restored = restore_newest(run_dir, restore, step=step)
    except CheckpointError as err:
        raise LoadError(str(err)) from None
    for status in restored.skipped:
        print(f"warning: {status.describe()}; skipped, using step {restored.step}", file=sys.stderr)
    if restored.status.state == "unverified":
        print(f"warning: {restored.status.describe()}; loading it anyway", file=sys.stderr)
    return restored.value, restored.step


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LoadError(f"{path.parent} is not a run or export folder (no {path.name})") from None
    except (OSError, json.JSONDecodeError) as err:
        raise LoadError(f"cannot read {what} {path}: {err}") from None


def load_model(path: str | Path, step: int | None = None) -> LoadedModel:
    """A model from a training run folder (its newest usable checkpoint, or `step`) or an export folder.

    A run's checkpoints are verified against their manifests (hnet.checkpoint): a damaged or
    incomplete newer checkpoint is skipped with one warning line on stderr, and the newest usable
    one is loaded; a given `step` that is not usable is a LoadError.
    """
    path = Path(path)
    if not path.is_dir():
        raise LoadError(f"{path} does not exist or is not a folder")
    is_export = (path / "export.json").is_file()
    if is_export:
        info = _read_json(path / "export.json", "export info")
        if info.get("format") != EXPORT_FORMAT or info.get("format_version") != EXPORT_VERSION:
            raise LoadError(f"{path} is not a {EXPORT_FORMAT} v{EXPORT_VERSION} folder "
                            f"(found format {info.get('format')!r} v{info.get('format_version')!r})")
        model_dict, step = _read_json(path / "config.json", "model config"), info.get("step")
    else:
        model_dict = _read_json(RunDir(path).config, "run config").get("model")
        if not RunDir(path).checkpoint_steps():
            raise LoadError(f"{path} has no complete checkpoint")
    try:
        config = config_from_dict(model_dict)
    except ConfigError as err:
        raise LoadError(f"{path}: bad model config: {err}") from None
    graphdef, abstract = abstract_params(config)
    if is_export:
        try:
            params = _restore_params(path / "params", abstract, partial=False)
        except Exception as err:  # orbax raises many types; a shape mismatch or missing file lands here
            raise LoadError(f"cannot read parameters from {path / 'params'}: {str(err).splitlines()[0]}") from None
    else:
        params, step = _restore_run_params(path, abstract, step)
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)  # bf16 exports compute like training
    tokenizer_path = path / "tokenizer.json"  # RunDir(path).tokenizer, and the same name in an export
    tokenizer = None
    if tokenizer_path.is_file():
        try:
            tokenizer = BPETokenizer.load(tokenizer_path)
        except DataError as err:
            raise LoadError(str(err)) from None
    elif not config.is_byte_model:
        raise LoadError(f"{path} holds a token model ({config.vocab_size} ids) but no tokenizer.json")
    return LoadedModel(model=nnx.merge(graphdef, params), config=config, kind="export" if is_export else "run",
                       path=path, step=step, tokenizer_path=tokenizer_path if tokenizer else None, tokenizer=tokenizer)


def export(checkpoint: str | Path, out: str | Path, *, step: int | None = None, dtype: str = "fp32") -> Path:
    """Write an export folder for a run's checkpoint. Refuses to overwrite an existing `out`."""
    out = Path(out)
    if dtype not in EXPORT_DTYPES:
        raise LoadError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    if out.exists():
        raise LoadError(f"{out} already exists; choose another --out")
    loaded = load_model(checkpoint, step)
    _, params = nnx.split(loaded.model, nnx.Param)
    params = jax.tree_util.tree_map(lambda x: x.astype(EXPORT_DTYPES[dtype]), params)
    staging = out.with_name(out.name + ".partial")  # written aside, renamed into place when complete
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    ocp.PyTreeCheckpointer().save((staging / "params").absolute(), params)
    (staging / "config.json").write_text(json.dumps(loaded.config.to_dict(), indent=2) + "\n")
    if loaded.tokenizer_path is not None:
        shutil.copyfile(loaded.tokenizer_path, staging / "tokenizer.json")
    info = {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "dtype": jnp.dtype(EXPORT_DTYPES[dtype]).name,
            "source": str(Path(checkpoint).absolute()), "step": loaded.step}
    (staging / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    staging.rename(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Export a training checkpoint's parameters for inference.")
    parser.add_argument("--checkpoint", required=True, help="training run folder")
    parser.add_argument("--out", required=True, help="export folder to create (must not exist)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    parser.add_argument("--dtype", default="fp32", help="parameter dtype: fp32 (default) or bf16")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, step=args.step, dtype=args.dtype)
    except LoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
