"""Load a model for inference from a training run folder or an export folder.

    loaded = load_model("runs/x")          # or an export folder (python -m hnet.inference.export)
    loaded.model(input_ids).logits         # a LanguageModel with its parameters
    loaded.config, loaded.step, loaded.tokenizer

A run's checkpoints are verified against their manifests (hnet.io.checkpoint) and the newest usable
one is loaded. Loading needs only the model code and the folder: no run config, optimizer or data
pipeline. hnet.inference.hub.load_model (hnet.load_model) also takes hf://OWNER/NAME: a published
checkpoint, downloaded and converted once. The export folder's format (EXPORT_FORMAT) is defined here, where it is read;
hnet.inference.export writes it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from hnet.config import ModelConfig, config_from_dict
from hnet.errors import CheckpointError, ConfigError, DataError, LoadError
from hnet.io.checkpoint import restore_newest
from hnet.io.run_dir import RunDir
from hnet.io.tokenizer import BPETokenizer
from hnet.model import LanguageModel, build_model

EXPORT_FORMAT = "hnet-export"
EXPORT_VERSION = 1
# Parameters added after run checkpoints and exports were first written (path suffixes). A folder
# without one loads with zeros, which is what the model computed before it existed.
ADDED_PARAMS = ("residual_proj.bias",)


@dataclass
class LoadedModel:
    """A model ready for inference and where it came from."""

    model: LanguageModel
    config: ModelConfig
    kind: str  # "run" or "export"
    path: Path
    step: int | None  # training step of the parameters
    tokenizer_path: Path | None  # tokenizer.json for token models, else None
    tokenizer: BPETokenizer | None  # that tokenizer, loaded


def abstract_params(config: ModelConfig):
    """(graphdef, parameter State of ShapeDtypeStructs) without allocating the parameters."""
    abstract_model = nnx.eval_shape(lambda: build_model(config))
    graphdef, params = nnx.split(abstract_model, nnx.Param)
    return graphdef, jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)


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
    one is loaded; a given `step` that is not usable is a LoadError. (hnet.load_model, i.e.
    hnet.inference.hub.load_model, also takes hf://OWNER/NAME.)
    """
    path = Path(path)
    if not path.is_dir():
        raise LoadError(f"{path} does not exist or is not a folder")
    is_export = (path / "export.json").is_file()
    if is_export:
        info = _read_json(path / "export.json", "export info")
        if info.get("format") != EXPORT_FORMAT or info.get("format_version") != EXPORT_VERSION:
            raise LoadError(
                f"{path} is not a {EXPORT_FORMAT} v{EXPORT_VERSION} folder "
                f"(found format {info.get('format')!r} v{info.get('format_version')!r})"
            )
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
    return LoadedModel(
        model=nnx.merge(graphdef, params),
        config=config,
        kind="export" if is_export else "run",
        path=path,
        step=step,
        tokenizer_path=tokenizer_path if tokenizer else None,
        tokenizer=tokenizer,
    )
