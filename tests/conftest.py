"""Shared fixtures: tiny configs built once, so JAX compiles as little as possible."""

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

# The suite compiles many small functions once each: XLA's backend optimisations cost more compile
# time than they save at run time here (about 30% of the suite's time). Set before JAX starts, and
# inherited by the subprocesses tests start.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()


# Caches of this session's own (a fresh folder each run, removed at the end), set before JAX and
# `datasets` start and inherited by the subprocesses and workers tests start:
# - compiled programs, so the many tests and subprocesses that compile the same program (the same
#   model at the same shapes through another jitted function) compile it once (results do not change);
# - the task files the downstream tests write, as `datasets` prepares them (not ~/.cache/huggingface).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="hnet-tests-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
if "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="hnet-tests-datasets-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

import pytest

import jax
from flax import nnx

import hnet
from hnet import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


# What tests run the H-Nets with unless they say otherwise (tiny_config): a tight cap, so that
# untrained routers drop boundaries and every path of the capacity rule is exercised (the tiny
# configs themselves never drop: capacity_slack "exact"), and no slot ladder (the inner stacks on
# the static cap, one branch to compile). The ladder is tested where it matters, with LADDER:
# test_slots (a stack on the ladder equals it on every slot, values and gradients; a document
# scores the same in any batch), sharded and multi-process training, the training loop, and the
# reference parity (the converted models' own default ladder).
TEST_CAPACITY = {"capacity_slack": 2.0, "capacity_burst": 16, "slot_ladder": ()}
LADDER = {"slot_ladder": (1.25,)}  # one rung below the cap: the switch with two branches


def tiny_config(name: str, **changes) -> hnet.ModelConfig:
    """A config from configs/ in float32 (exact comparisons) with TEST_CAPACITY, and optional
    field changes."""
    config = hnet.load_config(CONFIGS / f"{name}.json")
    return config_lib.replace(config, dtype="float32", **{**TEST_CAPACITY, **changes})


def shrink(config: hnet.ModelConfig) -> hnet.ModelConfig:
    """Same layout letters and depth, one block per letter, small widths: cheap to compile."""

    def shrink_layout(layout):
        if isinstance(layout, str):
            return "".join(f"{letter}1" for letter, _ in config_lib.parse_layout(layout))
        return tuple(shrink_layout(x) for x in layout)

    n = len(config.d_model)
    return config_lib.replace(
        config,
        arch_layout=shrink_layout(config.arch_layout),
        d_model=tuple(32 + 16 * s for s in range(n)),
        d_intermediate=tuple(64 if d else 0 for d in config.d_intermediate),
        ssm_cfg=config_lib.SSMConfig(d_state=8, d_conv=4, expand=2, chunk_size=16, head_dim=16),
        attn_cfg=config_lib.AttnConfig(
            num_heads=(2,) * n,
            rotary_emb_dim=(8,) * n,
            window_size=tuple(7 if w > 0 else -1 for w in config.attn_cfg.window_size),
        ),
        capacity_multiple=8,
    )


@pytest.fixture(scope="session")
def config_1stage():
    return tiny_config("hnet_1stage_tiny")


@pytest.fixture(scope="session")
def config_2stage():
    return tiny_config("hnet_2stage_tiny")


def jit_forward(model):
    """A jitted `input_ids -> ModelOutput` over the model's current parameters.

    The function compiles once per input shape; parameters are passed as arguments, so updating
    the model (nnx.update) does not retrace.
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, input_ids):
        return nnx.merge(graphdef, state)(input_ids)

    def call(input_ids):
        return forward(nnx.state(model), input_ids)

    call.jitted = forward
    return call


def write_run_folder(run_dir: Path, model, step: int = 3, tokenizer=None) -> Path:
    """A training-run folder as train.py leaves it, holding `model`'s parameters: config.json, an
    orbax checkpoint of the train state at `step` and, for a token model, tokenizer.json."""
    import jax.numpy as jnp

    from hnet.io.checkpoint import Checkpointer
    from hnet.io.run_dir import RunDir

    run = RunDir(run_dir)
    run.path.mkdir(parents=True)
    run.config.write_text(json.dumps({"model": model.config.to_dict()}))
    if tokenizer is not None:
        tokenizer.save(run.tokenizer)
    _, params = nnx.split(model, nnx.Param)
    checkpointer = Checkpointer(run.path)
    checkpointer.save(
        step, {"params": params, "nonfinite_total": jnp.zeros((), jnp.int32)}, {"iterator": "{}"}, {"step": step}
    )
    checkpointer.close()
    return run.path


# ---- Training runs: a small H-Net run config, and running train.py in-process ----

# A very small H-Net so each run compiles in seconds.
SMALL_MODEL = {
    "arch_layout": ["m1", ["T1"], "m1"],
    "d_model": [48, 64],
    "d_intermediate": [0, 128],
    "ssm_cfg": {"d_state": 8, "chunk_size": 32, "head_dim": 16, "expand": 2, "d_conv": 4},
    "attn_cfg": {"num_heads": [2, 2], "rotary_emb_dim": [8, 16], "window_size": [31, -1]},
    "target_ratio": [4],
    "capacity_multiple": 16,
    "dtype": "float32",
    "slot_ladder": [],  # the static cap (one branch to compile); runs on the ladder say so (LADDER)
}


def small_run(**train_overrides) -> dict:
    train = {
        "steps": 8,
        "batch_size": 4,
        "seq_len": 64,
        "lr": 3e-3,
        "log_every": 2,
        "eval_every": 100,
        "eval_batches": 2,
        "checkpoint_every": 4,
        **train_overrides,
    }
    return {"model": SMALL_MODEL, "data": {"corpus": "default"}, "train": train}


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def run_cli(args, capsys):
    """train.py's main(args) -> (exit status, its stderr stripped)."""
    import train as train_cli

    code = train_cli.main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def write_run(tmp_path, run: dict, name="run.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(run))
    return str(path)
