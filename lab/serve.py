"""Serve: a real vLLM OpenAI-compatible server, started, health-checked and stopped by the lab.

vLLM lives in its own virtual environment (it pins other transformers versions than
training, as the containers will too), so the server is a subprocess of that environment's
Python. Flags come from serve/<backend>.yaml through vLLM's own `--config`; the lab adds only
what depends on the run: model path, name, address, chat-template kwargs. The waiting follows
vLLM's test harness (RemoteOpenAIServer): poll /health, with two distinct failure messages.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from lab import ROOT
from lab.errors import LabError
from lab.recipe import Recipe
from lab.servers import claim, process_started, stop_process_group, wait_healthy, write_record


def serve_python() -> str:
    python = os.environ.get("LAB_SERVE_PYTHON") or str(ROOT / ".venv" / "serve" / "bin" / "python")
    if not Path(python).is_file():
        raise LabError(f"vLLM environment not found at {python}; run `make setup`, or set LAB_SERVE_PYTHON to "
                       "a vLLM install's Python (ROCm: RUNTIME=docker serves from the vLLM ROCm image)")
    return python


def serve_config(recipe: Recipe) -> Path:
    name = recipe.serve.config
    path = ROOT / "serve" / f"{recipe.backend}.yaml" if name == "auto" else ROOT / Path(name).expanduser()
    if not path.is_file():
        raise LabError(f"vLLM config {path} does not exist")
    return path


def serve_env(recipe: Recipe, key: str | None) -> dict[str, str]:
    """serve/<backend>.env (the serve containers' env_file too) under the caller's environment, with
    vLLM's key set to the server's: the server requires exactly the key the lab's clients send."""
    from lab.containers import read_env_file

    path = ROOT / "serve" / f"{recipe.backend}.env"
    env = {**parallel_env(recipe), **(read_env_file(path) if path.is_file() else {}), **os.environ}
    # serve/keyguard.py, the key on every path (engine_args), importable by vLLM's Python
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "serve"), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("VLLM_API_KEY", None)
    if key:
        env["VLLM_API_KEY"] = key  # in the environment, not argv: `ps` shows argv to every user
    return env


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def api_key(recipe: Recipe, url: str | None = None) -> str | None:
    """The key the lab's clients send to `url`: the environment variable the recipe names
    (LAB_API_KEY by default), else the key the lab generated for its own server there."""
    from lab.servers import recorded_key

    return os.environ.get(recipe.serve.api_key_env) or (recorded_key(url) if url else None)


def server_key(recipe: Recipe) -> tuple[str | None, bool]:
    """The key a new server requires, and whether the lab generated it (kept in the server's
    record, mode 0600, for the lab's clients): locked by default, so that no other user of a
    shared host can use the model; serve.require_key=false serves without one (loopback only)."""
    from lab.servers import new_key

    if key := api_key(recipe):
        return key, False
    return (new_key(), True) if recipe.serve.require_key else (None, False)


def auth_headers(recipe: Recipe, url: str) -> dict[str, str]:
    key = api_key(recipe, url)
    return {"Authorization": f"Bearer {key}"} if key else {}


def check_exposure(recipe: Recipe) -> None:
    """Loopback unless asked; then only with a key (every path but /health: serve/keyguard.py)."""
    if recipe.serve.host not in LOOPBACK and not (api_key(recipe) or recipe.serve.require_key):
        raise LabError(f"serve.host={recipe.serve.host} listens beyond this machine; serve it with a key "
                       f"(serve.require_key=true, or {recipe.serve.api_key_env}=<secret>)")


def check_adapter_loading(recipe: Recipe, several: bool) -> None:
    """serve.adapter_loading: vLLM's /v1/load_lora_adapter loads any adapter directory the server
    can read, so the lab opens it only on a server of adapters, on loopback, behind a key."""
    if not recipe.serve.adapter_loading:
        return
    if not several:
        raise LabError("serve.adapter_loading=true loads further adapters into a server of adapters: start it with "
                       "ADAPTERS=\"RUN ...\"")
    if recipe.serve.host not in LOOPBACK:
        raise LabError(f"serve.adapter_loading=true only on loopback (serve.host={recipe.serve.host}): loading "
                       "reads any directory the server can")
    if not (api_key(recipe) or recipe.serve.require_key):
        raise LabError(f"serve.adapter_loading=true needs a key: keep serve.require_key=true or set "
                       f"{recipe.serve.api_key_env}")


def adapter_loading_env(recipe: Recipe) -> dict[str, str]:
    return {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"} if recipe.serve.adapter_loading else {}


def parallel_env(recipe: Recipe) -> dict[str, str]:
    """vLLM's CPU engine binds each tensor-parallel rank to a NUMA node of its own and refuses more
    ranks than nodes; on one node each rank is given its own slice of the cores instead."""
    ranks = recipe.serve.tensor_parallel_size
    if recipe.backend != "cpu" or ranks == 1:
        return {}
    cores = sorted(os.sched_getaffinity(0))
    if ranks > len(cores):
        raise LabError(f"GPUS={ranks} on CPU: tensor parallelism needs a core per rank and {len(cores)} are usable")
    size = len(cores) // ranks
    return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(map(str, cores[r * size:(r + 1) * size]))
                                                  for r in range(ranks))}


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


def lora_args(name: str, adapter: str | dict[str, str], rank: int) -> list[str]:
    """vLLM's runtime LoRA over one base: the adapter answers as `name`, or (several, ADAPTERS=)
    each as its own key; the bare base as `name-base`. --max-loras: all of them in one batch."""
    max_rank = next((r for r in LORA_RANKS if r >= rank), None)
    if max_rank is None:
        raise LabError(f"LoRA rank {rank} is above what vLLM serves ({LORA_RANKS[-1]}); merge it instead")
    modules = adapter if isinstance(adapter, dict) else {name: adapter}
    return ["--enable-lora", "--max-lora-rank", str(max_rank),
            *(["--max-loras", str(len(modules))] if len(modules) > 1 else []),
            "--lora-modules", *(json.dumps({"name": n, "path": path, "base_model_name": f"{name}-base"})
                                for n, path in modules.items())]


def served_record(model: str, adapter: str | dict[str, str] | None) -> dict:
    """What a server record says it serves: the adapter (ADAPTER=1), or the base and each named
    adapter (ADAPTERS=), or the model."""
    if isinstance(adapter, dict):
        return {"model": str(model), "adapter": None, "adapters": adapter}
    return {"model": str(adapter or model), "adapter": adapter}


def check_ray(recipe: Recipe) -> None:
    """Several machines serve one model through vLLM's Ray executor, where the backend allows it."""
    from lab.device.hardware import NO_RAY_SERVING

    s = recipe.serve
    if s.pipeline_parallel_size > 1 and not s.ray_address:
        raise LabError(f"NODES={s.pipeline_parallel_size}: vLLM spreads a model over machines of a Ray cluster; give "
                       "CLUSTER= (its address, e.g. ray://head:10001 or head:6379) and run make serve on one of them")
    if s.ray_address and (why := NO_RAY_SERVING.get(recipe.backend)):
        raise LabError(f"CLUSTER={s.ray_address} on {recipe.backend}: {why}; serve with HW=cuda or HW=rocm, or "
                       "without CLUSTER=")


def ray_env(recipe: Recipe) -> dict[str, str]:
    """vLLM's Ray executor joins the cluster RAY_ADDRESS names (ray.init reads it)."""
    return {"RAY_ADDRESS": recipe.serve.ray_address} if recipe.serve.ray_address else {}


def ray_record(recipe: Recipe) -> dict:
    s = recipe.serve
    return {"pipeline_parallel_size": s.pipeline_parallel_size, "cluster": s.ray_address} if s.ray_address else {}


def engine_args(recipe: Recipe, adapter: str | dict[str, str] | None = None) -> list[str]:
    """vLLM flags beyond serve/<hw>.yaml, the same for the local and the docker runtime."""
    tp, pp = recipe.serve.tensor_parallel_size, recipe.serve.pipeline_parallel_size
    return [*(["--tensor-parallel-size", str(tp)] if tp > 1 else []),
            # GPUS per machine x NODES machines: a pipeline stage per machine, vLLM's workers placed by Ray
            *(["--pipeline-parallel-size", str(pp)] if pp > 1 else []),
            *(["--distributed-executor-backend", "ray"] if recipe.serve.ray_address else []),
            "--middleware", "keyguard.KeyEverywhere",  # the key on every path, not only vLLM's /v1
            # vLLM's `auto` falls back to *.bin (pickle); the lab serves safetensors unless told otherwise
            *([] if recipe.model.allow_pickle else ["--load-format", "safetensors"]),
            *(lora_args(recipe.serve.served_model_name, adapter, recipe.lora.r) if adapter else []),
            *tool_args(recipe)]


SERVED_DTYPES = ("float32", "bfloat16", "float16")


def context_args(recipe: Recipe, model_dir: Path) -> list[str]:
    """What the model's config.json fixes. Its own dtype where the vLLM config says `auto`: vLLM
    downcasts a float32 checkpoint to bfloat16 on CPUs with AVX512-BF16, where SmolLM2 then answered
    "la femme au martyre, ..." to "What is the capital of France?" (docs/pitfalls.md: served in
    another dtype). And vLLM refuses a max-model-len above the model's own context (serve/cuda.yaml's
    4096 over the embedded model's 512 positions): capped at what config.json allows."""
    import yaml

    try:
        engine = yaml.safe_load(serve_config(recipe).read_text(encoding="utf-8")) or {}
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        want = engine.get("max-model-len")
    except (OSError, ValueError, yaml.YAMLError, AttributeError):
        return []  # vLLM reads both itself and says what is wrong
    text = config.get("text_config") or config
    dtype = str(text.get("dtype") or text.get("torch_dtype") or config.get("dtype") or config.get("torch_dtype") or "")
    have = text.get("max_position_embeddings")
    return [*(["--dtype", dtype] if engine.get("dtype", "auto") == "auto" and dtype in SERVED_DTYPES else []),
            *(["--max-model-len", str(have)] if want and have and int(want) > int(have) else [])]


def serve_argv(recipe: Recipe, model_dir: str, port: int | None = None,
               adapter: str | dict[str, str] | None = None) -> list[str]:
    s = recipe.serve
    return [
        serve_python(), "-m", "vllm.entrypoints.openai.api_server",
        "--config", str(serve_config(recipe)),
        "--model", str(model_dir),
        "--served-model-name", f"{s.served_model_name}-base" if adapter else s.served_model_name,
        "--host", s.host, "--port", str(port or s.port), "--seed", str(recipe.probe.seed),
        # Same kwargs the training data were rendered with (docs/pitfalls.md: template drift);
        # requests may still override.
        "--default-chat-template-kwargs", json.dumps(recipe.chat_template_kwargs),
        *engine_args(recipe, adapter), *context_args(recipe, Path(model_dir)),
    ]


def tool_args(recipe: Recipe) -> list[str]:
    """serve.tool_call_parser: the chat endpoint parses the model's calls into tool_calls."""
    parser = recipe.serve.tool_call_parser
    return ["--enable-auto-tool-choice", "--tool-call-parser", parser] if parser else []


def base_url(recipe: Recipe, port: int | None = None) -> str:
    host = recipe.serve.host
    return f"http://{f'[{host}]' if ':' in host else host}:{port or recipe.serve.port}"


def check_model_dir(model_dir: Path | str) -> None:
    if not (Path(model_dir) / "config.json").is_file():
        raise LabError(f"{model_dir} is not a model directory (no config.json); `make merge` produces one")


def start(recipe: Recipe, model_dir: str, log: Path, port: int | None = None,
          adapter: str | dict[str, str] | None = None) -> str:
    """Start vLLM in the background and return its base URL once /health answers. With an
    adapter, vLLM applies the LoRA at run time over the base (no merge)."""
    url = base_url(recipe, port)
    check_exposure(recipe)
    check_adapter_loading(recipe, isinstance(adapter, dict))
    check_ray(recipe)
    check_model_dir(model_dir)
    for path in (adapter.values() if isinstance(adapter, dict) else [adapter] if adapter else []):
        if not (Path(path) / "adapter_config.json").is_file():
            raise LabError(f"{path} is not a LoRA adapter (no adapter_config.json); serving adapters needs LoRA runs")
    argv = serve_argv(recipe, model_dir, port, adapter)
    key, generated = server_key(recipe)
    env = {**serve_env(recipe, key), **adapter_loading_env(recipe), **ray_env(recipe)}
    with claim(url):
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            # Own session: `make stop` from another shell can end the whole process group.
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        try:
            record = write_record(url, log, {
                "pid": proc.pid, "pid_started": process_started(proc.pid), **served_record(model_dir, adapter),
                "tensor_parallel_size": recipe.serve.tensor_parallel_size, "argv": argv, **ray_record(recipe),
                **({"api_key": key} if generated else {}), "adapter_loading": recipe.serve.adapter_loading})
        except BaseException:  # e.g. a full disk under runs/: no server without a record
            stop_process_group(proc.pid)
            raise
    return wait_healthy(url, recipe.serve.startup_timeout_s, log, record,
                        failed=lambda: None if proc.poll() is None else f"exited unexpectedly (code {proc.returncode})")
