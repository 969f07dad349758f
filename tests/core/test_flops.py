"""hnet.flops: counts checked against the real model's shapes, the standard 6N + attention
estimate, the attention mask, the SSD scan's own matmuls, and the compute-matched families."""

import json
import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import hnet
from hnet import config as config_lib
from hnet import flops, param_report
from hnet.layers.kernels.attention import attention_mask
from hnet.layers.kernels.ssd import ssd_scan
from hnet.perf.xla_stats import matmul_flops
from conftest import CONFIGS, tiny_config

FAMILY_TOLERANCE = 0.05  # the "equal FLOPs per byte (within 5%)"


def kernel_params_by_component(config):
    """{component: parameters of its matmul weights} of the real model (abstract, nothing allocated).

    Matmul weights are the linear layers' kernels and the routing's q/k projections.
    """
    model = nnx.eval_shape(lambda: hnet.build_model(config, seed=0))
    counts = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]:
        keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        keys = keys[:-1] if keys[-1] == "value" else keys  # nnx.Param's own attribute
        if keys[-1] in ("kernel", "q_proj", "k_proj"):
            name = param_report.component_name(keys)
            counts[name] = counts.get(name, 0) + math.prod(leaf.shape)
    return counts


def test_plain_transformer_agrees_with_6n_plus_attention():
    """Training FLOPs per token of a global-attention Transformer vs 6N + 6·n_layer·d·T.

    6N (N = all parameters except the embedding table, which is a lookup) is the matmul work;
    PaLM's attention term 12·n_layer·d·T counts every key, and with the causal mask a query sees
    (T+1)/2 keys on average, hence 6·n_layer·d·T. Tolerance 0.5%: 6N also counts the RMSNorm
    weights, which do no matmul work (2d + 1 per layer of about 12d² weights: < 0.2% here), and
    the exact causal count has T + 1 where the estimate has T (< 0.1% here).
    """
    for name, seq_len, bytes_per_token in [("transformer_byte_tiny", 512, None), ("transformer_bpe_tiny", 147, 3.488)]:
        config = tiny_config(name)
        counts = param_report.parameter_counts(config)
        n_params = sum(counts.values()) - counts["embedding"]
        (layout,) = config.stage_layout(0)
        n_layers = sum(count for _, count in config_lib.parse_layout(layout))
        estimate = 6 * n_params + 6 * n_layers * config.d_model[0] * seq_len
        report = flops.flops_per_byte(config, seq_len, bytes_per_token=bytes_per_token)
        per_token = report.training_per_sequence / seq_len
        assert per_token == pytest.approx(estimate, rel=0.005)
        assert report.training_per_byte == pytest.approx(per_token / (bytes_per_token or 1))


@pytest.mark.parametrize("name", ["hnet_1stage_tiny", "hnet_2stage_tiny", "transformer_gqa"])
def test_linear_flops_are_two_per_weight_per_position(name):
    """Each component's matmul FLOPs = 2 x its real matmul weights x its stage's length."""
    if name == "transformer_gqa":
        config = tiny_config(
            "transformer_byte_tiny",
            attn_cfg=config_lib.AttnConfig(num_heads=(3,), rotary_emb_dim=(16,), window_size=(-1,), num_kv_heads=(1,)),
        )
    else:
        config = tiny_config(name)
    weights = kernel_params_by_component(config)
    report = flops.flops_per_byte(config, 512)
    lengths = report.stage_lengths
    for component, ops in report.forward.items():
        stage = int(component.split(".")[0][len("stage") :]) if component.startswith("stage") else 0
        expected = 2 * lengths[stage] * weights.get(component, 0)
        assert ops["linear"] == pytest.approx(expected), component
    assert set(weights) <= set(report.forward)


@pytest.mark.parametrize("length,window", [(1, -1), (17, -1), (64, 7), (64, 63), (64, 64), (10, 255)])
def test_visible_keys_match_the_attention_mask(length, window):
    one_document = jnp.zeros((1, length), jnp.int32)
    assert flops.visible_keys(length, window) == int(attention_mask(jnp.arange(length), one_document, window).sum())


@pytest.mark.parametrize("length,chunk", [(256, 64), (48, 64)])
def test_ssd_count_matches_the_scan_as_implemented(length, chunk):
    """The SSD formula vs the matmuls ssd_scan really traces (no compile).

    Tolerance 3%: the traced einsums also contain two small outer products (about L·H·(P + S)
    terms) that the formula leaves out as elementwise work, and the formula adds the state carry
    (elementwise, inside lax.scan). Counting only the causal half of each Q x Q block, or
    dropping the state terms, misses by more than 15%.
    """
    heads, head_dim, d_state = 4, 16, 8
    args = (
        jnp.zeros((1, length, heads, head_dim)),
        jnp.zeros((1, length, heads)),
        jnp.zeros((heads,)),
        jnp.zeros((1, length, d_state)),
        jnp.zeros((1, length, d_state)),
    )
    traced = matmul_flops(jax.make_jaxpr(lambda *a: ssd_scan(*a, chunk))(*args)).flops  # remat bodies included
    assert flops.ssd_scan_flops(length, chunk, heads, head_dim, d_state) == pytest.approx(traced, rel=0.03)


def test_stage_lengths_follow_targets_strides_and_measurements():
    two_stage = tiny_config("hnet_2stage_tiny")  # N = (3, 3)
    assert flops.stage_lengths(two_stage, 900) == pytest.approx([900, 300, 100])
    # Measured bytes per chunk are cumulative (outermost bytes per stage-s chunk).
    assert flops.stage_lengths(two_stage, 900, [4.5, 9.0]) == pytest.approx([900, 200, 100])
    assert flops.stage_lengths(two_stage, 900, [None, 12.0]) == pytest.approx([900, 300, 75])
    with pytest.raises(flops.FlopsError, match="cumulative"):
        flops.stage_lengths(two_stage, 900, [4.5, 3.0])
    assert flops.stage_lengths(hnet.load_config(CONFIGS / "hnet_stride_tiny.json"), 600) == pytest.approx([600, 100])
    space = hnet.load_config(CONFIGS / "hnet_space_tiny.json")
    with pytest.raises(flops.FlopsError, match="space"):
        flops.stage_lengths(space, 512)
    assert flops.stage_lengths(space, 512, [8.0]) == pytest.approx([512, 64])


def test_measured_chunking_changes_the_count_and_step_flops():
    config = tiny_config("hnet_1stage_tiny")
    at_target = flops.flops_per_byte(config, 512)
    coarser = flops.flops_per_byte(config, 512, bytes_per_chunk=[8.0])
    assert coarser.training_per_byte < at_target.training_per_byte
    assert coarser.forward["stage0.encoder"] == at_target.forward["stage0.encoder"]  # outer stage unchanged
    step = flops.training_flops_per_step(config, batch_size=8, seq_len=512, bytes_per_chunk=[jnp.float32(8.0)])
    assert step == pytest.approx(8 * 3 * coarser.forward_per_sequence)


def test_token_models_need_bytes_per_token():
    with pytest.raises(flops.FlopsError, match="bytes_per_token"):
        flops.flops_per_byte(tiny_config("transformer_bpe_tiny"), 147)
    with pytest.raises(flops.FlopsError, match="only for token models"):
        flops.flops_per_byte(tiny_config("transformer_byte_tiny"), 512, bytes_per_token=4.0)


@pytest.mark.parametrize("family_name", flops.family_names())
def test_family_members_are_compute_matched(family_name):
    family = flops.load_family(family_name)
    assert family.members[0].name == "hnet_1stage"
    for member in family.members:
        assert abs(family.ratio(member) - 1) <= FAMILY_TOLERANCE, (member.name, family.ratio(member))
        if not member.config.is_byte_model:  # BPE: same bytes per sequence
            assert member.seq_len == round(family.seq_len_bytes / member.bytes_per_token)


def test_cli_table_json_and_errors(capsys):
    assert flops.main([str(CONFIGS / "hnet_2stage_tiny.json"), "--seq-len", "512"]) == 0
    out = capsys.readouterr().out
    for row in ("stage0.encoder", "stage1.routing", "stage2.main", "stage0.dechunk", "lm_head", "training per byte"):
        assert row in out
    assert (
        flops.main([str(CONFIGS / "hnet_1stage_tiny.json"), "--seq-len", "512", "--bytes-per-chunk", "5", "--json"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["stage_lengths"] == pytest.approx([512, 102.4])
    assert report["training_per_byte"] == pytest.approx(3 * report["forward_per_byte"])
    assert flops.main(["--family", "tiny"]) == 0
    assert "transformer_bpe_tiny.json" in capsys.readouterr().out
    for argv in (
        [str(CONFIGS / "transformer_bpe_tiny.json")],
        [str(CONFIGS / "hnet_space_tiny.json")],
        [str(CONFIGS / "absent.json")],
        ["--family", "nope"],
        [],
    ):
        assert flops.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, argv
