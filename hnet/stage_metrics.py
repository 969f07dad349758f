"""Names of the per-stage metrics: chunking stage s reports its numbers as "stage{s}_<name>" in a
step's metrics, in metrics.jsonl rows and in evaluation results (an evaluation row of
metrics.jsonl prefixes them with "eval_"). Imports nothing, so plots and reports read them without JAX.
"""


def stage_metric(stage: int, name: str) -> str:
    """stage_metric(0, "bytes_per_chunk") -> "stage0_bytes_per_chunk"."""
    return f"stage{stage}_{name}"


def stage_values(row: dict, name: str, prefix: str = "") -> list:
    """The values of the metric `name` of stage 0, 1, ... in `row`, for as many stages as it holds
    (prefix: "eval_" in an evaluation row of metrics.jsonl)."""
    values = []
    while (key := prefix + stage_metric(len(values), name)) in row:
        values.append(row[key])
    return values
