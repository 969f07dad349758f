"""Published checkpoints in one call (hnet.inference.hub): hf://OWNER/NAME is read from a Hugging
Face hub cache the test builds itself (offline, HF_HUB_OFFLINE=1; no network) out of the
reference's own tiny checkpoint, converted once into a checked cache folder, and loaded."""

import json
import shutil

import numpy as np
import pytest

import eval as eval_cli
import hnet
from conftest import ROOT
from hnet.errors import LoadError
from hnet.inference import hub

REFERENCE = ROOT / "tests" / "fixtures" / "reference" / "ci_1stage"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hub_repo(cache, repo_id, files, commit=COMMIT):
    """A model repository in huggingface_hub's cache layout: refs/main -> snapshots/<commit>/files."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, source in files.items():
        shutil.copyfile(source, snapshot / name)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An offline hub cache in tmp_path/hub and the hnet-jax cache in tmp_path/hnet."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HNET_DATA_DIR", str(tmp_path / "hnet"))
    return tmp_path / "hub"


def test_hf_checkpoint_is_converted_once_then_checked_and_loaded(offline_hub, tmp_path, monkeypatch, capsys):
    config = tmp_path / "config.json"  # the reference's config, computing in float32 to compare its logits
    config.write_text(json.dumps({**json.loads((REFERENCE / "config.json").read_text()), "dtype": "float32"}))
    files = {"model.safetensors": REFERENCE / "model.safetensors", "config.json": config}
    write_hub_repo(offline_hub, "goombalab-test/ci_1stage", files)
    loaded = hnet.load_model("hf://goombalab-test/ci_1stage")
    folder = tmp_path / "hnet" / "hub" / "goombalab-test--ci_1stage" / COMMIT
    assert loaded.path == folder and loaded.kind == "export" and (folder / "manifest.json").is_file()
    ids = np.load(REFERENCE / "input_ids.npy")
    logits = np.asarray(loaded.model(ids).logits)
    assert np.max(np.abs(logits - np.load(REFERENCE / "logits.npy"))) <= 5e-6  # the reference's own logits

    # A second call checks the folder against its manifest and does not convert again.
    convert = hub.convert

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(hub, "convert", no_conversion)
    assert hub.converted_folder("hf://goombalab-test/ci_1stage") == folder
    # eval.py takes it too, named after the repository.
    code = eval_cli.main(["--checkpoint", "hf://goombalab-test/ci_1stage", "--show-boundaries", "--text", "Hi there"])
    out = capsys.readouterr().out
    assert code == 0 and f"== {folder} (export" in out

    # A damaged file: one warning line, converted again.
    monkeypatch.setattr(hub, "convert", convert)
    (folder / "config.json").write_text((folder / "config.json").read_text().replace("256", "257"))
    assert hub.converted_folder("hf://goombalab-test/ci_1stage") == folder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {folder}: config.json") and "converting" in err[0]
    assert hub.check_manifest(folder) is None


def test_a_repository_without_config_uses_the_bundled_one(offline_hub):
    """The published repositories hold only NAME.pt; configs/NAME.json is the reference's config."""
    snapshot = write_hub_repo(offline_hub, "cartesia-ai/hnet_2stage_XL", {"hnet_2stage_XL.safetensors": __file__})
    checkpoint, config = hub.source_files(snapshot, "cartesia-ai/hnet_2stage_XL")
    assert checkpoint.name == "hnet_2stage_XL.safetensors" and config == ROOT / "configs" / "hnet_2stage_XL.json"


def test_hub_errors_are_one_line(offline_hub):
    with pytest.raises(LoadError, match=r"^hf://nobody/missing: cannot download \(LocalEntryNotFoundError: "):
        hub.converted_folder("hf://nobody/missing")
    for spec in ("hf://just-a-name", "hf://a/b/c", "hf://a/b@"):
        with pytest.raises(LoadError, match="expected hf://OWNER/NAME"):
            hub.parse(spec)
    assert hub.parse("hf://a/b@v1") == ("a/b", "v1")
    with pytest.raises(LoadError, match="--step is for run folders"):
        hub.load_model("hf://nobody/missing", step=3)
    write_hub_repo(offline_hub, "someone/no_config", {"weights.safetensors": REFERENCE / "model.safetensors"})
    with pytest.raises(LoadError, match="has no config.json and there is no configs/no_config.json"):
        hub.converted_folder("hf://someone/no_config")
    two_stages = REFERENCE.parent / "ci_2stage" / "config.json"  # a config the 1-stage file does not fit
    write_hub_repo(
        offline_hub, "someone/wrong", {"model.safetensors": REFERENCE / "model.safetensors", "config.json": two_stages}
    )
    with pytest.raises(LoadError, match=r"^hf://someone/wrong: model.safetensors does not fit config.json"):
        hub.converted_folder("hf://someone/wrong")
    left = offline_hub.parent / "hnet" / "hub" / "someone--wrong"
    assert not left.exists() or not list(left.iterdir())  # nothing left behind
