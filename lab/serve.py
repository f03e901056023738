"""Serve: a real vLLM OpenAI-compatible server, started, health-checked and stopped by the lab.

vLLM lives in its own virtual environment (it pins other transformers versions than
training, as the containers will too), so the server is a subprocess of that environment's
Python. Flags come from serve/<backend>.yaml through vLLM's own `--config`; the lab adds only
what depends on the run: model path, name, address, chat-template kwargs. The waiting follows
vLLM's test harness (RemoteOpenAIServer): poll /health, with two distinct failure messages.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from lab.errors import LabError
from lab.recipe import Recipe
from lab import runs
from lab.runs import write_json

ROOT = Path(__file__).resolve().parent.parent


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


def serve_env(recipe: Recipe) -> dict[str, str]:
    """serve/<backend>.env (the serve containers' env_file too) under the caller's environment, with
    vLLM's key set from the lab's: the server requires exactly the key the lab's clients send."""
    from lab.containers import read_env_file

    path = ROOT / "serve" / f"{recipe.backend}.env"
    env = {**parallel_env(recipe), **(read_env_file(path) if path.is_file() else {}), **os.environ}
    env.pop("VLLM_API_KEY", None)
    if key := api_key(recipe):
        env["VLLM_API_KEY"] = key  # in the environment, not argv: `ps` shows argv to every user
    return env


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def api_key(recipe: Recipe) -> str | None:
    """The key from the environment variable the recipe names (LAB_API_KEY by default); never a file."""
    return os.environ.get(recipe.serve.api_key_env) or None


def auth_headers(recipe: Recipe) -> dict[str, str]:
    key = api_key(recipe)
    return {"Authorization": f"Bearer {key}"} if key else {}


def check_exposure(recipe: Recipe) -> None:
    """Loopback unless asked; then only with a key. vLLM's key guards /v1 but not /health, /tokenize
    or /invocations, so an exposed server still belongs behind a firewall."""
    if recipe.serve.host not in LOOPBACK and not api_key(recipe):
        raise LabError(f"serve.host={recipe.serve.host} listens beyond this machine; set "
                       f"{recipe.serve.api_key_env}=<secret> so vLLM requires a key (its /tokenize and "
                       "/invocations stay open: keep such a server behind a firewall)")


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


def lora_args(name: str, adapter: str, rank: int) -> list[str]:
    """vLLM's runtime LoRA: the adapter answers as `name`, the bare base as `name-base`."""
    max_rank = next((r for r in LORA_RANKS if r >= rank), None)
    if max_rank is None:
        raise LabError(f"LoRA rank {rank} is above what vLLM serves ({LORA_RANKS[-1]}); merge it instead")
    return ["--enable-lora", "--max-lora-rank", str(max_rank),
            "--lora-modules", json.dumps({"name": name, "path": adapter, "base_model_name": f"{name}-base"})]


def engine_args(recipe: Recipe, adapter: str | None = None) -> list[str]:
    """vLLM flags beyond serve/<hw>.yaml, the same for the local and the docker runtime."""
    tp = recipe.serve.tensor_parallel_size
    return [*(["--tensor-parallel-size", str(tp)] if tp > 1 else []),
            # vLLM's `auto` falls back to *.bin (pickle); the lab serves safetensors unless told otherwise
            *([] if recipe.model.allow_pickle else ["--load-format", "safetensors"]),
            *(lora_args(recipe.serve.served_model_name, adapter, recipe.lora.r) if adapter else [])]


def context_args(recipe: Recipe, model_dir: Path) -> list[str]:
    """vLLM refuses a max-model-len above the model's own context (serve/cuda.yaml's 4096 over the
    embedded model's 512 positions): cap it at what the model's config.json allows."""
    import yaml

    try:
        want = (yaml.safe_load(serve_config(recipe).read_text(encoding="utf-8")) or {}).get("max-model-len")
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError, AttributeError):
        return []  # vLLM reads both itself and says what is wrong
    have = (config.get("text_config") or config).get("max_position_embeddings")
    return ["--max-model-len", str(have)] if want and have and int(want) > int(have) else []


def serve_argv(recipe: Recipe, model_dir: str, port: int | None = None, adapter: str | None = None) -> list[str]:
    s = recipe.serve
    return [
        serve_python(), "-m", "vllm.entrypoints.openai.api_server",
        "--config", str(serve_config(recipe)),
        "--model", str(model_dir), "--served-model-name", f"{s.served_model_name}-base" if adapter else s.served_model_name,
        "--host", s.host, "--port", str(port or s.port), "--seed", str(recipe.probe.seed),
        # Same kwargs the training data were rendered with (pitfall 1); requests may still override.
        "--default-chat-template-kwargs", json.dumps(recipe.chat_template_kwargs),
        *engine_args(recipe, adapter), *context_args(recipe, Path(model_dir)),
    ]


def base_url(recipe: Recipe, port: int | None = None) -> str:
    host = recipe.serve.host
    return f"http://{f'[{host}]' if ':' in host else host}:{port or recipe.serve.port}"


def healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _tail(log: Path, n: int = 3) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    return " | ".join(lines[-n:])[-600:]


def check_free(url: str) -> None:
    """Refuse a port something already listens on (a TCP connect: a server still loading its model
    answers no /health yet, but holds its port), naming the lab server that holds it, if one does."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=1.0):
            pass
    except OSError:
        return
    record = server_state(parts.port)
    if record and _record_alive(record):
        raise _busy(record)
    raise LabError(f"port {parts.port} on {parts.hostname} is taken by a program the lab did not start; pick another "
                   "PORT")


def check_model_dir(model_dir: Path | str) -> None:
    if not (Path(model_dir) / "config.json").is_file():
        raise LabError(f"{model_dir} is not a model directory (no config.json); `make merge` produces one")


def start(recipe: Recipe, model_dir: str, log: Path, port: int | None = None, adapter: str | None = None) -> str:
    """Start vLLM in the background and return its base URL once /health answers. With an
    adapter, vLLM applies the LoRA at run time over the base (no merge)."""
    url = base_url(recipe, port)
    check_exposure(recipe)
    check_model_dir(model_dir)
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise LabError(f"{adapter} is not a LoRA adapter (no adapter_config.json); ADAPTER=1 needs a LoRA run")
    argv = serve_argv(recipe, model_dir, port, adapter)
    with claim(url):
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            # Own session: `make stop` from another shell can end the whole process group.
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=serve_env(recipe),
                                    start_new_session=True)
        try:
            record = write_record(url, log, {
                "pid": proc.pid, "pid_started": _started(proc.pid), "model": str(adapter or model_dir),
                "adapter": adapter, "tensor_parallel_size": recipe.serve.tensor_parallel_size, "argv": argv})
        except BaseException:  # e.g. a full disk under runs/: no server without a record
            _stop_process_group(proc.pid)
            raise
    return wait_healthy(url, recipe, log, record,
                        failed=lambda: None if proc.poll() is None else f"exited unexpectedly (code {proc.returncode})")


# -- the record of each server, one per port ------------------------------------------------


def servers_dir() -> Path:
    """runs/.servers/<port>.json: one record per port, so `make stop` from another shell finds each."""
    return runs.RUNS_DIR / ".servers"


def port_of(url: str) -> int:
    from urllib.parse import urlsplit

    return urlsplit(url).port


@contextlib.contextmanager
def claim(url: str):
    """Hold the port's lock while checking it is free and starting a server on it: two `make serve`
    (or `make e2e` beside `make serve`) never both pass the check and fight over one port."""
    import fcntl

    servers_dir().mkdir(parents=True, exist_ok=True)
    with open(servers_dir() / f"{port_of(url)}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = server_state(port_of(url))
        if record and _record_alive(record):  # still loading its model: it holds no socket yet
            raise _busy(record)
        if record:
            _drop(record)  # a server that died (kill -9, reboot): its record only
        check_free(url)
        yield


_STARTED_HERE: dict[str, dict] = {}  # url -> the record of the server this process started there


def _busy(record: dict) -> LabError:
    return LabError(f"a lab server already runs at {record['url']} (serving {record.get('model')}; log "
                     f"{record.get('log')}): `make stop PORT={record['port']}` first, or pick another PORT")


def write_record(url: str, log: Path, record: dict) -> dict:
    record = {"url": url, "port": port_of(url), "log": str(log), **record}
    servers_dir().mkdir(parents=True, exist_ok=True)
    write_json(servers_dir() / f"{record['port']}.json", record)
    _STARTED_HERE[url] = record
    return record


def _same(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("pid", "pid_started", "container", "url"))


def wait_healthy(url: str, recipe: Recipe, log: Path, record: dict, failed) -> str:
    """Poll /health until it answers. `failed()` returns None while the server may still come up,
    else what went wrong; then (or on Ctrl-C, SIGTERM, SIGHUP) this server, and only this one, stops."""
    record = {"url": url, "port": port_of(url), "log": str(log), **record}
    deadline = time.monotonic() + recipe.serve.startup_timeout_s
    try:
        while not healthy(url):
            problem = failed()
            if problem:
                raise LabError(f"Server {problem}; {log}: {_tail(log)}")
            if time.monotonic() > deadline:
                raise LabError(f"Server failed to start in time ({recipe.serve.startup_timeout_s:.0f} s); see {log}")
            time.sleep(1.0)
    except BaseException:  # a server that never came up is not left behind
        stop_server(_STARTED_HERE.pop(url, record))
        raise
    return url


def records() -> list[dict]:
    return [runs.read_json_file(p, "remove it once no lab server runs (`ps`, `docker ps`)")
            for p in sorted(servers_dir().glob("*.json"))] if servers_dir().is_dir() else []


def server_state(port: int | None = None) -> dict | None:
    """The lab's record of the server on `port` (url, log, model, and pid + argv or container +
    image); without a port, the only one (or the first, when several run)."""
    if port is not None:
        path = servers_dir() / f"{port}.json"
        return runs.read_json_file(path, "remove it once no lab server runs (`ps`, `docker ps`)") \
            if path.is_file() else None
    found = records()
    return found[0] if found else None


def _started(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22): with the pid,
    it names one process; a pid reused after a crash or reboot has another."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, as another user's process (a pid reused after a reboot)
        return True
    try:  # a zombie child of ours counts as gone
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def _is_ours(record: dict) -> bool:
    """The recorded process is still the one the lab started: same pid, same start time, same
    program. A record without them (hand-written, or planted through the runs/ mount) names none."""
    pid, started, argv = record.get("pid"), record.get("pid_started"), record.get("argv")
    if not isinstance(pid, int) or pid <= 1 or not started or not isinstance(argv, list) or not argv:
        return False
    if not _alive(pid) or _started(pid) != started:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and cmdline[0].decode(errors="replace") == str(argv[0])


def _record_alive(record: dict) -> bool:
    if "container" in record:
        from lab.containers import state

        return bool(state(record["container"]).get("Running"))
    return _is_ours(record)


def _drop(record: dict) -> None:
    """Remove the port's record if it is still this one (another server may hold the port now)."""
    path = servers_dir() / f"{record['port']}.json"
    try:
        current = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        current = None
    if current is None or _same(current, record):
        path.unlink(missing_ok=True)


def stop_server(record: dict) -> str:
    """Stop one recorded server, after checking it is the one the lab started; drop its record."""
    if "container" in record:
        from lab.containers import remove_id

        removed = remove_id(record["container"])  # only a container carrying the lab's label
        what = f"container {record['container'][:12]}" if removed else "its container was already gone"
    elif _is_ours(record):
        _stop_process_group(record["pid"])
        what = f"pid {record['pid']}"
    else:  # exited, or the pid now names another process: kill nothing
        what = f"pid {record.get('pid')} was no longer the lab's server; nothing killed"
    if not record.get("_gone"):
        _drop(record)
    return what


def stop(quiet: bool = False, port: int | None = None) -> bool:
    """Stop the lab's server on `port`, or every one it recorded; True if one was."""
    found = [r for r in ([server_state(port)] if port is not None else records()) if r]
    if not found and not quiet:
        print(f"stop: no lab server is running{f' on port {port}' if port else ''}")
    for record in found:
        what = stop_server(record)
        if not quiet:
            print(f"stop: stopped the server at {record['url']} ({what})")
    return bool(found)


def stop_url(url: str | None) -> None:
    """Stop the server this process started at `url` (e2e's own), never one started since by another."""
    mine = _STARTED_HERE.pop(url, None) if url else None
    if mine:
        record = server_state(port_of(url))
        stop_server(record if record and _same(record, mine) else {**mine, "_gone": True})


def _stop_process_group(pid: int) -> None:
    """SIGTERM the group, then SIGKILL whatever of it is left (an engine child can outlive its parent)."""
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while _group_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _group_alive(pid):
            return


def _group_alive(pgid: int) -> bool:
    _alive(pgid)  # reaps the leader if it is our zombie child
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _alive(pgid) or _members(pgid)


def _members(pgid: int) -> bool:
    """Any live (non-zombie) process left in the group, from /proc."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def running_url(port: int | None = None) -> str | None:
    """The URL of the lab's server (on `port`, or the only one); None when none is recorded. A
    recorded server that died or does not answer is an error naming its log."""
    record = server_state(port)
    if record is None:
        return None
    if healthy(record["url"]):
        return record["url"]
    if not _record_alive(record):
        _drop(record)
        log = Path(record["log"])
        tail = _tail(log) if runs.RUNS_DIR.resolve() in log.resolve().parents else ""  # never an arbitrary file
        raise LabError(f"the lab's server at {record['url']} has exited; its log: {record['log']}"
                       f"{f': {tail}' if tail else ''}")
    raise LabError(f"the lab's server at {record['url']} does not answer /health (still starting, or hung); "
                   f"its log: {record['log']}")
