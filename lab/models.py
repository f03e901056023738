"""Base models: where `model.path` points, as one local directory every stage can read.

`model.path` is `embedded` (the lab's own tiny model, lab/fixture.py), a local Hugging Face
model directory, or a hub id such as `Qwen/Qwen3-0.6B`. A hub id is resolved once, by
huggingface_hub's own `snapshot_download`, to its snapshot directory in the Hugging Face cache
(`$HF_HOME/hub/models--<org>--<name>/snapshots/<commit>/`), at `model.revision` (a branch, tag
or commit; default main). Every later stage (train, merge, serve, probe, reproduce) then reads
that one directory, so tokenizer files, weights and the commit are the same everywhere, and
`HF_HUB_OFFLINE=1` works from a populated cache. The commit is the snapshot directory's name.
"""

from __future__ import annotations

from pathlib import Path

from lab.errors import LabError
from lab.recipe import EMBEDDED
# Formats no stage of the lab reads: not worth downloading with the weights (the original
# checkpoints some repos keep beside the HF ones, other runtimes' exports).
IGNORE = ["*.gguf", "*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.ot", "*.tflite", "original/*"]


def is_local(path: str) -> bool:
    return Path(path).expanduser().exists()


def hub_snapshot(repo_id: str, revision: str | None = None) -> str:
    """The snapshot directory of a hub model in the HF cache, downloading it if it is not there.
    Every way this can fail becomes one line that names the id and what to do."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError,
                                            LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError:
        raise LabError(f"model {repo_id!r} is a hub id, and huggingface_hub is not installed here; "
                       "run `make setup`") from None
    at = f" at revision {revision!r}" if revision else ""
    try:
        try:
            return snapshot_download(repo_id, revision=revision, ignore_patterns=IGNORE)
        except (LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
            raise
        except OSError:  # the Hub unreachable (or offline) on a path huggingface_hub does not fall
            # back from by itself (a commit revision whose tree listing is not cached): the cache alone
            return snapshot_download(repo_id, revision=revision, ignore_patterns=IGNORE, local_files_only=True)
    except HFValidationError:
        raise LabError(f"model.path {repo_id!r} is neither a local directory nor a hub id (org/name); "
                       "check the path") from None
    except GatedRepoError:
        raise LabError(f"model {repo_id!r} is gated: accept its terms on its Hub page, then export HF_TOKEN "
                       "with a token of that account") from None
    except RevisionNotFoundError:
        raise LabError(f"model {repo_id!r} has no revision {revision!r}; give a branch, tag or commit "
                       "that exists (model.revision)") from None
    except RepositoryNotFoundError:
        raise LabError(f"model {repo_id!r}: no such repository on the Hub (a private one needs HF_TOKEN); "
                       "a local model.path must be an existing directory") from None
    except LocalEntryNotFoundError:  # offline, or the Hub unreachable, and not (completely) in the cache
        raise LabError(f"model {repo_id!r}{at} is not in the Hugging Face cache and the Hub cannot be reached "
                       "(HF_HUB_OFFLINE=1, or no network): download it once where the Hub answers "
                       f"(`hf download {repo_id}`) into this HF_HOME, or set model.path to a local "
                       "directory") from None
    except (HfHubHTTPError, OSError) as e:
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise LabError(f"model {repo_id!r}{at}: download failed ({detail}); check the network, "
                       "HF_ENDPOINT and free disk space") from None


def resolve_model(recipe) -> str:
    """The local directory of the recipe's base model (built, found or downloaded)."""
    return resolve(recipe.model.path, recipe.model.revision, recipe.model.allow_pickle)


def resolve(path: str, revision: str | None = None, allow_pickle: bool = False) -> str:
    if path == EMBEDDED:
        from lab.fixture import ensure_fixture

        return str(ensure_fixture())
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise LabError(f"model.path {path!r} is a file; give a model directory or a hub id")
        return check_model_dir(local.resolve(), allow_pickle)
    return check_model_dir(Path(hub_snapshot(path, revision)), allow_pickle)


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def check_model_dir(model: Path, allow_pickle: bool = False) -> str:
    """A Hugging Face model directory: a config and safetensors weights. Pickled weights can run
    code when loaded, so they are refused unless the recipe sets model.allow_pickle."""
    if not (model / "config.json").is_file():
        present = ", ".join(sorted(p.name for p in model.iterdir())[:5]) or "nothing"
        raise LabError(f"model directory {model} has no config.json (it holds {present}); give a Hugging Face "
                       "model directory: config.json, tokenizer files, *.safetensors")
    if any(model.glob("*.safetensors")):
        return str(model)
    pickled = sorted(p.name for pattern in PICKLE_WEIGHTS for p in model.glob(pattern))
    if pickled and not allow_pickle:
        raise LabError(f"model {model} has only pickle weights ({pickled[0]}), which can run code when loaded; "
                       "convert them to safetensors, or set model.allow_pickle=true if you trust the source")
    if not pickled:
        raise LabError(f"model directory {model} has no weights (*.safetensors); was the download or copy "
                       "complete?")
    return str(model)


def snapshot_commit(model_dir: str | Path) -> str | None:
    """The commit a hub snapshot directory was downloaded at (None for any other directory)."""
    p = Path(model_dir)
    return p.name if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--") else None
