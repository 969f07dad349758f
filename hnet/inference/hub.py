"""Published checkpoints in one call: hf://OWNER/NAME[@REVISION] wherever a checkpoint folder goes.

    python eval.py --checkpoint hf://cartesia-ai/hnet_2stage_XL --tasks piqa
    python generate.py --checkpoint hf://cartesia-ai/hnet_1stage_L --prompt "Once upon"
    hnet.load_model("hf://cartesia-ai/hnet_2stage_XL")      # this module's load_model

load_model(path, step) is hnet.inference.load.load_model (run and export folders) that also takes
hf://OWNER/NAME[@REVISION]; it lives here, above the converter, because the converter writes
export folders with the folder code (load, export). converted_folder(spec):
1. downloads the Hub model repository's state_dict file (.safetensors, or a torch file: .pt, .pth,
   .bin, .ckpt) and its config.json with huggingface_hub.snapshot_download, into the Hugging Face
   cache (HF_HUB_CACHE; with HF_HUB_OFFLINE=1 only that cache is read). A repository without a
   config.json uses configs/NAME.json of this repository (the reference's configs for the
   published models: hnet_1stage_L, hnet_2stage_XL, ...);
2. converts it once (hnet.inference.convert: strict, float32, the exact capacity setting) into an
   export folder in the hnet-jax cache, CACHE/hub/OWNER--NAME/COMMIT (CACHE = $HNET_DATA_DIR or
   ~/.cache/hnet-jax; COMMIT = the snapshot's commit, so a new revision converts anew), with a
   manifest of every file's sha256 (hnet.io.checkpoint);
3. later calls check that manifest and load the folder without converting. A folder that no
   longer matches its manifest is converted again, with a warning line.
Two processes converting at once each write a private folder and rename it into place
(data.shards.move_into_place); the first wins and the other's copy is removed.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from data.shards import PrepareError, cache_dir, make_sibling_dir, move_into_place
from hnet.errors import HNetError, LoadError
from hnet.inference.convert import convert
from hnet.inference.load import LoadedModel
from hnet.inference.load import load_model as load_folder
from hnet.io.checkpoint import check_manifest, write_manifest

PREFIX = "hf://"
STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")  # hnet.inference.convert reads these
BUNDLED_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def is_hub_path(path) -> bool:
    return str(path).startswith(PREFIX)


def parse(spec: str) -> tuple[str, str | None]:
    """'hf://OWNER/NAME[@REVISION]' -> (repo id, revision or None)."""
    repo_id, _, revision = spec[len(PREFIX) :].partition("@")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or (revision == "" and "@" in spec):
        raise LoadError(f"{spec}: expected hf://OWNER/NAME or hf://OWNER/NAME@REVISION")
    return repo_id, revision or None


def download(repo_id: str, revision: str | None) -> Path:
    """The repository's snapshot folder in the Hugging Face cache (state_dict files and JSON only)."""
    from huggingface_hub import snapshot_download

    patterns = [f"*{suffix}" for suffix in STATE_DICT_SUFFIXES] + ["config.json"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as err:  # offline and not cached, no such repository, the network: one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LoadError(f"hf://{repo_id}: cannot download ({type(err).__name__}: {first[:300]})") from None


def source_files(snapshot: Path, repo_id: str) -> tuple[Path, Path]:
    """-> (the state_dict file, the config) of a downloaded snapshot."""
    name = repo_id.split("/")[1]
    files = sorted(p for p in snapshot.iterdir() if p.suffix in STATE_DICT_SUFFIXES)
    if len(files) > 1:  # several: the one named after the repository
        files = [p for p in files if p.stem == name] or files
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "none"
        raise LoadError(
            f"hf://{repo_id}: expected one state_dict file ({', '.join(STATE_DICT_SUFFIXES)}), found {found}"
        )
    config = snapshot / "config.json"
    if not config.is_file():
        config = BUNDLED_CONFIGS / f"{name}.json"
        if not config.is_file():
            raise LoadError(f"hf://{repo_id}: the repository has no config.json and there is no configs/{name}.json")
    return files[0], config


def converted_folder(spec: str) -> Path:
    """The export folder of hf://OWNER/NAME[@REVISION]: downloaded and converted on first use, then
    checked against its manifest and reused."""
    repo_id, revision = parse(spec)
    snapshot = download(repo_id, revision)
    folder = cache_dir() / "hub" / repo_id.replace("/", "--") / snapshot.name
    if folder.is_dir():
        problem = check_manifest(folder)
        if problem is None:
            return folder
        print(f"warning: {folder}: {problem}; converting {spec} again", file=sys.stderr)
        shutil.rmtree(folder)
    checkpoint, config = source_files(snapshot, repo_id)
    staging = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = make_sibling_dir(folder, "converting")  # this process's own, removed below
        converted = convert(checkpoint, config, staging / folder.name)
        write_manifest(converted)
        try:
            move_into_place(converted, folder, overwrite=False)
        except PrepareError:  # another process converted it first: theirs is as good
            pass
    except HNetError as err:
        raise LoadError(f"{spec}: {err}") from None
    except OSError as err:
        raise LoadError(f"{spec}: cannot write the converted model under {folder.parent} ({err})") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_model(path: str | Path, step: int | None = None) -> LoadedModel:
    """A model from a run folder, an export folder, or hf://OWNER/NAME[@REVISION] (converted once)."""
    if is_hub_path(path):
        if step is not None:
            raise LoadError(
                f"{path}: a published checkpoint has no training steps to choose (--step is for run folders)"
            )
        return load_folder(converted_folder(str(path)))
    return load_folder(path, step)
