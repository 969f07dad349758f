"""Converting the published H-Net checkpoints (goombalab/hnet's HNetForCausalLM state_dicts).

Neither CI nor this machine can run the CUDA reference, so the reference side is described here
independently of hnet.inference.reference: `reference_shapes` lists the keys and shapes of the reference's
state_dict for a config, written from reading goombalab/hnet at 3673fe1 (models/mixer_seq.py,
models/hnet.py, modules/isotropic.py, modules/block.py, modules/mha.py, modules/mlp.py, modules/dc.py
and mamba_ssm's Mamba2). Synthetic files in that format, with a distinct value pattern per tensor,
check where each tensor lands.
"""

import importlib.util
import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import hnet
from hnet.inference import convert, reference
from hnet.inference.load import load_model
from conftest import ROOT

# Tiny configs in the reference's JSON format (its Mamba2 heads have 64 dims).
TINY_1STAGE = {
    "arch_layout": ["m1", ["T1"], "M1"],
    "d_model": [64, 96],
    "d_intermediate": [96, 160],
    "vocab_size": 256,
    "ssm_cfg": {"chunk_size": 16, "d_conv": 4, "d_state": 16, "expand": 2},
    "attn_cfg": {"num_heads": [2, 3], "rotary_emb_dim": [16, 16], "window_size": [31, -1]},
    "tie_embeddings": False,
}
TINY_2STAGE = {
    "arch_layout": ["m1", ["T1m1", ["T2"], "m1t1"], "m1"],
    "d_model": [64, 64, 128],
    "d_intermediate": [0, 96, 192],
    "vocab_size": 256,
    "ssm_cfg": {"chunk_size": 16, "d_conv": 4, "d_state": 16, "expand": 2},
    "attn_cfg": {"num_heads": [2, 2, 4], "rotary_emb_dim": [16, 16, 16], "window_size": [31, 31, -1]},
    "tie_embeddings": False,
}


def reference_shapes(cfg: dict) -> dict[str, tuple]:
    """{key: shape} of HNetForCausalLM(cfg).state_dict(), as the reference builds it."""
    shapes = {}
    d_model, d_mlp, ssm = cfg["d_model"], cfg["d_intermediate"], cfg["ssm_cfg"]
    vocab = cfg["vocab_size"]

    def mamba2(prefix, d):  # mamba_ssm Mamba2: headdim 64, ngroups 1, no in/out bias, rmsnorm gate
        d_inner = ssm["expand"] * d
        heads = d_inner // 64
        conv_dim = d_inner + 2 * ssm["d_state"]
        shapes[f"{prefix}.in_proj.weight"] = (2 * d_inner + 2 * ssm["d_state"] + heads, d)
        shapes[f"{prefix}.conv1d.weight"] = (conv_dim, 1, ssm["d_conv"])
        shapes[f"{prefix}.conv1d.bias"] = (conv_dim,)
        shapes[f"{prefix}.dt_bias"] = (heads,)
        shapes[f"{prefix}.A_log"] = (heads,)
        shapes[f"{prefix}.D"] = (heads,)
        shapes[f"{prefix}.norm.weight"] = (d_inner,)
        shapes[f"{prefix}.out_proj.weight"] = (d, d_inner)

    def isotropic(prefix, layout, stage):
        d, layer = d_model[stage], 0
        for letter, count in re.findall(r"([mMtT])(\d+)", layout):
            for _ in range(int(count)):
                block = f"{prefix}.layers.{layer}"
                shapes[f"{block}.norm1.weight"] = (d,)
                if letter in "mM":
                    mamba2(f"{block}.mixer", d)
                else:
                    shapes[f"{block}.mixer.Wqkv.weight"] = (3 * d, d)
                    shapes[f"{block}.mixer.out_proj.weight"] = (d, d)
                if letter.isupper():  # SwiGLU rounds its hidden size up to a multiple of 128
                    hidden = -(-d_mlp[stage] // 128) * 128
                    shapes[f"{block}.norm2.weight"] = (d,)
                    shapes[f"{block}.mlp.fc1.weight"] = (2 * hidden, d)
                    shapes[f"{block}.mlp.fc2.weight"] = (d, hidden)
                layer += 1
        shapes[f"{prefix}.rmsnorm.weight"] = (d,)

    def stage(prefix, layout, index):
        if len(layout) == 1:
            isotropic(f"{prefix}.main_network", layout[0], index)
        else:
            isotropic(f"{prefix}.encoder", layout[0], index)
            stage(f"{prefix}.main_network", layout[1], index + 1)
            isotropic(f"{prefix}.decoder", layout[2], index)
            d = d_model[index]
            shapes[f"{prefix}.routing_module.q_proj_layer.weight"] = (d, d)
            shapes[f"{prefix}.routing_module.k_proj_layer.weight"] = (d, d)
            shapes[f"{prefix}.residual_proj.weight"] = (d, d)
            shapes[f"{prefix}.residual_proj.bias"] = (d,)
        if index > 0 and d_model[index] > d_model[index - 1]:
            shapes[f"{prefix}.pad_dimension"] = (d_model[index] - d_model[index - 1],)

    shapes["embeddings.weight"] = (vocab, d_model[0])
    stage("backbone", cfg["arch_layout"], 0)
    shapes["lm_head.weight"] = (vocab, d_model[0])
    return shapes


def synthetic_state_dict(shapes: dict[str, tuple], dtype=np.float32) -> dict[str, np.ndarray]:
    """A distinct value pattern per tensor: tensor i holds i + (0, 1, 2, ...) / 2^20 (exact in float32)."""
    tensors = {}
    for i, (key, shape) in enumerate(sorted(shapes.items())):
        size = int(np.prod(shape))
        tensors[key] = (i + 1 + np.arange(size, dtype=np.float64) / 2**20).reshape(shape).astype(dtype)
    return tensors


def write_case(tmp_path, cfg: dict, name: str, tensors=None):
    config_path = tmp_path / f"{name}.json"
    config_path.write_text(json.dumps(cfg))
    tensors = synthetic_state_dict(reference_shapes(cfg)) if tensors is None else tensors
    file = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(file))
    return config_path, file, tensors


def flat_params(model) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.Param).to_pure_dict()
    return {
        ".".join(map(str, path)): np.asarray(value) for path, value in nnx.traversals.flatten_mapping(state).items()
    }


@pytest.mark.parametrize("cfg, name", [(TINY_1STAGE, "tiny1"), (TINY_2STAGE, "tiny2")])
def test_every_tensor_lands_where_it_should(tmp_path, cfg, name):
    config_path, file, tensors = write_case(tmp_path, cfg, name)
    out = convert.convert(file, config_path, tmp_path / "export")
    loaded = load_model(out)
    params = flat_params(loaded.model)
    assert loaded.config.capacity_slack == "exact"  # converted models never drop a boundary
    info = json.loads((out / "export.json").read_text())
    assert info["source"] == file.name and len(info["source_sha256"]) == 64

    # Spot checks of the mapping, written out by hand.
    np.testing.assert_array_equal(params["embedding.embedding"], tensors["embeddings.weight"])
    np.testing.assert_array_equal(params["lm_head.kernel"], tensors["lm_head.weight"].T)
    np.testing.assert_array_equal(
        params["backbone.encoder.blocks.0.mixer.conv_weight"],
        tensors["backbone.encoder.layers.0.mixer.conv1d.weight"][:, 0, :].T,
    )
    np.testing.assert_array_equal(
        params["backbone.encoder.blocks.0.mixer.in_proj.kernel"],
        tensors["backbone.encoder.layers.0.mixer.in_proj.weight"].T,
    )
    np.testing.assert_array_equal(
        params["backbone.encoder.blocks.0.mixer.A_log"], tensors["backbone.encoder.layers.0.mixer.A_log"]
    )
    np.testing.assert_array_equal(params["backbone.encoder.norm.weight"], tensors["backbone.encoder.rmsnorm.weight"])
    np.testing.assert_array_equal(
        params["backbone.routing.q_proj"], tensors["backbone.routing_module.q_proj_layer.weight"].T
    )
    np.testing.assert_array_equal(params["backbone.residual_proj.bias"], tensors["backbone.residual_proj.bias"])
    np.testing.assert_array_equal(
        params["backbone.pad_dimension"]
        if "backbone.pad_dimension" in params
        else params["backbone.inner.pad_dimension"],
        tensors["backbone.main_network.pad_dimension"]
        if "backbone.main_network.pad_dimension" in tensors
        else tensors["backbone.main_network.main_network.pad_dimension"],
    )
    inner = "backbone.inner" if name == "tiny1" else "backbone.inner.inner"
    ref_inner = "backbone.main_network" if name == "tiny1" else "backbone.main_network.main_network"
    np.testing.assert_array_equal(
        params[f"{inner}.main.blocks.0.mixer.wqkv.kernel"],
        tensors[f"{ref_inner}.main_network.layers.0.mixer.Wqkv.weight"].T,
    )
    np.testing.assert_array_equal(
        params[f"{inner}.main.blocks.0.mlp.fc2.kernel"], tensors[f"{ref_inner}.main_network.layers.0.mlp.fc2.weight"].T
    )

    # Every parameter holds exactly one file tensor (its integer part names which), all its values,
    # and every file tensor went somewhere.
    index_of = {key: i + 1 for i, key in enumerate(sorted(tensors))}
    used = []
    for path, value in params.items():
        owners = np.unique(np.floor(value))
        assert owners.size == 1, f"{path} mixes tensors {owners[:4]}"
        key = next(k for k, i in index_of.items() if i == owners[0])
        source = tensors[key]
        assert value.size == source.size, (path, key)
        np.testing.assert_array_equal(np.sort(value.ravel()), np.sort(source.ravel()), err_msg=f"{path} <- {key}")
        used.append(key)
    assert sorted(used) == sorted(tensors)


@pytest.mark.parametrize("cfg, name", [(TINY_1STAGE, "tiny1"), (TINY_2STAGE, "tiny2")])
def test_ours_to_reference_to_ours_is_bit_identical(tmp_path, cfg, name):
    config_path, file, _ = write_case(tmp_path, cfg, name)
    first = convert.convert(file, config_path, tmp_path / "first")
    assert convert.main(["--checkpoint", str(file), "--config", str(config_path), "--out", str(tmp_path / "x")]) == 0
    assert (
        hnet.inference.export.main(
            ["--checkpoint", str(first), "--out", str(tmp_path / "ref"), "--format", "reference"]
        )
        == 0
    )
    written = load_file(str(tmp_path / "ref" / "model.safetensors"))
    expected = reference_shapes(cfg)
    assert {k: v.shape for k, v in written.items()} == expected
    ref_config = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert ref_config == cfg
    second = convert.convert(
        tmp_path / "ref" / "model.safetensors", tmp_path / "ref" / "config.json", tmp_path / "second"
    )
    a, b = load_model(first), load_model(second)
    for (path, x), (_, y) in zip(sorted(flat_params(a.model).items()), sorted(flat_params(b.model).items())):
        np.testing.assert_array_equal(x, y, err_msg=path)
    assert a.config == b.config  # same parameters and config: the same model


def test_a_trained_model_exports_to_reference_and_back(tmp_path):
    """From one of our own models (residual_proj bias made non-zero): ours -> reference -> ours."""
    config = hnet.config.config_from_dict(dict(TINY_1STAGE, capacity_slack="exact"))
    model = hnet.build_model(config, seed=3)
    model.backbone.residual_proj.bias[...] = 0.1 * jax.random.normal(jax.random.key(0), (64,))
    _, params = nnx.split(model, nnx.Param)
    ours = hnet.inference.export.write_export(
        tmp_path / "ours", params, config, {"dtype": "float32", "source": "test", "step": 0}
    )
    hnet.inference.export.main(["--checkpoint", str(ours), "--out", str(tmp_path / "ref"), "--format", "reference"])
    back = load_model(
        convert.convert(tmp_path / "ref" / "model.safetensors", tmp_path / "ref" / "config.json", tmp_path / "back")
    )
    for (path, x), (_, y) in zip(sorted(flat_params(model).items()), sorted(flat_params(back.model).items())):
        np.testing.assert_array_equal(x, y, err_msg=path)


@pytest.mark.parametrize("name, total", [("hnet_1stage_L", 679_405_312), ("hnet_2stage_XL", 1_603_492_224)])
def test_published_sizes_have_the_reference_key_set_and_shapes(name, total):
    """What --format reference writes for the published configs (from the abstract model: nothing
    allocated) equals the reference's state_dict, key for key and shape for shape."""
    cfg = json.loads((ROOT / "configs" / f"{name}.json").read_text())
    expected = reference_shapes(cfg)
    assert sum(int(np.prod(s)) for s in expected.values()) == total
    config = convert.load_reference_config(ROOT / "configs" / f"{name}.json")
    _, abstract = hnet.inference.load.abstract_params(config)
    shapes = {
        ".".join(map(str, p)): v.shape for p, v in nnx.traversals.flatten_mapping(abstract.to_pure_dict()).items()
    }
    written = {t.key: reference.reference_shape(shapes[t.path], t.layout) for t in reference.parameter_table(config)}
    assert written == expected


def run_convert(*args):
    return subprocess.run(
        [sys.executable, "-m", "hnet.inference.convert", *map(str, args)], capture_output=True, text=True, cwd=ROOT
    )


def assert_refused(result, out, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_bad_files_give_one_error_line_and_write_nothing(tmp_path):
    config_path, file, tensors = write_case(tmp_path, TINY_1STAGE, "tiny1")
    out = tmp_path / "out"
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    assert_refused(run_convert("--checkpoint", truncated, "--config", config_path, "--out", out), out, "truncated")

    # A 1-stage file with a 2-stage config: keys missing and unexpected, named.
    config2 = tmp_path / "tiny2.json"
    config2.write_text(json.dumps(TINY_2STAGE))
    assert_refused(run_convert("--checkpoint", file, "--config", config2, "--out", out), out, "missing", "unexpected")

    # A wrong shape.
    bad = dict(tensors, **{"backbone.residual_proj.bias": np.zeros(63, np.float32)})
    _, bad_file, _ = write_case(tmp_path, TINY_1STAGE, "badshape", bad)
    assert_refused(
        run_convert("--checkpoint", bad_file, "--config", config_path, "--out", out), out, "backbone.residual_proj.bias"
    )

    # An existing destination is refused and left alone.
    out.mkdir()
    (out / "keep").write_text("mine")
    result = run_convert("--checkpoint", file, "--config", config_path, "--out", out)
    assert result.returncode == 2 and "already exists" in result.stderr
    assert (out / "keep").read_text() == "mine"


def test_a_torch_file_without_torch_names_the_extra(tmp_path):
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed here")
    config_path = tmp_path / "tiny1.json"
    config_path.write_text(json.dumps(TINY_1STAGE))
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"PK\x03\x04 not really")
    out = tmp_path / "out"
    assert_refused(run_convert("--checkpoint", pt, "--config", config_path, "--out", out), out, "hnet-jax[torch]")


def test_a_torch_file_with_pickled_config_objects(tmp_path):
    """The published .pt files pickle omegaconf objects besides the tensors; they are read without
    importing (or running) anything but torch. Runs where torch is installed (the [torch] extra)."""
    torch = pytest.importorskip("torch")
    config_path = tmp_path / "tiny1.json"
    config_path.write_text(json.dumps(TINY_1STAGE))
    tensors = synthetic_state_dict(reference_shapes(TINY_1STAGE))
    # A stand-in for omegaconf.DictConfig, in a module the converting process cannot import.
    module = type(sys)("fake_omegaconf")
    exec("class DictConfig:\n    def __init__(self, content):\n        self._content = content\n", module.__dict__)
    sys.modules["fake_omegaconf"] = module
    try:
        saved = {
            "model": {"module." + k: torch.from_numpy(v) for k, v in tensors.items()},
            "config": module.DictConfig({"lr": 1e-3}),
            "step": 7,
        }
        torch.save(saved, tmp_path / "model.pt")
    finally:
        del sys.modules["fake_omegaconf"]
    result = run_convert("--checkpoint", tmp_path / "model.pt", "--config", config_path, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    params = flat_params(load_model(tmp_path / "out").model)
    np.testing.assert_array_equal(params["lm_head.kernel"], tensors["lm_head.weight"].T)


def test_an_export_written_before_the_residual_bias_still_loads(tmp_path):
    """residual_proj.bias came with the reference conversion; older exports lack it and load with
    zeros, which is what the model computed before."""
    import orbax.checkpoint as ocp

    config = hnet.config.config_from_dict(dict(TINY_1STAGE, capacity_slack="exact"))
    model = hnet.build_model(config, seed=1)
    _, params = nnx.split(model, nnx.Param)
    out = hnet.inference.export.write_export(
        tmp_path / "new", params, config, {"dtype": "float32", "source": "test", "step": 0}
    )
    old = tmp_path / "old"
    old.mkdir()
    for name in ("config.json", "export.json"):
        (old / name).write_text((out / name).read_text())
    model.backbone.residual_proj.bias = None  # the parameter tree as it was before the bias
    _, old_params = nnx.split(model, nnx.Param)
    ocp.PyTreeCheckpointer().save((old / "params").absolute(), old_params)
    loaded = load_model(old)
    assert not np.any(np.asarray(loaded.model.backbone.residual_proj.bias[...]))
    assert hnet.inference.export.main(["--checkpoint", str(old), "--out", str(tmp_path / "renewed")]) == 0
    np.testing.assert_array_equal(
        np.asarray(loaded.model.backbone.residual_proj.kernel[...]),
        np.asarray(model.backbone.residual_proj.kernel[...]),
    )
