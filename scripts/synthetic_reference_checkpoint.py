"""Write a synthetic reference-format checkpoint (goombalab/hnet's state_dict names and shapes) for
a config, to time `python -m hnet.inference.convert` and measure its memory without downloading anything.

    python scripts/synthetic_reference_checkpoint.py configs/hnet_2stage_XL.json /tmp/xl.safetensors --dtype bfloat16
    /usr/bin/time -v python -m hnet.inference.convert --checkpoint /tmp/xl.safetensors \\
        --config configs/hnet_2stage_XL.json --out /tmp/xl_export --dtype bfloat16

Tensor i holds random values around i / 1000 (not a trained model: for timing and memory only).
"""

import argparse
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hnet.inference import reference  # noqa: E402
from hnet.inference.convert import load_reference_config  # noqa: E402
from hnet.inference.load import abstract_params  # noqa: E402

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    args = parser.parse_args()
    config = load_reference_config(args.config)
    _, abstract = abstract_params(config)
    shapes = {
        ".".join(map(str, p)): v.shape for p, v in nnx.traversals.flatten_mapping(abstract.to_pure_dict()).items()
    }
    rng = np.random.default_rng(0)
    tensors, total = {}, 0
    for i, entry in enumerate(reference.parameter_table(config)):
        shape = reference.reference_shape(shapes[entry.path], entry.layout)
        # Random values, so that nothing compresses better than real weights would.
        values = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02) + np.float32(i / 1000)
        tensors[entry.key] = values.astype(DTYPES[args.dtype])
        total += values.size
    save_file(tensors, args.out)
    print(f"wrote {args.out}: {len(tensors)} tensors, {total:,d} parameters, {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
