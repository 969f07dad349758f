"""Inference artefacts: export a training run's parameters, and load a model from a run or an export.

    python -m hnet.inference.export --checkpoint RUN_DIR --out DIR [--step N] [--dtype bf16]
    python -m hnet.inference.export --checkpoint RUN_DIR --out DIR --format reference   # goombalab/hnet's names

An export folder holds only what inference needs:

    DIR/export.json      {"format": "hnet-export", "format_version": 1, "dtype", "source", "step"}
    DIR/config.json      the model config (the same fields as configs/*.json)
    DIR/params/          an orbax checkpoint of the parameter tree (no optimizer state)
    DIR/tokenizer.json   the run's BPE tokenizer (token models only)

`load_model` reads either kind of folder, so generate.py and eval.py accept both. Loading an
export needs only the model code: no run config, optimizer or data pipeline. `python -m
hnet.inference.convert` writes the same folder from a published reference checkpoint; `--format reference`
writes model.safetensors and config.json the other way (export_reference).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from hnet.config import ModelConfig, config_from_dict
from hnet.errors import CheckpointError, ConfigError, DataError, HNetError, LoadError, report
from hnet.inference.reference import parameter_table, reference_config, to_reference
from hnet.io.checkpoint import restore_newest
from hnet.io.run_dir import RunDir
from hnet.io.tokenizer import BPETokenizer
from hnet.model import LanguageModel, build_model

EXPORT_FORMAT = "hnet-export"
EXPORT_VERSION = 1
EXPORT_DTYPES = {"fp32": jnp.float32, "float32": jnp.float32, "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16}
# Parameters added after run checkpoints and exports were first written (path suffixes). A folder
# without one loads with zeros, which is what the model computed before it existed.
ADDED_PARAMS = ("residual_proj.bias",)


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


def flat_param_paths(state) -> dict[str, tuple]:
    """{dotted parameter path ("backbone.encoder.blocks.0.norm1.weight"): path tuple} of an nnx.State."""
    return {".".join(map(str, path)): path for path in nnx.traversals.flatten_mapping(state.to_pure_dict())}


def _restore_params(directory: Path, abstract, *, partial: bool):
    """Read a parameter tree shaped like `abstract` from an orbax pytree folder: the "params" of a
    training state (partial: the folder holds more) or exactly the parameters (an export).
    Parameters in ADDED_PARAMS that the folder lacks are zeros."""
    item = {"params": abstract} if partial else abstract
    # Onto this process's first device, whatever mesh the checkpoint was saved from.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    restore_args = jax.tree_util.tree_map(lambda x: ocp.ArrayRestoreArgs(dtype=x.dtype, sharding=device), item)
    checkpointer = ocp.PyTreeCheckpointer()
    # partial_restore: leaves the folder lacks come back as their ShapeDtypeStructs (filled below).
    restored = checkpointer.restore(
        directory.absolute(),
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
    )
    params = restored["params"] if partial else restored
    flat = nnx.traversals.flatten_mapping(params.to_pure_dict())
    absent = {path: leaf for path, leaf in flat.items() if isinstance(leaf, jax.ShapeDtypeStruct)}
    for path, leaf in absent.items():
        name = ".".join(map(str, path))
        if not name.endswith(ADDED_PARAMS):
            raise ValueError(f"the folder has no parameter {name}")
        flat[path] = jnp.zeros(leaf.shape, leaf.dtype)
    if not partial:  # an export holds the model's parameters and nothing else
        on_disk = len(nnx.traversals.flatten_mapping(checkpointer.metadata(directory.absolute()).item_metadata.tree))
        if on_disk != len(flat) - len(absent):
            raise ValueError(f"the folder holds {on_disk} parameters, the config's model {len(flat)}")
    nnx.replace_by_pure_dict(params, nnx.traversals.unflatten_mapping(flat))
    return params


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

    A run's checkpoints are verified against their manifests (hnet.io.checkpoint): a damaged or
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


def export_dtype(dtype: str):
    """--dtype name -> the jnp dtype parameters are stored in; LoadError for another name."""
    if dtype not in EXPORT_DTYPES:
        raise LoadError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    return EXPORT_DTYPES[dtype]


def refuse_existing(out: Path) -> None:
    if out.exists():
        raise LoadError(f"{out} already exists; choose another --out")


@contextlib.contextmanager
def staged_folder(out: str | Path):
    """Yields DIR.partial to write into; renamed to `out` when the block completes, removed when it
    fails, so `out` appears only complete. Refuses an existing `out`."""
    out = Path(out)
    refuse_existing(out)
    staging = out.with_name(out.name + ".partial")
    if staging.exists():  # left by an earlier, interrupted attempt
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    staging.rename(out)


def write_export(out: str | Path, params, config: ModelConfig, info: dict, tokenizer_path: Path | None = None) -> Path:
    """Write an export folder: params (an nnx.State of parameters, stored as they are), config,
    export.json ({"format", "format_version"} + info) and the tokenizer if any."""
    with staged_folder(out) as staging:
        ocp.PyTreeCheckpointer().save((staging / "params").absolute(), params)
        (staging / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, staging / "tokenizer.json")
        info = {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, **info}
        (staging / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    return Path(out)


def export(checkpoint: str | Path, out: str | Path, *, step: int | None = None, dtype: str = "fp32") -> Path:
    """Write an export folder for a run's checkpoint. Refuses to overwrite an existing `out`."""
    stored = export_dtype(dtype)
    refuse_existing(Path(out))
    loaded = load_model(checkpoint, step)
    _, params = nnx.split(loaded.model, nnx.Param)
    params = jax.tree_util.tree_map(lambda x: x.astype(stored), params)
    info = {"dtype": jnp.dtype(stored).name, "source": str(Path(checkpoint).absolute()), "step": loaded.step}
    return write_export(out, params, loaded.config, info, loaded.tokenizer_path)


def export_reference(checkpoint: str | Path, out: str | Path, *, step: int | None = None, dtype: str = "fp32") -> Path:
    """Write a run's (or an export's) parameters as the reference's model.safetensors and config.json.

    model.safetensors holds the state_dict the reference's HNetForCausalLM.load_state_dict takes
    (its names and layouts, in `dtype`); config.json holds only the reference's config fields.
    """
    from safetensors.numpy import save_file

    stored = export_dtype(dtype)
    refuse_existing(Path(out))
    loaded = load_model(checkpoint, step)
    config_json = reference_config(loaded.config)  # before writing anything: can the reference express it?
    _, params = nnx.split(loaded.model, nnx.Param)
    values = nnx.traversals.flatten_mapping(params.to_pure_dict())
    paths = flat_param_paths(params)
    tensors = {}
    for entry in parameter_table(loaded.config):
        array = np.asarray(jnp.asarray(values[paths[entry.path]]).astype(stored))
        tensors[entry.key] = to_reference(array, entry.layout)
    with staged_folder(out) as staging:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config_json, indent=4) + "\n")
    return Path(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Export a training checkpoint's parameters for inference.")
    parser.add_argument("--checkpoint", required=True, help="training run folder (or an export folder)")
    parser.add_argument("--out", required=True, help="export folder to create (must not exist)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    parser.add_argument("--dtype", default="fp32", help="parameter dtype: fp32 (default) or bf16")
    parser.add_argument("--format", choices=("hnet", "reference"), default="hnet",
                        help="hnet: an export folder (default); reference: model.safetensors + config.json "
                             "in the names and layouts of goombalab/hnet")
    args = parser.parse_args(argv)
    try:
        if args.format == "reference":
            out = export_reference(args.checkpoint, args.out, step=args.step, dtype=args.dtype)
        else:
            out = export(args.checkpoint, args.out, step=args.step, dtype=args.dtype)
    except HNetError as err:
        return report(err)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
