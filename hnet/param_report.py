"""Parameter counts of a model config, per stage and component, without allocating anything.

python -m hnet.param_report configs/hnet_2stage_L.json          # validate, then a table
python -m hnet.param_report configs/hnet_2stage_L.json --json   # one JSON object with total_params
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import jax
from flax import nnx

from hnet.config import ModelConfig, layout_to_lists, load_config
from hnet.errors import ConfigError, report
from hnet.model import build_model


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters per component, keyed like "stage0.encoder", "stage1.main", "embedding".

    Uses abstract evaluation, so even XL configs are counted without allocating memory.
    """
    abstract = nnx.eval_shape(lambda: build_model(config, seed=0))
    state = nnx.state(abstract, nnx.Param)
    counts: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        counts[component_name(keys)] = counts.get(component_name(keys), 0) + math.prod(leaf.shape)
    return counts


def component_name(keys: list[str]) -> str:
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
    return (int(stage[len("stage") :]), _STAGE_PARTS.index(part) if part in _STAGE_PARTS else len(_STAGE_PARTS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hnet.param_report", description="Validate a model config and print its parameter counts."
    )
    parser.add_argument("config", help="path to a model config JSON")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as err:
        return report(err)
    counts = parameter_counts(config)
    if args.json:
        print(
            json.dumps(
                {"config": args.config, "depth": config.depth, "params": counts, "total_params": sum(counts.values())}
            )
        )
    else:
        print(
            f"{args.config}: depth {config.depth}, layout {layout_to_lists(config.arch_layout)}, d_model {list(config.d_model)}"
        )
        print(format_report(config, counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
