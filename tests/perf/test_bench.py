"""hnet.perf.xla_stats (matmul FLOPs of a jaxpr, XLA memory analysis) and hnet.perf.bench: memory, train and
components commands, the model-FLOPs lengths, bytes per token; scripts/gpu_check.sh (SMOKE=1)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hnet
from hnet.perf import bench
from hnet import chunking, flops
from hnet.training import throughput
from hnet import config as config_lib
from hnet.perf.bench_components import stage_piece_counts
from hnet.training.run_config import load_run_config
from hnet.perf.xla_stats import dot_general_flops, matmul_flops, memory_estimate
from conftest import CONFIGS, ROOT

# A BPE Transformer with one small block: its train step compiles in seconds. bench memory and
# bench train of the same run share one compilation (hnet.perf.bench.compile_train_step's cache).
TOKEN_RUN = [
    "train.batch_size=2",
    "train.seq_len=64",
    'model.arch_layout=["T1"]',
    "model.d_model=[32]",
    "model.d_intermediate=[64]",
    'model.attn_cfg={"num_heads": [2], "rotary_emb_dim": [8], "window_size": [-1]}',
]


def with_sets(overrides):
    return [arg for text in overrides for arg in ("--set", text)]


def test_dot_general_flops_counts_batch_contracting_and_free_dims():
    # "bij,bjk->bik": batch 2, contracting 4, free 3 and 5.
    assert dot_general_flops((2, 3, 4), (2, 4, 5), (((2,), (1,)), ((0,), (0,)))) == 2 * 2 * 4 * 3 * 5
    jaxpr = jax.make_jaxpr(lambda a, b: jnp.einsum("bij,bjk->bik", a, b))(jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5)))
    assert matmul_flops(jaxpr).flops == 240


def test_matmul_flops_recurses_into_jit_scan_cond_while_and_custom_jvp():
    w = jnp.ones((8, 8))
    x = jnp.ones((4, 8))
    one = 2 * 4 * 8 * 8  # x @ w

    @jax.custom_jvp
    def custom(x):
        return x @ w

    custom.defjvp(lambda primals, tangents: (custom(*primals), tangents[0] @ w))

    def f(x):
        x = jax.jit(lambda x: x @ w)(x)  # 1
        x, _ = jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)  # 5
        x = jax.lax.cond(x.sum() > 0, lambda x: (x @ w) @ w, lambda x: x, x)  # the larger branch: 2
        x = jax.lax.while_loop(lambda c: c.sum() < 0, lambda c: c @ w, x)  # once, noted
        return custom(x)  # 1

    count = matmul_flops(jax.make_jaxpr(f)(x))
    assert count.flops == 10 * one and count.dot_generals == 10
    assert count.backward_flops == 0
    assert any("while" in note for note in count.notes)


def test_matmul_flops_of_a_gradient_counts_backward_and_recomputation():
    w = jnp.ones((8, 8))
    x = jnp.ones((4, 8))
    one = 2 * 4 * 8 * 8

    def loss(w, x):
        return jnp.sum(jnp.tanh(x @ w) @ w)

    grad = matmul_flops(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(w, x))
    assert grad.flops == 6 * one and grad.backward_flops == 4 * one  # 2 forward, 2 x 2 backward
    # Rematerialised, the first matmul runs again inside the backward pass.
    remat = matmul_flops(jax.make_jaxpr(jax.grad(jax.checkpoint(loss), argnums=(0, 1)))(w, x))
    assert remat.flops == 7 * one and remat.backward_flops == 5 * one
    assert set(remat.by_source) == {"other"}  # written outside hnet


def test_matmul_flops_count_the_matmuls_with_a_float32_operand():
    x = jnp.ones((4, 8), jnp.bfloat16)
    one = 2 * 4 * 8 * 8

    def f(x):
        narrow = jnp.dot(x, jnp.ones((8, 8), jnp.bfloat16), preferred_element_type=jnp.float32)  # bf16 x bf16
        return narrow @ jnp.ones((8, 8), jnp.float32)  # a float32 operand

    count = matmul_flops(jax.make_jaxpr(f)(x))
    assert count.flops == 2 * one and count.float32_operand_flops == one


def test_memory_estimate_of_a_donating_function():
    x = jnp.ones((256, 256), jnp.float32)
    compiled = jax.jit(lambda x: jnp.tanh(x @ x) + 1.0, donate_argnums=0).lower(x).compile()
    memory = memory_estimate(compiled)
    assert memory.argument_bytes == memory.output_bytes == 256 * 256 * 4
    assert memory.alias_bytes in (0, memory.argument_bytes)  # XLA may or may not reuse the donated buffer
    assert memory.peak_bytes == memory.argument_bytes + memory.output_bytes + memory.temp_bytes - memory.alias_bytes
    assert memory.to_dict()["peak_bytes"] == memory.peak_bytes


def test_computed_stage_lengths_follow_targets_capped_by_capacity():
    config = config_lib.replace(hnet.load_config(CONFIGS / "hnet_1stage_tiny.json"), capacity_slack=2.0)
    capacity = chunking.stage_lengths(config, 512)
    assert capacity[1] < 512
    assert throughput.computed_stage_lengths(config, 512) == pytest.approx([512, 512 / 6])
    # The router selecting every byte: the stage still computes only its capacity.
    assert throughput.computed_stage_lengths(config, 512, [1.0]) == pytest.approx([512, capacity[1]])
    step_flops, lengths = throughput.model_flops_per_step(config, 4, 512, [1.0])
    assert step_flops == pytest.approx(flops.training_flops_per_step(config, 4, 512, [512 / capacity[1]]))
    assert step_flops < flops.training_flops_per_step(config, 4, 512, [1.0])
    two_stage = hnet.load_config(CONFIGS / "hnet_2stage_tiny.json")
    assert throughput.computed_stage_lengths(two_stage, 540) == pytest.approx([540, 180, 60])  # N = 3, then 3 x 3


def test_known_bytes_per_token_of_run_configs():
    assert bench.known_bytes_per_token(load_run_config(CONFIGS / "run_bpe_tiny.json"))[0] == 3.488
    assert bench.known_bytes_per_token(load_run_config(CONFIGS / "run_headline_bpe.json"))[0] == 3.933
    assert bench.known_bytes_per_token(load_run_config(CONFIGS / "run_tiny.json")) is None  # bytes
    unknown = load_run_config(CONFIGS / "run_bpe_tiny.json", ["data.corpus=prepared/books"])
    assert bench.known_bytes_per_token(unknown) is None


def test_stage_piece_counts_follow_the_layout():
    config = hnet.load_config(CONFIGS / "hnet_2stage_S.json")  # m4 [T1m4 [T8] m4T1] m4
    assert stage_piece_counts(config, 0) == {"ssd_scan": 8, "attention": 0, "chunking": 1}
    assert stage_piece_counts(config, 1) == {"ssd_scan": 8, "attention": 2, "chunking": 1}
    assert stage_piece_counts(config, 2) == {"ssd_scan": 0, "attention": 8, "chunking": 0}


def test_bench_memory_of_a_transformer_agrees_with_hnet_flops(capsys):
    """The jaxpr's matmuls are hnet.flops's model FLOPs plus the masked half of each L x L
    attention block (scores and values, forward and backward): nothing else is missing or extra."""
    result = bench.main(["memory", "--config", str(CONFIGS / "run_bpe_tiny.json"), *with_sets(TOKEN_RUN), "--json"])
    assert json.loads(capsys.readouterr().out) == result
    batch, length, width = 2, 64, 32
    masked_keys = length * length - length * (length + 1) / 2
    masked_attention = 3 * batch * 2 * (2 * width * masked_keys)
    assert result["executed_matmul_flops_per_step"] == pytest.approx(result["model_flops_per_step"] + masked_attention)
    assert result["executed_over_model_flops"] == pytest.approx(
        result["executed_matmul_flops_per_step"] / result["model_flops_per_step"]
    )
    assert result["executed_backward_share"] == pytest.approx(2 / 3)
    assert result["executed_float32_operand_share"] == 1.0  # a float32 run
    assert result["seq_unit"] == "tokens" and result["stage_lengths"] == [64]
    assert (result["remat"], result["slot_residuals"]) == ("none", None)  # a small Transformer: no ladder
    assert result["temp_bytes"] > 0 and result["temp_bytes_per_sequence"] == result["temp_bytes"] / batch
    assert result["peak_bytes"] == (
        result["argument_bytes"] + result["output_bytes"] + result["temp_bytes"] - result["alias_bytes"]
    )
    assert result["argument_bytes"] > 3 * 4 * result["params"]  # float32 params and two Adam moments


# A 1-stage H-Net small enough to run a forward in seconds (bench chunks).
SMALL_HNET = [
    'model={"config": "hnet_1stage_tiny.json", "arch_layout": ["m1", ["T1"], "m1"], "d_model": [32, 48], '
    '"d_intermediate": [0, 96], "attn_cfg": {"num_heads": [2, 2], "rotary_emb_dim": [8, 8], '
    '"window_size": [-1, -1]}, "dtype": "float32"}'
]


def test_bench_chunks_counts_the_chunks_kept_and_the_slots_the_ladder_computes(capsys):
    """bench chunks on real rows: its per-row counts give its statistics, and its ladder
    utilisation is what the rows compute on the ladder (counted here independently of hnet.slots)."""
    argv = ["chunks", *with_sets(SMALL_HNET), "--seq-len", "256", "--batch-size", "4", "--batches", "3"]
    result = bench.main([*argv, "--json"])
    assert json.loads(capsys.readouterr().out) == result
    (stage,) = result["stages"]
    kept = np.asarray(stage["kept_rows"])
    assert kept.shape == (3, 4) and stage["kept_per_row_mean"] == pytest.approx(kept.mean())
    assert stage["kept_per_row"]["max"] == kept.max() <= stage["static_slots"]
    ladder = stage["ladder"]
    assert ladder == sorted(ladder) and ladder[-1] == stage["static_slots"]
    assert stage["slot_groups"] == 4  # 4 rows in 4 groups: each row runs on the smallest rung holding it
    computed = sum(min(rung for rung in ladder if rung >= count) for count in kept.ravel())
    assert stage["ladder_slot_utilisation"] == pytest.approx(kept.sum() / computed)
    assert stage["static_slot_utilisation"] == pytest.approx(kept.mean() / stage["static_slots"])
    bench.main(argv)
    assert "slot utilisation" in capsys.readouterr().out


def test_bench_chunks_tries_another_ladder_on_a_checkpoints_router_and_nothing_else():
    """With --checkpoint, --set may change model.slot_ladder and model.slot_groups (which lengths
    the rows would run on), not the model: anything else is one ConfigError."""
    from hnet.errors import ConfigError

    config = hnet.load_config(CONFIGS / "hnet_1stage_tiny.json")
    changed = bench.ladder_overrides(config, ["model.slot_ladder=[1.75,1.25]", "model.slot_groups=8"])
    assert (changed.slot_ladder, changed.slot_groups) == ((1.25, 1.75), 8)
    assert changed.d_model == config.d_model and bench.ladder_overrides(config, []) is config
    with pytest.raises(ConfigError, match=r"--set model\.d_model=\[64,96\]: with --checkpoint the model is the"):
        bench.ladder_overrides(config, ["model.d_model=[64,96]"])
    with pytest.raises(ConfigError, match="slot_ladder"):
        bench.ladder_overrides(config, ["model.slot_ladder=[-1]"])


def test_rematerialisation_lowers_the_compiled_steps_temporaries_on_cpu():
    """train.remat=block keeps only each block's input for the backward pass. On CPU this holds
    only with XLA's barrier expander off (hnet.training.train_step.step_compiler_options): otherwise XLA
    merges the recomputed forward back into the first one and the temporaries stay those of
    remat=none."""
    run = ["train.batch_size=2", "train.seq_len=256", 'model.arch_layout=["T4"]', *TOKEN_RUN[3:]]
    temp = {
        remat: bench.bench_memory(str(CONFIGS / "run_bpe_tiny.json"), [*run, f"train.remat={remat}"])["temp_bytes"]
        for remat in ("none", "block")
    }
    assert temp["block"] < 0.7 * temp["none"]


def test_remat_auto_picks_by_model_size_and_length():
    from hnet.training.train_step import remat_policy

    picks = {
        name: remat_policy("auto", hnet.load_config(CONFIGS / f"{name}.json"), 8192)
        for name in ("hnet_1stage_tiny", "transformer_byte_S", "transformer_byte_M", "hnet_1stage_S", "hnet_2stage_M")
    }
    assert picks == {
        "hnet_1stage_tiny": "none",
        "transformer_byte_S": "dots",
        "transformer_byte_M": "dots",
        "hnet_1stage_S": "block",
        "hnet_2stage_M": "block",
    }
    assert remat_policy("auto", hnet.load_config(CONFIGS / "transformer_bpe_S.json"), 2083) == "dots"
    assert remat_policy("none", hnet.load_config(CONFIGS / "hnet_2stage_M.json"), 8192) == "none"


def test_bench_train_of_a_token_run_reports_bytes_per_second(capsys):
    argv = [
        "train",
        "--config",
        str(CONFIGS / "run_bpe_tiny.json"),
        *with_sets(TOKEN_RUN),
        "--steps",
        "2",
        "--warmup",
        "0",
        "--peak-tflops",
        "1",
    ]
    result = bench.main([*argv, "--json"])
    assert json.loads(capsys.readouterr().out) == result
    assert result["tokens_per_sec"] > 0 and result["bytes_per_token"] == 3.488
    assert result["bytes_per_sec"] == pytest.approx(result["tokens_per_sec"] * 3.488)
    assert result["bytes_per_token_source"] == "families.json stdlib_bpe4096"
    assert result["mfu"] == pytest.approx(result["model_flops_per_step"] / (result["step_s_median"] * 1e12))
    assert result["executed_flops_utilization"] == pytest.approx(result["mfu"] * result["executed_over_model_flops"])
    assert result["xla_temp_bytes"] > 0
    given = bench.main([*argv, "--bytes-per-token", "4"])
    assert given["bytes_per_sec"] == pytest.approx(given["tokens_per_sec"] * 4)
    assert "bytes/token (--bytes-per-token)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["memory", "--set", 'model={"config": "hnet_space_tiny.json"}'], "'space' routing"),
        (["memory", "--bytes-per-chunk", "2", "3"], "expected 1 entries"),
        (["train", "--bytes-per-token", "3"], "for token runs"),
        (["memory", "--set", "train.batch_size=0"], "train.batch_size"),
    ],
)
def test_bench_bad_input_is_one_error_line(capsys, argv, message):
    """Rejected before anything compiles."""
    assert bench.main(argv) is None
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_bench_needs_no_grain():
    """The benchmarks' import paths (train step, decode, components) work where grain is missing."""
    code = (
        "import sys; sys.modules['grain'] = None\n"  # `import grain` now raises ImportError
        "import hnet.perf.bench, hnet.perf.bench_components, hnet.training.train_step, hnet.inference.decode, hnet.training.run_config\n"
        "print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def run_gpu_check(out, **env):
    """SMOKE=1 scripts/gpu_check.sh into `out` -> (its JSON report, its markdown table)."""
    env = {**os.environ, "SMOKE": "1", "OUT": str(out), "PYTHON": sys.executable, **env}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


@pytest.fixture(scope="module")
def smoke_check(tmp_path_factory):
    """The whole SMOKE=1 check, once, for the 1-stage H-Net (every piece: SSD, attention, chunking;
    the decode rows) and the BPE Transformer (the token path): all four runs take about 2 minutes on 2 CPU cores although the
    shapes are already small, XLA compiling the train steps, the components' small programs and
    the decode loops dominating."""
    return run_gpu_check(tmp_path_factory.mktemp("gpu_check"), RUNS=" ".join(SMOKE_RUNS))


SMOKE_RUNS = ["hnet1", "bpe"]


def test_gpu_check_smoke_holds_every_row(smoke_check):
    report, table = smoke_check
    runs = SMOKE_RUNS
    assert report["failures"] == [] and report["skipped"] == []
    assert [(row["run"], row["micro_batch"]) for row in report["train"]] == [(run, 2) for run in runs]
    assert [row["run"] for row in report["memory"]] == runs
    assert [row["batch"] for row in report["decode"]] == [1, 32]
    assert {row["run"] for row in report["components"]} == set(runs)
    assert {row["piece"] for row in report["components"]} == {"ssd_scan", "attention", "chunking"}
    assert all(row["bytes_per_sec"] > 0 for row in report["train"])  # the BPE run at its known bytes/token
    # The H-Net's chunk slots: computed beside kept, in both the compiled and the timed step.
    (hnet_memory,) = [row for row in report["memory"] if row["run"] == "hnet1"]
    (hnet_train,) = [row for row in report["train"] if row["run"] == "hnet1"]
    assert list(hnet_memory["slot_lengths"]) == ["0"] and len(hnet_memory["slot_utilisation"]) == 1
    assert all(0 < u <= 1 for u in hnet_memory["slot_utilisation"] + hnet_train["slot_utilisation"])
    for section in ("## Train step", "## Memory", "## Decode", "## Components"):
        assert section in table
    for run in runs:
        assert table.count(f"| {run} |") == 2 + sum(row["run"] == run for row in report["components"])


def test_gpu_check_takes_the_largest_micro_batch_under_the_limit(smoke_check, tmp_path):
    """With a device limit just below micro-batch 2's estimate, 4 and 2 are skipped unrun and 1 is timed."""
    report, _ = smoke_check
    (bpe_at_2,) = [row for row in report["memory"] if row["run"] == "bpe"]
    report, table = run_gpu_check(
        tmp_path, RUNS="bpe", MICRO_BATCHES="4 2 1", DEVICE_BYTES_LIMIT=str(bpe_at_2["peak_bytes"] - 1)
    )
    assert report["failures"] == []
    assert [(row["run"], row["micro_batch"]) for row in report["train"]] == [("bpe", 1)]
    skipped = {row["item"]: row["reason"] for row in report["skipped"]}
    assert set(skipped) == {"train bpe micro-batch 4", "train bpe micro-batch 2"}
    assert skipped["train bpe micro-batch 4"].startswith("estimate")
    assert report["memory"][0]["micro_batch"] == 4 and report["memory"][-1]["micro_batch"] == 1
    assert "skipped train bpe micro-batch 4" in table
