"""Sharded and multi-process training: mesh resolution, the logical-axis rules, the same losses on
every mesh, really sharded parameters and optimizer state, checkpoints moved between meshes, and
two processes (jax.distributed on 127.0.0.1) training, then one process resuming.

The multi-device tests run in subprocesses with simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from conftest import LADDER, ROOT, shrink, tiny_config
from hnet.parallel import distributed, sharding
from hnet import logical_axes
from hnet.io.checkpoint import check_step
from hnet.config import load_config
from hnet.io.data import ensure_default_corpus
from hnet.errors import ConfigError
from hnet.model import build_model
from hnet.training.run_config import run_config_from_dict

# Test-only: the subprocesses compile with LLVM at -O0 (XLA's own HLO optimisations still run),
# about 4x faster to compile on CPU; every mesh of a comparison runs under the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# Losses on different meshes may differ only by the order of floating-point sums (partitioned
# matmul contractions, cross-device gradient reductions, rows of the batch in another order).
# Measured: at most 1.4e-6 (3 ulp of float32 at a loss of ~5.5 nats) over 3 steps on the meshes
# below and over 6 steps for two processes vs one. 2e-5 leaves 14x room for that, while a layout
# bug (rows dropped or counted twice, a wrong gather across shards) moves the loss by 1e-3 or more.
LOSS_ATOL = 2e-5


def subprocess_env(devices: int) -> dict:
    return {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONUNBUFFERED": "1",
    }


# ---- Mesh and rules (in process) ----


@pytest.mark.parametrize(
    "sizes, params, expected",
    [
        ((-1, -1, 1), 10**6, (8, 1, 1)),  # default: all devices on data
        ((-1, -1, 1), sharding.AUTO_FSDP_MIN_PARAMS, (1, 8, 1)),  # large model: all on fsdp
        ((-1, 8, 1), 10**6, (1, 8, 1)),  # --set mesh.fsdp=8
        ((-1, 4, 1), 10**6, (2, 4, 1)),
        ((-1, -1, 2), 10**6, (4, 1, 2)),
        ((2, 2, 2), 10**6, (2, 2, 2)),
        ((2, 2, -1), 10**6, (2, 2, 2)),
    ],
)
def test_mesh_shape(sizes, params, expected):
    assert sharding.mesh_shape(*sizes, device_count=8, param_count=params) == expected


@pytest.mark.parametrize(
    "sizes, message",
    [
        ((3, -1, 1), "does not divide the 8 devices"),
        ((2, 2, 1), "needs 4 devices, but 8 are available"),
        ((-1, 2, -1), "only one of data, tensor may be -1"),
        ((0, -1, 1), "mesh.data: expected a positive size"),
    ],
)
def test_mesh_shape_errors_are_one_line(sizes, message):
    with pytest.raises(ConfigError, match=message) as info:
        sharding.mesh_shape(*sizes, device_count=8, param_count=0)
    assert "\n" not in str(info.value)


def test_rules_split_divisible_dimensions_and_replicate_the_rest():
    fsdp8 = AbstractMesh((1, 8, 1), logical_axes.MESH_AXES)
    mixed = AbstractMesh((2, 2, 2), logical_axes.MESH_AXES)
    assert logical_axes.logical_to_spec(("embed", "vocab"), (32, 256), fsdp8) == P("fsdp", None)
    assert logical_axes.logical_to_spec(("embed", "vocab"), (32, 256), mixed) == P("fsdp", "tensor")
    assert logical_axes.logical_to_spec(("embed", "mlp"), (36, 256), fsdp8) == P(None, None)  # 36 % 8: replicated
    assert logical_axes.logical_to_spec(("embed", "embed_out"), (32, 32), fsdp8) == P("fsdp", None)
    assert logical_axes.logical_to_spec(("mamba_in", "embed"), (148, 32), fsdp8) == P(None, "fsdp")
    assert logical_axes.logical_to_spec(logical_axes.BATCH_AXES, (8, 64), mixed) == P(("data", "fsdp"), None)
    assert logical_axes.logical_to_spec(logical_axes.BATCH_AXES, (6, 64), mixed) == P(None, None)  # 6 % 4: replicated
    assert logical_axes.logical_to_spec(logical_axes.HEADS_AXES, (8, 64, 3, 16), mixed) == P(
        ("data", "fsdp"), None, None, None
    )
    with pytest.raises(ValueError, match="no rule"):
        logical_axes.logical_to_spec(("nonsense",), (8,), mixed)


@pytest.mark.parametrize("name", ["hnet_1stage_L", "hnet_2stage_XL", "transformer_byte_tiny"])
def test_every_parameter_has_a_rule(name):
    """Every logical axis of every parameter is in LOGICAL_RULES (shapes only, nothing allocated)."""
    from flax import nnx

    config = load_config(ROOT / "configs" / f"{name}.json")
    params = nnx.state(nnx.eval_shape(lambda: build_model(config)), nnx.Param)
    shardings = sharding.tree_shardings(params, sharding.make_mesh(param_count=0))
    for variable in jax_leaves(params):
        assert variable.get_metadata().get("out_sharding"), "a parameter without logical axis names"
    assert len(jax_leaves(shardings)) == len(jax_leaves(params))


def jax_leaves(tree):
    import jax
    from flax import nnx

    return jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def test_mesh_section_and_distributed_flags_are_checked():
    base = {"model": "hnet_1stage_tiny.json"}
    assert run_config_from_dict(base, ["mesh.fsdp=8"]).mesh.fsdp == 8
    with pytest.raises(ConfigError, match="mesh: unknown field"):
        run_config_from_dict({**base, "mesh": {"pipeline": 2}})
    with pytest.raises(ConfigError, match="mesh.tensor: expected a positive size"):
        run_config_from_dict(base, ["mesh.tensor=0"])
    with pytest.raises(ConfigError, match="also need --num-processes, --process-id"):
        distributed.maybe_initialize(coordinator="127.0.0.1:1234")
    with pytest.raises(ConfigError, match="need 0 <= process id < number of processes"):
        distributed.maybe_initialize(coordinator="127.0.0.1:1234", num_processes=2, process_id=2)


def test_bad_mesh_is_a_one_line_error_before_the_run_folder_is_made(tmp_path, capsys):
    import train as train_cli

    code = train_cli.main(["--workdir", str(tmp_path / "run"), "--set", "mesh.fsdp=2", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: mesh:") and "1 devices" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


# ---- Eight simulated devices (one subprocess for all meshes) ----


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
    """tests/parallel/sharding_worker.py's report: losses, shard shapes and restores on several meshes."""
    checkpoints = tmp_path_factory.mktemp("mesh_checkpoints")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "parallel" / "sharding_worker.py"), str(checkpoints)],
        cwd=ROOT,
        env=subprocess_env(8),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_losses_agree_across_meshes(mesh_results):
    losses = mesh_results["losses"]
    assert set(losses) == {"single", "data8", "fsdp8", "mixed222", "fsdp2", "mixed222_keep"}
    reference = np.array(losses["single"])
    assert len(reference) == 3 and reference[-1] < reference[0]  # it trains
    for name, curve in losses.items():
        np.testing.assert_allclose(curve, reference, rtol=0, atol=LOSS_ATOL, err_msg=name)


def test_parameters_and_optimizer_state_are_sharded(mesh_results):
    """Per-device shard shapes: lm_head (embed 32, vocab 256), main-network fc1 (48, 2 x 128),
    Mamba conv (4, 80) which has no split axis and stays whole."""
    shards = mesh_results["shards"]
    assert shards["data8"]["lm_head"] == [[32, 256]]  # data parallel: replicated
    assert shards["fsdp8"]["lm_head"] == [[4, 256]]  # embed over 8
    assert shards["fsdp8"]["main_mlp_fc1"] == [[6, 256]]
    assert shards["mixed222"]["lm_head"] == [[16, 128]]  # embed over fsdp 2, vocab over tensor 2
    assert shards["mixed222"]["main_mlp_fc1"] == [[24, 128]]  # MLP hidden over tensor
    for name in ("fsdp8", "mixed222", "fsdp2"):
        assert shards[name]["lm_head_adam_mu"] == shards[name]["lm_head"]  # Adam moments follow the params
        assert shards[name]["conv_weight"] == [[4, 80]]


def test_restore_onto_a_different_mesh(mesh_results):
    """Saved on 8 devices and resumed on 2, and the reverse: the next step's loss is the same."""
    restored = mesh_results["restored"]
    assert restored["mixed222->fsdp2"]["devices"] == 2 and restored["mixed222->fsdp2"]["lm_head"] == [[16, 256]]
    assert restored["fsdp2->fsdp8"]["devices"] == 8 and restored["fsdp2->fsdp8"]["lm_head"] == [[4, 256]]
    for move in restored.values():
        assert abs(move["loss"] - move["source_loss"]) <= LOSS_ATOL


# ---- Two processes ----


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def launch(args: list[str], devices: int, **env) -> subprocess.Popen:
    """train.py in a subprocess on `devices` simulated CPU devices; output captured."""
    return subprocess.Popen(
        [sys.executable, "train.py", "--no-progress", *args],
        cwd=ROOT,
        env={**subprocess_env(devices), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    """Wait for every process (killing all of them on failure or timeout); -> their outputs."""
    try:
        outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [0] * len(procs), "\n".join(outputs)[-4000:]
    return outputs


def test_two_processes_train_and_checkpoint_then_one_process_resumes(tmp_path):
    config = shrink(tiny_config("hnet_1stage_tiny", **LADDER))
    run = {
        "model": json.loads(json.dumps(config.to_dict())),
        "data": {"corpus": "default"},
        "train": {
            "steps": 6,
            "batch_size": 8,
            "seq_len": 64,
            "lr": 3e-3,
            "warmup_frac": 0.0,
            "log_every": 2,
            "eval_every": 4,
            "eval_batches": 2,
            "checkpoint_every": 100,
        },
    }
    config_path = write_json(tmp_path / "run.json", run)
    ensure_default_corpus(verbose=False)  # prepared once here, not raced by the subprocesses

    # Two processes of 2 devices each, pure FSDP over all 4: each process saves half of every
    # weight. Beside them, the reference: one process, one device, uninterrupted.
    run_dir, port = tmp_path / "two", free_port()
    cluster = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--distributed-timeout", "60"]
    procs = [
        launch(
            [
                "--config",
                config_path,
                "--workdir",
                str(run_dir),
                "--max-steps",
                "4",
                "--set",
                "mesh.fsdp=4",
                *cluster,
                "--process-id",
                str(i),
            ],
            devices=2,
            JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",
        )
        for i in range(2)
    ]
    procs.append(launch(["--config", config_path, "--workdir", str(tmp_path / "straight")], devices=1))
    outputs = finish(procs)
    assert "mesh: data=1 fsdp=4 tensor=1 (4 devices, 2 processes)" in outputs[0]
    assert "completed at step 4" in outputs[0], outputs[0]
    assert "mesh:" not in outputs[1] and "completed" not in outputs[1]  # only process 0 reports
    assert (run_dir / "checkpoints" / "4").is_dir()
    assert check_step(run_dir, 4).state == "good"  # process 0 wrote the manifest of both processes' files

    # One process, one device: the same run, resumed from the 2-process checkpoint.
    (output,) = finish([launch(["--workdir", str(run_dir), "--resume", "--set", "mesh.fsdp=-1"], devices=1)])
    assert "mesh: data=1 fsdp=1 tensor=1 (1 device, 1 process)" in output and "completed at step 6" in output
    straight, resumed = metric_rows(tmp_path / "straight"), metric_rows(run_dir)
    assert [row["step"] for row in resumed] == [1, 2, 3, 4, 5, 6]  # process 0 alone wrote the rows
    # Same global batches (each process read its own rows), so the same losses, up to summation order.
    np.testing.assert_allclose(
        [row["loss"] for row in resumed], [row["loss"] for row in straight], rtol=0, atol=LOSS_ATOL
    )
    assert [row["bytes_seen"] for row in resumed] == [row["bytes_seen"] for row in straight]
    # Evaluation at step 4 ran on the 2-process mesh, at step 6 on one device.
    evals = [
        {row["step"]: row["eval_bpb"] for row in rows}
        for rows in (eval_rows(run_dir), eval_rows(tmp_path / "straight"))
    ]
    assert set(evals[0]) == set(evals[1]) == {4, 6}
    for step in (4, 6):
        assert abs(evals[0][step] - evals[1][step]) <= LOSS_ATOL


def test_a_lost_process_is_one_error_line_on_the_others():
    """Process 1 dies; process 0 says so in one line and exits 3 before JAX's heartbeat abort."""
    port, timeout_s = free_port(), 10
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "parallel" / "peer_loss_worker.py"),
                str(i),
                str(port),
                str(timeout_s),
            ],
            cwd=ROOT,
            env={**subprocess_env(1), "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        (out, err), _ = procs[0].communicate(timeout=120), procs[1].communicate(timeout=120)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert procs[1].returncode == 1
    assert procs[0].returncode == distributed.EXIT_PROCESS_LOST, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: process 0 of 2: process 1 sent no heartbeat")
    assert "--resume" in errors[0] and "still running" not in out
    assert "stack trace" not in err and "Terminating process" not in err  # JAX's abort never came


def eval_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval_bpb"' in line]


def write_json(path: Path, data: dict) -> str:
    path.write_text(json.dumps(data))
    return str(path)
