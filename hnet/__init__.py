"""hnet-jax: byte-level hierarchical language models (H-Net) with dynamic chunking, in JAX/Flax.

    import hnet
    config = hnet.load_config("configs/hnet_1stage_tiny.json")
    model = hnet.build_model(config, seed=0)
    out = model(input_ids)          # int32 (B, L) bytes
    out.logits                      # (B, L, 256)
    out.stages[0].boundary_mask     # (B, L), outermost stage first

    loaded = hnet.load_model("runs/x")                      # a run or export folder, or hf://OWNER/NAME
    hnet.generate(loaded, "def main(", max_new_bytes=100, temperature=0.8, top_p=0.95)   # -> str
    hnet.Generator(loaded).stream([b"def main("], sampling=hnet.SamplingConfig(temperature=0.8))

The package by concern (each subpackage's __init__.py says what lives there and what it may import;
tests/core/test_structure.py checks it):

    hnet/*.py, hnet/layers/   the model core: config, layers, chunking, model, FLOPs, errors; it
                              imports none of the subpackages below
    hnet/parallel/            device mesh and placement, multi-process start-up and agreement
    hnet/io/                  corpora, tokenizer, checkpoints, run folders
    hnet/training/            run config, train and eval steps, optimizer, the training loop
    hnet/inference/           load_model, generation, export, the reference's checkpoints
    hnet/evaluation/          bits per byte, chunk boundaries, reports, plots
    hnet/perf/                benchmarks
"""

import importlib

# Public names, imported lazily so that `python -m hnet.param_report` etc. run their module cleanly.
_EXPORTS = {
    "ConfigError": "hnet.config",
    "ModelConfig": "hnet.config",
    "load_config": "hnet.config",
    "BOS_ID": "hnet.vocab",
    "EOS_ID": "hnet.vocab",
    "HNetLM": "hnet.model",
    "TransformerLM": "hnet.model",
    "ModelOutput": "hnet.model",
    "StageOutput": "hnet.model",
    "build_model": "hnet.model",
    "cross_entropy": "hnet.model",
    "LoadedModel": "hnet.inference.load",
    "load_model": "hnet.inference.hub",  # run and export folders, and hf://OWNER/NAME
    "Generator": "hnet.inference.decode",
    "SamplingConfig": "hnet.inference.decode",
    "generate": "hnet.inference.decode",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hnet' has no attribute {name!r}")
