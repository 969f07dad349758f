"""Run by tests/parallel/test_sharding.py in a subprocess with 8 simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8): trains the same global batches on several
meshes and moves checkpoints between meshes. Prints one JSON object on its last line.

    python tests/parallel/sharding_worker.py CHECKPOINT_DIR
"""

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from conftest import LADDER, shrink, tiny_config  # noqa: E402
from hnet.parallel import sharding  # noqa: E402
from hnet.io.checkpoint import Checkpointer  # noqa: E402
from hnet.training.run_config import run_config_from_dict  # noqa: E402
from hnet.training.train_step import make_step_functions  # noqa: E402

STEPS = 3
BATCH, SEQ_LEN = 8, 64
# name -> (data, fsdp, tensor, number of devices used)
MESHES = {
    "single": (1, 1, 1, 1),
    "data8": (8, 1, 1, 8),
    "fsdp8": (1, 8, 1, 8),
    "mixed222": (2, 2, 2, 8),
    "fsdp2": (1, 2, 1, 2),
    "mixed222_keep": (2, 2, 2, 8),
}
# On CPU the slot ladder recomputes its forward (train.slot_residuals auto); on a GPU it keeps the
# taken branch's residuals: that way too, sharded.
SLOT_RESIDUALS = {"mixed222_keep": "keep"}


def batches():
    """STEPS fixed (1, BATCH, SEQ_LEN) micro-batches of text-like bytes (same for every mesh)."""
    rng = np.random.default_rng(0)
    words = [b"the ", b"cat ", b"sat ", b"on ", b"a ", b"mat. ", b"\n", b"def f(x): ", b"return ", b"1 + 2 "]
    out = []
    for _ in range(STEPS):
        rows = []
        for _ in range(BATCH):
            text = b"".join(words[i] for i in rng.integers(0, len(words), SEQ_LEN))[: SEQ_LEN + 1]
            rows.append(np.frombuffer(text, np.uint8).astype(np.int32))
        windows = np.stack(rows)[None]
        out.append((windows[..., :-1], windows[..., 1:]))
    return out


def shard_shapes(array) -> list:
    return [list(shard.data.shape) for shard in array.addressable_shards[:1]]


def main(checkpoint_root: str) -> None:
    config = shrink(tiny_config("hnet_1stage_tiny", **LADDER))

    def run_for(name):
        train = {"steps": 100, "batch_size": BATCH, "seq_len": SEQ_LEN, "lr": 3e-3, "warmup_frac": 0.0}
        train["slot_residuals"] = SLOT_RESIDUALS.get(name, "auto")
        return run_config_from_dict({"model": json.loads(json.dumps(config.to_dict())), "train": train})

    data = batches()
    result = {"losses": {}, "shards": {}, "restored": {}}
    steps_by_mesh = {}
    for name, (d, f, t, n) in MESHES.items():
        mesh = sharding.make_mesh(d, f, t, devices=jax.devices()[:n])
        _, steps = make_step_functions(run_for(name), mesh)
        start = time.perf_counter()
        state = steps.init()
        kernel = state["params"]["lm_head"]["kernel"]
        result["shards"][name] = {
            "lm_head": shard_shapes(kernel.get_value()),
            "lm_head_adam_mu": shard_shapes(state["opt_state"][1].mu["lm_head"]["kernel"].get_value()),
            "main_mlp_fc1": shard_shapes(
                state["params"]["backbone"]["inner"]["main"]["blocks"][0]["mlp"]["fc1"]["kernel"].get_value()
            ),
            "conv_weight": shard_shapes(
                state["params"]["backbone"]["encoder"]["blocks"][0]["mixer"]["conv_weight"].get_value()
            ),
        }
        losses = []
        for i, (inputs, targets) in enumerate(data):
            if i == STEPS - 1 and name in ("mixed222", "fsdp2"):
                # Keep the state before the last step: it moves to another mesh below.
                checkpointer = Checkpointer(Path(checkpoint_root) / name, keep=1)
                checkpointer.save(i, state, {"iterator": "{}"}, {"step": i})
                checkpointer.close()
            state, metrics = steps.train_step(state, steps.place_train_batch(inputs), steps.place_train_batch(targets))
            losses.append(float(metrics["loss"]))
        result["losses"][name] = losses
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        steps_by_mesh[name] = steps

    # 8 devices -> 2 (mixed222 -> fsdp2) and 2 -> 8 (fsdp2 -> fsdp8): the next step's loss.
    inputs, targets = data[-1]
    for source, target in (("mixed222", "fsdp2"), ("fsdp2", "fsdp8")):
        steps = steps_by_mesh[target]
        checkpointer = Checkpointer(Path(checkpoint_root) / source, keep=1)
        state, _, meta = checkpointer.restore(STEPS - 1, steps.abstract_state)
        checkpointer.close()
        restored_kernel = state["params"]["lm_head"]["kernel"].get_value()
        placement = {"devices": len(restored_kernel.sharding.device_set), "lm_head": shard_shapes(restored_kernel)}
        state, metrics = steps.train_step(state, steps.place_train_batch(inputs), steps.place_train_batch(targets))
        result["restored"][f"{source}->{target}"] = {
            "loss": float(metrics["loss"]),
            "source_loss": result["losses"][source][-1],
            **placement,
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
