import json
import math

import jax.numpy as jnp
import numpy as np

import pytest

import hnet
from hnet import config as config_lib
from hnet import param_report
from hnet.chunking import RATE_UNIT, CapacityRule, capacity_is_exact, stage_lengths
from conftest import CONFIGS

PUBLISHED = ["hnet_1stage_L", "hnet_1stage_XL", "hnet_2stage_L", "hnet_2stage_XL"]


# families.json describes compute-matched config families; tests/core/test_flops.py checks it.
MODEL_AND_RUN_CONFIGS = [p for p in sorted(CONFIGS.glob("*.json")) if p.name != "families.json"]


@pytest.mark.parametrize("path", MODEL_AND_RUN_CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    data = json.loads(path.read_text())
    if "arch_layout" not in data:  # a run config: it names a model config
        from hnet.training.run_config import load_run_config

        config = load_run_config(path).model_config
    else:
        config = hnet.load_config(path)
    assert len(config.d_model) == config.depth + 1


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configs_keep_their_fields(name):
    data = json.loads((CONFIGS / f"{name}.json").read_text())
    assert set(data) == {
        "arch_layout",
        "d_model",
        "d_intermediate",
        "vocab_size",
        "ssm_cfg",
        "attn_cfg",
        "tie_embeddings",
    }
    config = hnet.load_config(CONFIGS / f"{name}.json")
    assert list(config.d_model) == data["d_model"]
    assert config.routing == ("learned",) * config.depth
    assert config.target_ratio == ((6.0,) if config.depth == 1 else (3.0, 3.0))


BASE = {
    "arch_layout": ["m1", ["T1"], "m1"],
    "d_model": [64, 96],
    "d_intermediate": [0, 128],
    "attn_cfg": {"num_heads": [2, 2], "rotary_emb_dim": [16, 16], "window_size": [15, -1]},
    "ssm_cfg": {"d_state": 8, "chunk_size": 16, "head_dim": 16},
}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"arch_layout": ["x1", ["T1"], "m1"]}, "unknown layer letter 'x'"),
        ({"arch_layout": ["m1", ["T1"]]}, "arch_layout"),
        ({"arch_layout": ["m1", ["T1"], "m1"], "d_model": [64, 96, 128]}, "d_model: expected 2 entries"),
        ({"d_intermediate": [0]}, "d_intermediate: expected 2 entries"),
        ({"d_model": [64, -96]}, "positive integers"),
        ({"attn_cfg": {"num_heads": [3, 2], "rotary_emb_dim": [16, 16], "window_size": [15, -1]}}, "does not divide"),
        (
            {"attn_cfg": {"num_heads": [2, 2], "rotary_emb_dim": [16], "window_size": [15, -1]}},
            "rotary_emb_dim: expected 2",
        ),
        ({"attn_cfg": {"num_heads": [2, 2], "rotary_emb_dim": [16, 16], "window_size": [0, -1]}}, "window_size[0]"),
        ({"ssm_cfg": {"d_state": 0}}, "ssm_cfg"),
        ({"target_ratio": [6, 3]}, "target_ratio: expected 1"),
        ({"target_ratio": [1]}, "must be > 1"),
        ({"routing": ["words"]}, "routing[0]"),
        ({"routing": ["stride:0"]}, "positive integer K"),
        ({"d_intermediate": [0, 0]}, "has MLP blocks"),
        ({"dtype": "float16"}, "dtype"),
        ({"unknown_field": 1}, "unknown field(s) unknown_field"),
    ],
)
def test_config_errors_are_clear(tmp_path, change, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**BASE, **change}))
    with pytest.raises(hnet.ConfigError) as err:
        hnet.load_config(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_json_and_missing_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(hnet.ConfigError, match="not valid JSON"):
        hnet.load_config(path)
    with pytest.raises(hnet.ConfigError, match="no such config file"):
        hnet.load_config(tmp_path / "absent.json")


def test_parameter_count_matches_hand_count(capsys):
    """transformer_byte_tiny: counted by hand from the layer definitions."""
    d, hidden, vocab, layers = 96, 384, 256, 4
    per_block = d + 3 * d * d + d * d + d + d * 2 * hidden + hidden * d
    expected = vocab * d + layers * per_block + d + d * vocab
    assert param_report.main([str(CONFIGS / "transformer_byte_tiny.json"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total_params"] == expected


def test_parameter_report_table(capsys):
    assert param_report.main([str(CONFIGS / "hnet_2stage_L.json")]) == 0
    out = capsys.readouterr().out
    for row in ("stage0.encoder", "stage1.routing", "stage2.main", "lm_head", "total"):
        assert row in out


def test_capacity_rule():
    config = hnet.load_config(CONFIGS / "hnet_1stage_L.json")
    rule = CapacityRule.for_stage(config, 0)
    assert rule.rate_units == math.ceil(2.0 / 6 * RATE_UNIT) and rule.burst == config.capacity_burst
    # Allowance of a one-document row: burst + ceil(8192 * rate) = 128 + 2732, rounded up to 128.
    assert rule.allowance(8191) == 128 + 2732
    assert rule.row_capacity(8192) == 2944
    assert stage_lengths(config, 8192) == [8192, 2944]
    assert rule.row_capacity(100) == 100  # never more than the input length
    # The allowance grows by the rate and is the same integer for ints and int32 arrays.
    positions = np.arange(0, 200_000, 997)
    np.testing.assert_array_equal(
        np.asarray(rule.allowance(jnp.asarray(positions, jnp.int32))), [rule.allowance(int(u)) for u in positions]
    )
    assert all(np.diff([rule.allowance(int(u)) for u in positions]) >= 0)
    exact = config_lib.replace(config, capacity_slack="exact")
    assert capacity_is_exact(exact) and CapacityRule.for_stage(exact, 0).row_capacity(8192) == 8192
    assert capacity_is_exact(config_lib.replace(config, capacity_slack=6))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("capacity_slack", 0.5, "capacity_slack: expected a number >= 1 or 'exact'"),
        ("capacity_slack", "tight", "capacity_slack: expected a number >= 1 or 'exact'"),
        ("capacity_burst", -1, "capacity_burst"),
        ("bos_id", 256, "bos_id: expected an id below vocab_size 256"),
    ],
)
def test_capacity_and_bos_fields_are_checked(field, value, message):
    config = hnet.load_config(CONFIGS / "hnet_1stage_tiny.json")
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.replace(config, **{field: value})


def test_bos_id_defaults_by_vocabulary():
    assert hnet.load_config(CONFIGS / "hnet_1stage_tiny.json").bos_id == hnet.BOS_ID == 254
    assert hnet.load_config(CONFIGS / "transformer_bpe_tiny.json").bos_id == 0  # hnet.io.tokenizer's <|bos|>


def test_run_config_model_override_replaces_the_model_section():
    from hnet.training.run_config import load_run_config

    run = load_run_config(
        None, ['model={"config": "transformer_bpe_tiny.json"}', 'data.tokenizer={"vocab_size": 4096}']
    )
    assert run.model_config.vocab_size == 4096 and run.model_config.depth == 0
    assert run.train.seq_len == load_run_config(None).train.seq_len  # the rest of the run config is kept


def test_run_config_overrides_reach_any_depth():
    from hnet.training.run_config import load_run_config

    base = load_run_config(None)
    run = load_run_config(None, ["model.attn_cfg.num_heads=[4,4]", "model.ssm_cfg.d_state=64", "train.lr=1e-3"])
    config = run.model_config
    assert config.attn_cfg.num_heads == (4, 4) and config.ssm_cfg.d_state == 64 and run.train.lr == 1e-3
    # The rest of each nested object is kept.
    assert config.attn_cfg.window_size == base.model_config.attn_cfg.window_size
    assert config.ssm_cfg.head_dim == base.model_config.ssm_cfg.head_dim
    # A nested object the config file does not have is created.
    run = load_run_config(
        None,
        [
            'model={"config": "transformer_bpe_tiny.json"}',
            'data.tokenizer={"vocab_size": 4096}',
            "model.ssm_cfg.d_state=16",
        ],
    )
    assert run.model_config.ssm_cfg.d_state == 16


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.attn_cfg.nonsense=1", r"unknown key model\.attn_cfg\.nonsense \(known: num_heads, num_kv_heads"),
        ("model.ssm_cfg.d_state.x=1", r"model\.ssm_cfg\.d_state is a value, not an object"),
        ("train.lr.x=1", r"train\.lr is a value"),
        ("mesh.nonsense.deeper=1", r"unknown key mesh\.nonsense "),
        ("model.attn_cfg.num_heads=[5,5]", r"attn_cfg\.num_heads\[0\] = 5 does not divide d_model\[0\] = 128"),
        ("model.ssm_cfg.d_state=0", r"ssm_cfg: expected positive integers"),
        ("train..lr=1", r"key must be model\.X"),
        ('train.slot_residuals="drop"', r"train\.slot_residuals: expected one of \('auto', 'keep', 'recompute'\)"),
        ('train.compile_cache=" "', r'train\.compile_cache: expected "auto", "run", "none" or a folder'),
        ("train.compile_cache=0", r"train\.compile_cache: expected a string"),
    ],
)
def test_nested_override_errors_name_the_path(override, message):
    from hnet.training.run_config import load_run_config

    with pytest.raises(config_lib.ConfigError, match=message):
        load_run_config(None, [override])


def test_nested_override_error_is_one_line_on_the_command_line(capsys):
    import train as train_cli

    assert train_cli.main(["--set", "model.attn_cfg.heads=[4,4]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "model.attn_cfg.heads" in err and "\n" not in err
