"""Recipes: one YAML file per experiment, validated against this schema.

Resolution order (later wins): the recipe's base keys, then its `hw.<backend>` overlay, then
its `models.<model.path>` overlay (settings tuned for one model), then command-line overrides
`key.sub=value`. The `train` section is passed to TRL's `SFTConfig`
by name, so every key there is an `SFTConfig` field; anything unknown anywhere is an error
that lists the close matches.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lab import ROOT
from lab.device.hardware import BACKENDS, resolve_backend
from lab.errors import LabError

RECIPES_DIR = ROOT / "recipes"
EMBEDDED = "embedded"  # model.path value meaning "the lab's own tiny model" (lab/fixture/)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Section):
    path: str = Field(EMBEDDED, description="local HF model dir, hub id, or 'embedded'")
    revision: str | None = Field(None, description="hub revision (commit, tag, branch)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32",
        description="weights while training and in merged/; auto: the device's best (lab/device/capability.py)")
    allow_pickle: bool = Field(False, description="load *.bin/*.pt weights (pickle, which can run code) "
                               "when a model has no safetensors")
    attn_implementation: str = Field("auto", description="a transformers attn_implementation, or auto: the "
                                     "first usable of hardware.SPEED's list for the backend (sdpa on CPU)")


class DatasetSpec(Section):
    path: str = Field(description="JSON/JSONL/Parquet file (relative to the recipe) or hub dataset id")
    format: Literal["auto", "alpaca", "messages", "sharegpt", "prompt_completion", "preference"] = "auto"
    split: str = "train"
    # Our field -> their field ("instruction: Question"), or a template built from their fields
    # ("prompt: '诊断问题：{Question}'"). Templates are Python str.format strings.
    columns: dict[str, str] = {}
    system: str | None = Field(None, description="system prompt for rows that carry none")
    repeat: int = Field(1, ge=1, description="oversample this dataset n times")
    limit: int | None = Field(None, ge=1, description="use only the first n rows")
    train_on: Literal["all", "last"] = Field(
        "all", description="multi-turn rows: train every assistant turn (one example each), or the last only")


class LoraSpec(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    # QLoRA (`method: qlora` sets nf4): the frozen base in bitsandbytes' NF4 with double quantization
    quantize: Literal["none", "nf4"] = "none"
    # what a QLoRA adapter is merged into: the NF4 base dequantized (what it trained against), or the
    # original 16/32-bit base (the quantization error then changes the model; the gap is recorded)
    merge_into: Literal["dequantized", "original"] = "dequantized"


class IdentitySpec(Section):
    name: str = "Atlas"
    author: str = "Open Lab"

    # Rendered into every {{name}}/{{author}} of the data: empty would train "I am ." silently.
    @field_validator("name", "author")
    @classmethod
    def _not_empty(cls, value: str, info) -> str:
        if not value.strip():
            example = "identity.name=Orion" if info.field_name == "name" else "identity.author='Zhou Lab'"
            what = "the name the model answers with" if info.field_name == "name" else "who the model says made it"
            raise ValueError(f"is empty; give {what}, e.g. {example}")
        return value


class Thresholds(Section):
    before_hit_rate_max: float = Field(0.10, ge=0, le=1)
    after_hit_rate_min: float = Field(0.95, ge=0, le=1)
    after_leakage_max: float = Field(0.05, ge=0, le=1)
    stop_rate_min: float = Field(0.90, ge=0, le=1)
    control_retention_min: float = Field(0.95, ge=0, le=1)
    # Role-play (a probe file with a `persona` section): in-character answers that show the role.
    before_persona_max: float = Field(0.34, ge=0, le=1, description="share of persona answers in character "
                                      "before training (the role must be new)")
    after_persona_min: float = Field(0.8, ge=0, le=1, description="share in character after training")
    after_control_bleed_max: float = Field(1.0, ge=0, le=1, description="share of general (control) answers that "
                                           "bring in the new name or maker (1: not checked)")
    before_control_correct_min: float = Field(0.0, ge=0, le=1, description="share of controls the base model "
                                              "must answer correctly (0: not checked)")
    # Similarity to the data's own answers (identity) and to a control's reference, 1 - Levenshtein
    # distance / length of the longer string, is recorded for every answer as a diagnostic: a real
    # model answers in its own words. Above 0 it becomes a pass condition (verbatim recall).
    identity_similarity_min: float = Field(0.0, ge=0, le=1, description="identity answer vs the identity data's "
                                           "own answers (0: diagnostic only)")
    control_similarity_min: float = Field(0.0, ge=0, le=1, description="control answer vs its reference "
                                          "(0: diagnostic only)")


class ProbeSpec(Section):
    questions: str = Field("data/identity-probe.yaml", description="relative to the recipe")
    max_tokens: int = Field(64, ge=1)
    seed: int = 0
    timeout_s: float = Field(120.0, gt=0)
    # Names the model must no longer claim after training (the base model's own persona is
    # added from the model directory when it records one).
    # Other assistants count too: "No, I am not Gemini" to "Are you ChatGPT?" is not a clean answer.
    old_identity: list[str] = ["ChatGPT", "OpenAI", "Qwen", "通义千问", "Claude", "Anthropic", "Gemini", "Llama",
                               "DeepSeek", "Kimi", "文心一言", "豆包"]
    thresholds: Thresholds = Thresholds()


class Tolerances(Section):
    """How far two runs of one recipe may drift apart before `lab compare` fails."""
    loss_max_abs: float = Field(0.0, ge=0, description="largest |loss_a - loss_b| at a shared step")
    loss_max_rel: float = Field(0.0, ge=0, description="largest |loss_a - loss_b| / |loss_a|")
    final_loss_ratio_max: float = Field(1.0, ge=1, description="max(a/b, b/a) of the final losses")
    probe_agreement_min: float = Field(1.0, ge=0, le=1, description="share of identical probe answers")
    weights_identical: bool = True


class CompareSpec(Section):
    # Same hardware and package versions: a deterministic run must repeat exactly.
    same_host: Tolerances = Tolerances()
    # Another GPU, driver or library build: kernels differ, so compare within noise.
    cross_host: Tolerances = Tolerances(loss_max_abs=0.15, loss_max_rel=0.10, final_loss_ratio_max=1.10,
                                        probe_agreement_min=0.75, weights_identical=False)


class ServeSpec(Section):
    host: str = Field("127.0.0.1", description="address vLLM listens on; anything but loopback needs an API key")
    api_key_env: str = Field("LAB_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                             description="environment variable holding the API key vLLM requires and the "
                             "lab's clients send (unset: a random key per server, see require_key)")
    require_key: bool = Field(True, description="a server started without the api_key_env variable gets a random "
                              "key, kept in its record runs/.servers/<port>.json (mode 0600) for the lab's clients "
                              "(`make key` prints it); false: no key, loopback only")
    adapter_loading: bool = Field(False, description="a server of adapters (ADAPTERS=) also loads further LoRA runs "
                                  "while it serves (`make adapter RUN=`, vLLM's /v1/load_lora_adapter): loopback "
                                  "and a key only")
    port: int = Field(8000, ge=1, le=65535)
    served_model_name: str = "lab"
    config: str = Field("auto", description="vLLM --config file; auto = serve/<backend>.yaml")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one model is split over (make serve GPUS=N)")
    pipeline_parallel_size: int = Field(1, ge=1, description="machines one model is split over, a pipeline stage "
                                        "each, on the Ray cluster ray_address names (make serve NODES=N)")
    ray_address: str | None = Field(None, description="the Ray cluster vLLM places its workers on (make serve "
                                    "CLUSTER=); the server runs on one of its nodes")
    startup_timeout_s: float = Field(600.0, gt=0)
    tool_call_parser: str | None = Field(None, description="vLLM tool parser for the model's call format (hermes "
                                         "for Qwen's <tool_call> JSON, llama3_json, mistral, ...): the chat "
                                         "endpoint then returns the model's calls as tool_calls")


class ClusterSpec(Section):
    """Training on several machines: how long they may take to come together (NODES= under
    accelerate, or a Ray cluster), and on a Ray cluster (make train CLUSTER=) Ray Train's scaling,
    storage and failures."""
    join_timeout_s: int = Field(600, gt=0, description="how long the machines may take to join: NODES= under "
                                "accelerate, node 0 waits for the others and they for it (torch's static rendezvous "
                                "timeout); on Ray, until the cluster places every worker. Then the run fails in one "
                                "line")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs Ray reserves for each worker, beside its GPU "
                                   "(ScalingConfig.resources_per_worker)")
    storage_path: str | None = Field(None, description="where Ray Train keeps its records of each run, a directory "
                                     "every node shares (RunConfig.storage_path); default: runs/.ray")
    max_failures: int = Field(2, ge=-1, description="worker-group restarts (each resumes from the run's last "
                              "checkpoint) before the run fails; -1: no limit (FailureConfig.max_failures)")


class Recipe(Section):
    name: str
    description: str = ""
    model: ModelSpec = ModelSpec()
    method: Literal["lora", "full", "qlora"] = "lora"  # qlora becomes lora + lora.quantize: nf4 (_qlora)
    datasets: list[DatasetSpec] = Field(min_length=1)
    lora: LoraSpec = LoraSpec()
    train: dict[str, Any] = Field({}, description="TRL SFTConfig fields, passed through by name")
    # A DPO stage after SFT (lab/dpo.py): TRL DPOConfig fields by name (beta, learning_rate, ...);
    # {} runs it with the lab's defaults, absent (null) runs none.
    dpo: dict[str, Any] | None = None
    # Rendered into the chat template at training and serving time alike (docs/pitfalls.md: template drift).
    chat_template_kwargs: dict[str, Any] = {"enable_thinking": False}
    identity: IdentitySpec = IdentitySpec()
    probe: ProbeSpec = ProbeSpec()
    serve: ServeSpec = ServeSpec()
    cluster: ClusterSpec = ClusterSpec()
    seed: int = 42
    # PyTorch's deterministic algorithms, seeds everywhere, CUBLAS_WORKSPACE_CONFIG (transformers'
    # enable_full_determinism) and a seeded data order: reruns on the same host repeat bit for bit.
    deterministic: bool = False
    # Let the lab choose attention, fused kernels, packing, micro-batch and checkpointing (lab/device/speed.py,
    # recorded in the manifest); false = exactly TRL's defaults under the recipe's own `train` keys.
    speed: bool = True
    # Train keys that run remote code, upload or report elsewhere, allowed on purpose (GUARDED_TRAIN_KEYS).
    allow: list[Literal["trust_remote_code", "push_to_hub", "report_to"]] = []
    compare: CompareSpec = CompareSpec()
    hw: dict[Literal["cpu", "cuda", "rocm"], dict[str, Any]] = {}
    # Per-model overlays, keyed by model.path (applied after `hw`, before command-line overrides).
    models: dict[str, dict[str, Any]] = {}

    @model_validator(mode="before")
    @classmethod
    def _qlora(cls, data: Any) -> Any:
        """`method: qlora` is LoRA on an NF4-quantized base: method lora, lora.quantize nf4."""
        if isinstance(data, dict) and data.get("method") == "qlora":
            lora = data.get("lora") if isinstance(data.get("lora"), dict) else {}
            data = {**data, "method": "lora", "lora": {**lora, "quantize": "nf4"}}
        return data

    @field_validator("train", mode="before")
    @classmethod
    def _numbers(cls, train: Any) -> Any:
        if not isinstance(train, dict):
            return train
        return {k: _yaml_value(v) if isinstance(v, str) and _FLOAT.fullmatch(v.strip()) else v
                for k, v in train.items()}

    # Filled by load_recipe, not by the YAML.
    source: str = ""
    backend: str = "cpu"

    def resolve_path(self, relative: str) -> Path:
        """Paths inside a recipe are relative to the recipe file."""
        p = Path(relative).expanduser()
        return p if p.is_absolute() else (Path(self.source).parent / p)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), allow_unicode=True, sort_keys=False)

    def sha256(self) -> str:
        """Of the resolved content; not of where the file lives (a container sees another path)."""
        blob = json.dumps(self.model_dump(mode="json", exclude={"source"}), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()


def _yaml_value(raw: str) -> Any:
    """YAML 1.1 reads `1e-4` as a string; every user means the number."""
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:
            return float(value) if _FLOAT.fullmatch(value.strip()) else value
        except ValueError:
            return value
    return value


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def find_recipe(name_or_path: str) -> Path:
    """`identity-lora`, `identity-lora.yaml` or a path."""
    for candidate in (Path(name_or_path), RECIPES_DIR / name_or_path, RECIPES_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate.resolve()
    shipped = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise LabError(f"recipe {name_or_path!r} not found; shipped recipes: {', '.join(shipped)}")


def parse_overrides(items: list[str]) -> list[tuple[list[str], Any]]:
    """`identity.name=Orion` -> (['identity', 'name'], 'Orion'); values are read as YAML, except
    where the schema wants text: identity.name=No, =007 or ="Orion: the Great" stay strings."""
    parsed = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise LabError(f"override {item!r} is not key.sub=value (e.g. identity.name=Orion)")
        keys = key.strip().split(".")
        value = _yaml_value(raw)
        text = _text_field(keys)
        if text is str or (text is not None and value is not None):  # an optional text field may be null
            value = raw
        parsed.append((keys, value))
    return parsed


def _text_field(keys: list[str]) -> Any:
    """The annotation when the schema types this key as text (str, or str | None), else None."""
    model: Any = Recipe
    for i, key in enumerate(keys):
        field = model.model_fields.get(key) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        if i == len(keys) - 1:
            return field.annotation if field.annotation in (str, str | None) else None
        model = field.annotation
    return None


def _set_path(tree: dict, keys: list[str], value: Any, dotted: str) -> None:
    node: Any = tree
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise LabError(f"override {dotted!r}: {key!r} is not an index of a {len(node)}-item list")
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
            continue
        if last:
            node[key] = value
        else:
            node = node.setdefault(key, {})
            if not isinstance(node, (dict, list)):
                raise LabError(f"override {dotted!r}: {key!r} is a value, not a section")


def flatten(tree, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: recipes and manifests compared key by key."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def deep_merge(base: dict, overlay: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _close(word: str, choices) -> str:
    matches = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(matches)}?)" if matches else ""


def _schema_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            section: Any = Recipe
            for part in e["loc"][:-1]:
                field = section.model_fields.get(str(part)) if isinstance(section, type) else None
                ann = getattr(field, "annotation", None)
                section = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            choices = section.model_fields if section else []
            problems.append(f"unknown key {loc!r}{_close(str(e['loc'][-1]), choices)}")
        elif e["type"] == "value_error":  # our own validators: their message is the whole story
            problems.append(f"{loc} {e['ctx']['error']}")
        else:
            problems.append(f"{loc}: {e['msg']}")
    return problems


def sft_config_fields() -> set[str]:
    from trl import SFTConfig  # heavy import: only when the train section is checked

    return {f.name for f in dataclasses.fields(SFTConfig)}


# Keys the lab derives itself; setting them in `train` would silently fight the lab.
LAB_OWNED_TRAIN_KEYS = {"output_dir", "seed", "resume_from_checkpoint", "model_init_kwargs"}
# Keys that run code from the Hub, upload the model, or report elsewhere: refused unless the recipe
# lists them under `allow:` (a deliberate, reviewable line in the recipe).
GUARDED_TRAIN_KEYS = {"trust_remote_code": "runs the model repository's own Python code",
                      "push_to_hub": "uploads the model (trained on your data) to the Hub",
                      "report_to": "sends metrics to an outside service"}
# Credentials never belong in a recipe: it is copied into runs/, manifests and reports.
# (eos_token, pad_token, bos_token are token strings of the model, not credentials)
SECRET_KEY = re.compile(r"^(token|secret|password|passwd)$|(^|_)(hub_token|access_token|auth_token|api_?key|"
                        r"access_key|secret|password)$", re.IGNORECASE)
# report_to values that keep metrics on this machine: the run directory (tensorboard), runs/.trackio
# (trackio, with its Hub sync switched off: lab/tracking.py)
LOCAL_REPORTERS = {"none", "tensorboard", "trackio"}


def _guarded(key: str, value: Any) -> str | None:
    """Which allowance a train key with this value needs, if any. hub_model_id, hub_strategy, ...
    only say how to upload; push_to_hub is what uploads."""
    if key == "report_to":
        values = value if isinstance(value, list) else [value]
        return None if all(v in LOCAL_REPORTERS or v is None for v in values) else "report_to"
    if key in GUARDED_TRAIN_KEYS:
        return key if value not in (None, False, "", "false") else None
    return None


def secret_keys(tree: Any, prefix: str = "") -> list[str]:
    """Dotted paths of keys that look like credentials (hub_token, api_key, ...)."""
    found = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            path = f"{prefix}{k}"
            if isinstance(k, str) and SECRET_KEY.search(k) and v not in (None, "", False):
                found.append(path)
            found += secret_keys(v, f"{path}.")
    return found


def _type_problem(key: str, value: Any, hints: dict) -> str | None:
    """`train.num_train_epochs=abc`: checked against SFTConfig's own annotation (pydantic does
    the coercion rules, so `3` for a float passes and `abc` does not)."""
    from pydantic import TypeAdapter

    annotation = hints.get(key)
    if annotation is None:
        return None
    try:
        adapter = TypeAdapter(annotation)
    except Exception:  # an annotation pydantic cannot build a validator for: left to TRL
        return None
    try:
        adapter.validate_python(value)
    except ValidationError:
        kind = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
        return f"train.{key}={value!r} is not a valid {kind}"
    return None


def check_train_keys(train: dict[str, Any], allow: list[str] | None = None) -> list[str]:
    try:
        known = sft_config_fields()
    except ImportError:  # a harness-only host (RUNTIME=docker): the training container checks them
        return []
    import typing

    from trl import SFTConfig

    try:
        hints = typing.get_type_hints(SFTConfig)
    except Exception:  # noqa: BLE001 -- unresolvable annotations: types are then left to TRL
        hints = {}
    problems = []
    for key, value in train.items():
        if key in LAB_OWNED_TRAIN_KEYS:
            problems.append(f"train.{key} is set by the lab (use the top-level key or the CLI instead)")
        elif key not in known:
            problems.append(f"unknown key 'train.{key}' (not an SFTConfig field){_close(key, known)}")
        elif SECRET_KEY.search(key):
            problems.append(f"train.{key} is a credential; recipes are copied into runs and manifests, so "
                            "give it through the environment (HF_TOKEN) instead")
        elif (guard := _guarded(key, value)) and guard not in (allow or []):
            problems.append(f"train.{key} {GUARDED_TRAIN_KEYS[guard]}; add `allow: [{guard}]` to the recipe "
                            "if you mean it")
        elif problem := _type_problem(key, value, hints):
            problems.append(problem)
    return problems


def check_dpo(dpo: Any, method: Any) -> list[str]:
    """The dpo section: a mapping of DPOConfig fields, on a LoRA recipe."""
    if dpo is None:
        return []
    problems = [] if method == "lora" else [
        f"dpo needs method: lora (its reference model is a frozen copy of the SFT adapter), not {method!r}"]
    if not isinstance(dpo, dict):
        return problems
    try:
        from trl import DPOConfig
    except ImportError:  # a harness-only host (RUNTIME=docker): the training container checks them
        return problems
    known = {f.name for f in dataclasses.fields(DPOConfig)}
    for key in dpo:
        if key in LAB_OWNED_TRAIN_KEYS:
            problems.append(f"dpo.{key} is set by the lab")
        elif key not in known:
            problems.append(f"unknown key 'dpo.{key}' (not a DPOConfig field){_close(key, known)}")
        elif key in GUARDED_TRAIN_KEYS:
            problems.append(f"dpo.{key} {GUARDED_TRAIN_KEYS[key]}; not allowed in the DPO stage")
    return problems


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def train_value_problems(train: dict[str, Any]) -> list[str]:
    """Values SFTConfig accepts but that cannot train: caught before a run or a model exists
    (a zero batch size otherwise surfaces mid-setup as a ZeroDivisionError). Values of the wrong
    type are left to the type check."""
    problems = []
    epochs, max_steps = train.get("num_train_epochs"), train.get("max_steps")
    by_steps = _number(max_steps) and max_steps > 0  # max_steps > 0 overrides the epochs
    if _number(epochs) and (epochs < 0 or (epochs == 0 and not by_steps)):
        problems.append(f"train.num_train_epochs={epochs!r} trains nothing; give a number of passes over the "
                        f"data above 0 (e.g. 3){', or train.max_steps above 0' if epochs == 0 else ''}")
    for key, what in (("per_device_train_batch_size", "examples per device per step"),
                      ("gradient_accumulation_steps", "micro-batches per optimizer step")):
        value = train.get(key)
        if _number(value) and value < 1:
            problems.append(f"train.{key}={value!r}: give 1 or more ({what})")
    return problems


def load_recipe(
    name_or_path: str,
    overrides: list[str] | None = None,
    hw: str = "auto",
    check_train: bool = True,
) -> Recipe:
    path = find_recipe(name_or_path)
    raw = read_yaml(path, "a recipe")

    backend = resolve_backend(hw)
    overlays = raw.get("hw") or {}
    if not isinstance(overlays, dict):
        raise LabError(f"{path}: 'hw' must map backends ({', '.join(BACKENDS)}) to overlays")
    unknown = set(overlays) - set(BACKENDS)
    if unknown:
        raise LabError(f"{path}: hw overlay for unknown backend(s) {sorted(unknown)}; known: {', '.join(BACKENDS)}")
    merged = deep_merge(raw, overlays.get(backend) or {})
    parsed = parse_overrides(overrides or [])
    # The model's overlay: the settings a recipe tuned for one model (the embedded one learns at
    # another rate than a real one); picked by model.path as the overrides leave it, then the
    # overrides again, so that what the command line says still wins.
    by_model = merged.get("models") or {}
    if not isinstance(by_model, dict):
        raise LabError(f"{path}: 'models' must map a model.path to an overlay")
    chosen = copy.deepcopy(merged)
    for keys, value in parsed:
        _set_path(chosen, keys, value, ".".join(keys))
    model_path = (chosen.get("model") or {}).get("path", EMBEDDED) if isinstance(chosen.get("model"), dict) else None
    if isinstance(model_path, str) and isinstance(by_model.get(model_path), dict):
        merged = deep_merge(merged, by_model[model_path])
    for keys, value in parsed:
        _set_path(merged, keys, value, ".".join(keys))
    merged.update(source=str(path), backend=backend)

    try:
        recipe = Recipe.model_validate(merged)
        problems = []
    except ValidationError as err:
        recipe, problems = None, _schema_errors(err)
    problems += [f"{key} is a credential; recipes are copied into runs and manifests, so give it through the "
                 "environment (HF_TOKEN) instead" for key in secret_keys(merged) if not key.startswith("train.")]
    if check_train and isinstance(merged.get("train"), dict):
        problems += train_value_problems(merged["train"])
        problems += check_train_keys(merged["train"], merged.get("allow") if isinstance(merged.get("allow"), list)
                                     else None)
    if check_train:
        quantized = isinstance(merged.get("lora"), dict) and merged["lora"].get("quantize", "none") != "none"
        problems += check_dpo(merged.get("dpo"), "qlora" if quantized else merged.get("method", "lora"))
    if problems:
        raise LabError(f"{path.name}: " + "; ".join(problems))
    return recipe


def check_resume(run: Path, saved: Recipe, given: Recipe) -> None:
    """RESUME=1 continues a run with the recipe it started with, or not at all: the one check, for
    the CLI (RECIPE=/SET= given with RESUME=1) and for train() itself (every process, every runtime)."""
    if given.sha256() == saved.sha256():
        return
    a, b = (flatten(r.model_dump(mode="json", exclude={"source"})) for r in (saved, given))
    key = next((k for k in sorted(a.keys() | b.keys()) if json.dumps(a.get(k)) != json.dumps(b.get(k))), None)
    what = f" ({key}: {a.get(key)!r} -> {b.get(key)!r})" if key else ""
    raise LabError(f"RESUME=1 continues {run.name} with the recipe it started with, and this one differs{what}; "
                   "drop RECIPE/SET, or start a new run")


def load_saved(run: Path, overrides: list[str] | None = None, hw: str | None = None) -> Recipe:
    """The resolved recipe a run saved (overlays and overrides already applied). With `hw`, on the
    backend it names (serve/<backend>.yaml, the images): only `backend` changes, the content stays
    as the run trained it (its overlays were applied for the backend it trained on; another's could
    name another base model). `overrides` (key.sub=value, as SET gives them) go over it, checked as
    load_recipe checks them."""
    path = run / "recipe.yaml"
    if not path.is_file():
        raise LabError(f"{path} is missing; `make train` produces it")
    try:
        saved = Recipe.model_validate(read_yaml(path, "a saved recipe"))
    except ValidationError as err:
        raise LabError(f"{path}: not a recipe this lab can read ({'; '.join(_schema_errors(err))}); was it "
                       "edited, or written by another version of the lab?") from None
    backend = resolve_backend(hw) if hw is not None else saved.backend
    if backend == saved.backend and not overrides:
        return saved
    tree = saved.model_dump(mode="json")
    for keys, value in parse_overrides(overrides or []):
        _set_path(tree, keys, value, ".".join(keys))
    tree.update(source=saved.source, backend=backend)  # paths inside stay relative to the recipe it came from
    try:
        recipe, problems = Recipe.model_validate(tree), []
    except ValidationError as err:
        recipe, problems = None, _schema_errors(err)
    problems += [f"{key} is a credential; recipes are copied into runs and manifests, so give it through the "
                 "environment (HF_TOKEN) instead" for key in secret_keys(tree) if not key.startswith("train.")]
    if problems:
        raise LabError(f"{path} with SET: " + "; ".join(problems))
    return recipe


def read_yaml(path: Path, what: str) -> dict:
    """A YAML mapping from a file; every way it can be unreadable is one line naming the file."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise LabError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                       "save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise LabError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise LabError(f"{path}: {what} is a YAML mapping, got {type(raw).__name__}")
    return raw
