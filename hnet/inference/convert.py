"""Use the published H-Net checkpoints: convert a reference state_dict into an export folder, and
write ours back in the reference's names.

    python -m hnet.inference.convert --checkpoint hnet_2stage_XL.pt --config configs/hnet_2stage_XL.json \\
        --out exports/hnet_2stage_XL [--dtype float32|bfloat16]
    python -m hnet.inference.export --checkpoint RUN_OR_EXPORT --out DIR --format reference   # the other way

The checkpoint is a state_dict of the reference HNetForCausalLM (goombalab/hnet): a .safetensors
file (read with the `safetensors` package, numpy only) or a .pt/.bin file written by torch.save
(read with torch, the optional extra `pip install 'hnet-jax[torch]'`). The config is the
reference's JSON config (configs/hnet_*.json load unchanged). The result is an export folder as
hnet.inference.export writes it, so generate.py, eval.py and hnet.inference.load.load_model use it as they are; its
export.json records the source file's name and sha256. Unless the config sets capacity_slack, the
converted model uses the exact capacity setting (no boundary is ever dropped), as the reference.

The conversion is strict (hnet.inference.reference.check_file_keys): every tensor of the file is used once,
every parameter of the model is filled, every shape matches; otherwise one error line names the
first missing, unexpected and mismatched keys, and nothing is written. The folder is written as
DIR.partial and renamed when complete; an existing DIR is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hnet import config as config_lib
from hnet.config import ModelConfig
from hnet.errors import ConvertError, HNetError, report
from hnet.inference.export import export_dtype, flat_param_paths, refuse_existing, write_export
from hnet.inference.load import abstract_params
from hnet.inference.reference import check_file_keys, check_model_covered, from_reference, parameter_table

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Where training scripts commonly nest a state_dict inside what they save.
NESTED_STATE_KEYS = ("state_dict", "model", "model_state_dict", "module")
# Key prefixes that wrappers add to every key (DistributedDataParallel, torch.compile).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SOURCE_DESCRIPTION = "goombalab/hnet HNetForCausalLM state_dict"


class StateDictFile:
    """The tensors of a checkpoint file, each read when asked for.

    shapes: {key: shape} of every tensor, keys as the reference names them (wrapper prefixes
    removed). read(key) -> np.ndarray of a floating dtype (float32, bfloat16, ...).
    """

    def __init__(self, shapes: dict[str, tuple], read):
        self.shapes, self._read = shapes, read

    def read(self, key: str) -> np.ndarray:
        return self._read(key)


def _strip_wrapper_prefix(keys) -> dict[str, str]:
    """{reference key: key in the file}: a prefix every key carries (WRAPPER_PREFIXES) removed."""
    keys = list(keys)
    for prefix in WRAPPER_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            return {k[len(prefix) :]: k for k in keys}
    return {k: k for k in keys}


def read_safetensors(path: Path) -> StateDictFile:
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="numpy")  # bfloat16 arrives as ml_dtypes.bfloat16
        names = _strip_wrapper_prefix(handle.keys())
        shapes = {key: tuple(handle.get_slice(name).get_shape()) for key, name in names.items()}
    except (SafetensorError, OSError) as err:
        raise ConvertError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    return StateDictFile(shapes, lambda key: handle.get_tensor(names[key]))


def _stub_class(name: str) -> type:
    """An inert stand-in for a class a .pt file pickles besides tensors (the published files hold
    omegaconf containers): it takes whatever the pickle gives it and keeps nothing. torch's
    weights-only unpickler then reads the file without importing, or running, anything else."""

    class Stub:
        def __new__(cls, *args, **kwargs):
            return object.__new__(cls)

        def __init__(self, *args, **kwargs):
            pass

        def __setstate__(self, state):
            pass

        def __setitem__(self, key, value):
            pass

        def append(self, value):
            pass

        def extend(self, values):
            pass

    Stub.__name__ = Stub.__qualname__ = name.rsplit(".", 1)[-1]
    return Stub


def _find_state_dict(loaded, is_tensor) -> Mapping:
    """The mapping of names to tensors inside what torch.save stored: the object itself, or one
    nested under a NESTED_STATE_KEYS key (a few levels deep)."""
    for _ in range(3):
        if not isinstance(loaded, Mapping):
            break
        if any(is_tensor(v) for v in loaded.values()):
            return loaded
        nested = next((loaded[k] for k in NESTED_STATE_KEYS if isinstance(loaded.get(k), Mapping)), None)
        if nested is None:
            break
        loaded = nested
    raise ConvertError("found no state_dict (a mapping of names to tensors) in the file")


def read_torch(path: Path) -> StateDictFile:
    try:
        import torch
    except ImportError:
        raise ConvertError(
            f"reading {path.name} needs PyTorch: pip install 'hnet-jax[torch]' "
            f"(or convert the file to .safetensors elsewhere)"
        ) from None
    is_zip = zipfile.is_zipfile(path)
    try:
        # Everything the weights-only unpickler does not know becomes an inert stub.
        unknown = torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if is_zip else []
        with torch.serialization.safe_globals([(_stub_class(name), name) for name in unknown]):
            loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=is_zip)
        state = _find_state_dict(loaded, lambda v: isinstance(v, torch.Tensor))
    except ConvertError as err:
        raise ConvertError(f"cannot read {path}: {err}") from None
    except Exception as err:  # torch raises many types for a damaged or foreign file
        raise ConvertError(f"cannot read {path} with torch: {str(err).strip().splitlines()[0]}") from None
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    names = _strip_wrapper_prefix(tensors)

    def read(key):
        tensor = tensors[names[key]].detach()
        return (tensor.float() if tensor.is_floating_point() else tensor).numpy()

    return StateDictFile({key: tuple(tensors[name].shape) for key, name in names.items()}, read)


def read_state_dict(path: str | Path) -> StateDictFile:
    """A reference state_dict from a .safetensors file or a torch.save file (.pt, .pth, .bin, .ckpt)."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return read_torch(path)
    raise ConvertError(
        f"{path}: unknown checkpoint format; expected .safetensors or a torch file ({', '.join(TORCH_SUFFIXES)})"
    )


def load_reference_config(path: str | Path) -> ModelConfig:
    """A model config for a published checkpoint: the JSON as hnet.config reads it, with the exact
    capacity setting unless the file sets capacity_slack."""
    config = config_lib.load_config(path)
    if "capacity_slack" not in config_lib.read_json(Path(path)):
        config = config_lib.replace(config, capacity_slack=config_lib.EXACT)
    return config


def convert(checkpoint: str | Path, config_path: str | Path, out: str | Path, *, dtype: str = "float32") -> Path:
    """Convert a reference checkpoint into an export folder `out`; parameters stored in `dtype`."""
    checkpoint, out = Path(checkpoint), Path(out)
    stored = export_dtype(dtype)
    refuse_existing(out)
    config = load_reference_config(config_path)
    tensors = read_state_dict(checkpoint)
    graphdef, params = abstract_params(config)
    paths = flat_param_paths(params)
    abstract = nnx.traversals.flatten_mapping(params.to_pure_dict())
    model_shapes = {name: abstract[path].shape for name, path in paths.items()}
    table = parameter_table(config)
    check_model_covered(table, model_shapes)
    check_file_keys(table, tensors.shapes, model_shapes, f"{checkpoint.name} does not fit {Path(config_path).name}")

    values = {}  # our path tuple -> array, in the stored dtype
    for entry in table:
        if entry.key not in tensors.shapes:  # only a tied entry may be absent (checked above)
            continue
        array = tensors.read(entry.key)
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise ConvertError(f"{checkpoint.name}: {entry.key} holds {array.dtype} values, not floating point")
        array = jnp.asarray(from_reference(array, entry.layout)).astype(stored)
        path = paths[entry.path]
        if entry.tied:
            if not bool(jnp.array_equal(array, values[path])):
                raise ConvertError(
                    f"{checkpoint.name}: {entry.key} differs from the parameter it is tied to ({entry.path})"
                )
            continue
        values[path] = array
    nnx.replace_by_pure_dict(params, nnx.traversals.unflatten_mapping(values))

    with open(checkpoint, "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    info = {
        "dtype": jnp.dtype(stored).name,
        "source": checkpoint.name,
        "source_sha256": sha256,
        "step": None,
        "converted_from": SOURCE_DESCRIPTION,
    }
    return write_export(out, params, config, info)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hnet.inference.convert",
        description="Convert a published H-Net checkpoint (goombalab/hnet) into an export folder.",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="reference state_dict: .safetensors, or .pt/.bin (needs torch)"
    )
    parser.add_argument("--config", required=True, help="the reference JSON config, e.g. configs/hnet_2stage_XL.json")
    parser.add_argument("--out", required=True, help="export folder to create (must not exist)")
    parser.add_argument(
        "--dtype", default="float32", help="parameter dtype of the export: float32 (default) or bfloat16"
    )
    args = parser.parse_args(argv)
    try:
        print(f"wrote {convert(args.checkpoint, args.config, args.out, dtype=args.dtype)}")
    except HNetError as err:
        return report(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
