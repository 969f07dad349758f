"""Export a training run's parameters for inference, in our format or in the reference's.

    python -m hnet.inference.export --checkpoint RUN_DIR --out DIR [--step N] [--dtype bf16]
    python -m hnet.inference.export --checkpoint RUN_DIR --out DIR --format reference   # goombalab/hnet's names

An export folder holds only what inference needs:

    DIR/export.json      {"format": "hnet-export", "format_version": 1, "dtype", "source", "step"}
    DIR/config.json      the model config (the same fields as configs/*.json)
    DIR/params/          an orbax checkpoint of the parameter tree (no optimizer state)
    DIR/tokenizer.json   the run's BPE tokenizer (token models only)

hnet.inference.load.load_model reads either kind of folder, so generate.py and eval.py accept
both. `python -m hnet.inference.convert` writes the same folder from a published reference
checkpoint; `--format reference` writes model.safetensors and config.json the other way
(export_reference).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from hnet.config import ModelConfig
from hnet.errors import HNetError, LoadError, report
from hnet.inference.load import EXPORT_FORMAT, EXPORT_VERSION, load_model
from hnet.inference.reference import parameter_table, reference_config, to_reference

EXPORT_DTYPES = {"fp32": jnp.float32, "float32": jnp.float32, "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16}


def flat_param_paths(state) -> dict[str, tuple]:
    """{dotted parameter path ("backbone.encoder.blocks.0.norm1.weight"): path tuple} of an nnx.State."""
    return {".".join(map(str, path)): path for path in nnx.traversals.flatten_mapping(state.to_pure_dict())}


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
    parser = argparse.ArgumentParser(
        prog="python -m hnet.inference.export", description="Export a training checkpoint's parameters for inference."
    )
    parser.add_argument("--checkpoint", required=True, help="training run folder (or an export folder)")
    parser.add_argument("--out", required=True, help="export folder to create (must not exist)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    parser.add_argument("--dtype", default="fp32", help="parameter dtype: fp32 (default) or bf16")
    parser.add_argument(
        "--format",
        choices=("hnet", "reference"),
        default="hnet",
        help="hnet: an export folder (default); reference: model.safetensors + config.json "
        "in the names and layouts of goombalab/hnet",
    )
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
