"""Containers: compose.yaml's services, built and run through the Docker SDK (RUNTIME=docker).

compose.yaml is the one description of the images and services, and users can run it by hand
with `docker compose`. The lab reads the same file (PyYAML resolves its anchors and `<<`
merges; `interpolate` implements compose's documented `${VAR}`, `${VAR:-default}`,
`${VAR-default}`, `${VAR:?error}` and `$$`) and maps each service onto the SDK's build and run
calls. We map rather than shell out to `docker compose` because the lab must wait for health,
stream logs and clean up on Ctrl-C through the engine's API, not by parsing CLI output; a test
checks our reading against `docker compose config` for every profile.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path

import yaml

from lab import ROOT
from lab.errors import LabError

COMPOSE_FILE = ROOT / "compose.yaml"
LABEL = "org.lab.service"  # every container the lab starts carries it (cleanup finds them)
RUNS_LABEL = "org.lab.runs"  # and the runs directory it belongs to: `make stop` sweeps only its own
NODE_LABEL = "org.lab.node"  # on Ray cluster nodes (`make ray-node`; STOP=1 removes them)


def runs_label() -> str:
    from lab import runs

    return str(runs.RUNS_DIR.resolve())

# The compose keys this module maps onto the SDK; anything else in compose.yaml is an error,
# so the file and the runtime cannot drift apart silently.
MAPPED_KEYS = {"profiles", "image", "build", "entrypoint", "command", "user", "environment", "env_file",
               "volumes", "ports", "healthcheck", "devices", "group_add", "security_opt", "ipc", "shm_size",
               "deploy", "cap_drop", "cap_add", "read_only", "tmpfs", "pids_limit"}

# ${NAME}, ${NAME:-default} (and -, :?, ?), $NAME; a default may itself hold ${...} (innermost first).
_VAR = re.compile(r"\$(?:\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>(?:[^}$]|\$(?!\{))*))?\}"
                  r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")
_LITERAL_DOLLAR = "\x00"


def interpolate(value, env: dict[str, str]):
    """compose's variable substitution, applied to every string in a parsed YAML tree."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name = m["name"] or m["bare"]
        have = env.get(name)
        op, arg = m["op"], m["arg"] or ""
        if op in (":-", ":?") and not have or op in ("-", "?") and have is None:
            if op.endswith("?"):
                raise LabError(f"compose.yaml: {name} must be set ({arg or 'required'})")
            return arg
        return (have or "").replace("$", _LITERAL_DOLLAR)  # a value is never interpolated again

    text = value.replace("$$", _LITERAL_DOLLAR)
    while True:  # nested defaults resolve from the inside out
        new = _VAR.sub(sub, text)
        if new == text:
            return new.replace(_LITERAL_DOLLAR, "$")
        text = new


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (compose's env_file and serve/<backend>.env share this format)."""
    env = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            env[key.strip()] = value.strip()
    return env


def services(env: dict[str, str] | None = None) -> dict[str, dict]:
    """Every service of compose.yaml, interpolated with the environment (and .env, as compose does)."""
    dotenv = ROOT / ".env"
    env = {**(read_env_file(dotenv) if dotenv.is_file() else {}), **os.environ, **(env or {})}
    try:
        raw = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise LabError(f"{COMPOSE_FILE}: cannot read it ({e})") from None
    out = interpolate(raw.get("services") or {}, env)
    for name, svc in out.items():
        unknown = set(svc) - MAPPED_KEYS
        if unknown:
            raise LabError(f"compose.yaml: service {name} uses {sorted(unknown)}, which lab/containers.py does not "
                           "map onto the Docker SDK; add the mapping there")
    return out


def service(name: str, env: dict[str, str] | None = None) -> dict:
    all_services = services(env)
    if name not in all_services:
        raise LabError(f"compose.yaml has no service {name!r}; services: {', '.join(all_services)}")
    return {"name": name, **all_services[name]}


def _duration_ns(text: str | int) -> int:
    """compose durations ('5s', '1m30s', '15m') in nanoseconds, as the Engine API wants them."""
    if isinstance(text, int):
        return text * 10**9
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(text))
    if not parts or "".join(n + u for n, u in parts) != str(text):
        raise LabError(f"compose.yaml: {text!r} is not a duration like 5s or 15m")
    return int(sum(float(n) * units[u] for n, u in parts) * 10**9)


def binds(svc: dict) -> list[tuple[Path, str, str]]:
    """(host path, container path, mode) for each bind mount; relative host paths start at the repo."""
    out = []
    for spec in svc.get("volumes") or []:
        host, container, *mode = spec.split(":")
        out.append(((ROOT / host).resolve() if not os.path.isabs(host) else Path(host), container,
                    mode[0] if mode else "rw"))
    return out


def to_container(svc: dict, host_path: Path | str) -> str:
    """Where a host file appears inside the service's container (it must be under a mount; the
    deepest mount wins, as in the container)."""
    host_path = Path(host_path).resolve()
    for host, container, _ in sorted(binds(svc), key=lambda b: len(b[0].parts), reverse=True):
        if host_path == host or host in host_path.parents:
            return str(Path(container) / host_path.relative_to(host))
    mounts = ", ".join(str(h) for h, _, _ in binds(svc))
    raise LabError(f"{host_path} is not visible in the {svc['name']} container (mounted: {mounts}); "
                   "put it under one of those directories")


def to_host(svc: dict, container_path: str) -> Path:
    for host, container, _ in sorted(binds(svc), key=lambda b: len(Path(b[1]).parts), reverse=True):
        if container_path == container or container_path.startswith(container.rstrip("/") + "/"):
            return host / os.path.relpath(container_path, container)
    raise LabError(f"{container_path} is inside the {svc['name']} container only")


# Where the images keep what they run; a user file is never mounted over (or above) these.
IMAGE_PATHS = ("/opt/lab", "/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc", "/proc", "/sys", "/dev", "/var",
               "/runs", "/cache")


def user_mount(host_path: Path | str) -> str:
    """A read-only bind of a user's file or directory at the same path inside the container, so
    paths in a recipe mean the same there as here (compose's volume syntax)."""
    p = Path(host_path).resolve()
    if not p.exists():
        raise LabError(f"{p} does not exist")
    if ":" in str(p) or "," in str(p):
        raise LabError(f"{p}: a path with ':' or ',' cannot be mounted into a container; rename or move it")
    clash = next((d for d in IMAGE_PATHS if Path(d) in p.parents), None) or next(  # inside, or over (HOME=/tmp)
        (d for d in (*IMAGE_PATHS, "/tmp") if p == Path(d) or p in Path(d).parents), None)
    if clash or p == Path("/"):
        raise LabError(f"{p} would be mounted over the container's own {clash or '/'}; move it to a directory "
                       "of its own (or under runs/) for RUNTIME=docker")
    return f"{p}:{p}:ro"


# The host's choice of GPUs, per device-request driver: a container then gets those devices only
# (numbered from 0 inside, so the variable itself is not passed on). AMD's containers mount every
# /dev/dri node and take HIP_VISIBLE_DEVICES/ROCR_VISIBLE_DEVICES as they are (compose.yaml).
VISIBLE_DEVICES = {"nvidia": ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")}


def device_request(spec: dict):
    """A compose GPU reservation as the SDK's DeviceRequest, narrowed to the host's visible devices."""
    import docker

    driver, ids, count = spec.get("driver", ""), spec.get("device_ids"), spec.get("count")
    for var in VISIBLE_DEVICES.get(driver, ()):
        value = os.environ.get(var)
        if value is None or value.strip().lower() == "all":
            continue
        ids = [d.strip() for d in value.split(",") if d.strip()]
        if not ids:
            raise LabError(f"{var}={value!r} hides every GPU; name the devices (e.g. {var}=0,1) or unset it")
        break
    return docker.types.DeviceRequest(driver=driver, count=0 if ids else -1 if count in (None, "all") else int(count),
                                      device_ids=ids, capabilities=[list(spec.get("capabilities") or [])])


def run_kwargs(svc: dict, command: list[str] | None = None, network: str | None = None) -> dict:
    """One compose service as keyword arguments of the SDK's containers.create/run."""

    env = {}
    for path in ([svc["env_file"]] if isinstance(svc.get("env_file"), str) else svc.get("env_file") or []):
        env.update(read_env_file(ROOT / path))
    environment = svc.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.partition("=")[::2] if "=" in item else (item, None) for item in environment)
    for key, value in environment.items():
        if value is None:  # compose: pass the host's value through, if it has one
            if key in os.environ:
                env[key] = os.environ[key]
        else:
            env[key] = str(value)

    kw = {
        "image": svc["image"],
        "command": command if command is not None else svc.get("command"),
        "environment": env,
        "volumes": {str(host): {"bind": container, "mode": mode} for host, container, mode in binds(svc)},
        "labels": {LABEL: svc["name"], RUNS_LABEL: runs_label()},
    }
    if svc.get("entrypoint"):
        kw["entrypoint"] = svc["entrypoint"]
    if svc.get("user"):
        kw["user"] = svc["user"]
    if svc.get("devices"):
        kw["devices"] = [d if ":" in d else f"{d}:{d}:rwm" for d in svc["devices"]]
    if svc.get("group_add"):
        kw["group_add"] = [str(g) for g in svc["group_add"]]
    if svc.get("security_opt"):
        kw["security_opt"] = list(svc["security_opt"])
    if svc.get("ipc"):
        kw["ipc_mode"] = svc["ipc"]
    if svc.get("shm_size"):
        kw["shm_size"] = str(svc["shm_size"])
    for key in ("cap_drop", "cap_add"):
        if svc.get(key):
            kw[key] = list(svc[key])
    if svc.get("read_only"):
        kw["read_only"] = bool(svc["read_only"])
    if svc.get("tmpfs"):  # compose: a path or a list of "path[:options]"
        kw["tmpfs"] = dict(t.partition(":")[::2] for t in
                           ([svc["tmpfs"]] if isinstance(svc["tmpfs"], str) else svc["tmpfs"]))
    if svc.get("pids_limit"):
        kw["pids_limit"] = int(svc["pids_limit"])
    gpus = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    if gpus:
        kw["device_requests"] = [device_request(d) for d in gpus]
    check = svc.get("healthcheck")
    if check:
        kw["healthcheck"] = {"test": check["test"], "interval": _duration_ns(check.get("interval", "30s")),
                             "timeout": _duration_ns(check.get("timeout", "30s")),
                             "retries": int(check.get("retries", 3)),
                             "start_period": _duration_ns(check.get("start_period", "0s"))}
    if network:
        kw["network_mode"] = network
    if svc.get("ports") and network != "host":  # host networking publishes nothing: the port is the host's
        ports = {}
        for spec in svc["ports"]:
            *ip, host_port, container_port = str(spec).split(":")
            ports[f"{container_port}/tcp"] = (ip[0], int(host_port)) if ip else int(host_port)
        kw["ports"] = ports
    return kw


# -- the engine ---------------------------------------------------------------------------


def client(timeout: int = 600):
    try:
        import docker
    except ImportError:
        raise LabError("RUNTIME=docker needs the Docker SDK for Python "
                       "(`pip install docker`, in requirements/harness.txt)") from None
    try:
        c = docker.from_env(timeout=timeout)
        c.ping()
        return c
    except docker.errors.DockerException as e:
        raise LabError(f"no Docker engine answers ({str(e).splitlines()[0][:200]}); "
                       "start it, or use RUNTIME=local") from None


def engine_available() -> bool:
    try:
        client(timeout=5)
        return True
    except LabError:
        return False


def network() -> str | None:
    """LAB_DOCKER_NETWORK=host for engines without a bridge network (our CI); default: Docker's."""
    return os.environ.get("LAB_DOCKER_NETWORK") or None


PROJECT_NETWORK = "lab_default"  # the network `docker compose` makes for this project (name: lab)


def run_network() -> str:
    """Where the lab's containers run: LAB_DOCKER_NETWORK, else compose's project network, made
    with compose's labels if missing, so `docker compose` and the lab share it."""
    import docker

    if network():
        return network()
    c = client()
    try:
        c.networks.get(PROJECT_NETWORK)
    except docker.errors.NotFound:
        c.networks.create(PROJECT_NETWORK, driver="bridge",
                          labels={"com.docker.compose.project": "lab", "com.docker.compose.network": "default"})
    return PROJECT_NETWORK


def prepare_context(wheels: str | None = None, ca_bundle: str | None = None) -> None:
    """The two build options that travel in the context: a wheelhouse and extra CA certificates."""
    if wheels:
        src = Path(wheels).expanduser()
        found = sorted(src.glob("*.whl")) if src.is_dir() else []
        if not found:
            raise LabError(f"WHEELS={wheels}: no *.whl files there")
        for whl in found:
            dst = ROOT / "docker" / "wheels" / whl.name
            if not dst.exists():
                try:
                    os.link(whl, dst)  # same filesystem: no copy
                except OSError:
                    shutil.copy2(whl, dst)
    if ca_bundle:
        src = Path(ca_bundle).expanduser()
        if not src.is_file() or b"BEGIN CERTIFICATE" not in src.read_bytes():
            raise LabError(f"CA_BUNDLE={ca_bundle}: not a PEM certificate file")
        shutil.copyfile(src, ROOT / "docker" / "certs" / "extra-ca.crt")


def _build_args(spec: dict) -> dict[str, str]:
    """compose's build args, plus the commit the image is built from (for run manifests)."""
    from lab.manifest import code

    here = code()
    return {**{k: str(v) for k, v in (spec.get("args") or {}).items()},
            "LAB_GIT_COMMIT": here["commit"] or "", "LAB_GIT_DIRTY": str(bool(here["dirty"])).lower()}


def build(svc: dict, log: Path, nocache: bool = False) -> str:
    """Build the service's image as compose would; progress to stdout, everything to `log`."""
    import docker

    spec = svc.get("build") or {}
    if not spec:
        raise LabError(f"service {svc['name']} has no build section")
    api = client().api
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"images: building {svc['image']} ({spec.get('dockerfile')}; log: {log})", flush=True)
    last = ""
    with log.open("w", encoding="utf-8") as out:
        try:
            for chunk in api.build(path=str(ROOT / spec.get("context", ".")), dockerfile=spec.get("dockerfile"),
                                   tag=svc["image"], buildargs=_build_args(spec),
                                   network_mode=network(), rm=True, forcerm=True, pull=False, nocache=nocache,
                                   decode=True):
                if "error" in chunk:
                    out.write(chunk["error"] + "\n")
                    raise LabError(f"building {svc['image']} failed: {chunk['error'].strip()[-300:]} (log: {log})")
                text = chunk.get("stream", "")
                out.write(text)
                out.flush()
                if text.startswith("Step "):
                    print(f"  {text.strip()[:160]}", flush=True)
                elif text.strip():
                    last = text.strip()
        except docker.errors.APIError as e:
            raise LabError(f"building {svc['image']}: the engine refused ({e.explanation or e}); log: {log}") from None
    image = api.inspect_image(svc["image"])
    print(f"images: {svc['image']} {image['Id'][7:19]} {image['Size'] / 2**30:.2f} GiB ({last[:80]})", flush=True)
    return image["Id"]


def ensure_image(svc: dict, log: Path) -> None:
    import docker

    try:
        client().images.get(svc["image"])
    except docker.errors.ImageNotFound:
        build(svc, log)


def _pump_logs(container, log: Path | None, echo: bool) -> threading.Thread:
    """Copy the container's output into `log` (if any) and stdout until it exits."""

    def pump():
        with log.open("ab") if log else open(os.devnull, "wb") as out:
            for chunk in container.logs(stream=True, follow=True):
                out.write(chunk)
                out.flush()
                if echo:
                    os.write(1, chunk)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def run(svc: dict, command: list[str], log: Path | None, labels: dict[str, str] | None = None) -> int:
    """Run one command in a fresh container of the service, echoing its output (and keeping it in
    `log`, unless the command writes its own); always removed (Ctrl-C, SIGTERM and SIGHUP included;
    after a kill -9 of the lab, `labels` find it again)."""
    kw = run_kwargs(svc, command, run_network())
    kw["labels"].update(labels or {})
    # what the run's manifest records as "container": the image and its exact id
    kw["environment"].update(LAB_IMAGE=svc["image"], LAB_IMAGE_ID=client().images.get(svc["image"]).id)
    container = client().containers.create(**kw)
    try:
        if log:
            log.parent.mkdir(parents=True, exist_ok=True)
        container.start()
        pump = _pump_logs(container, log, echo=True)
        code = container.wait()["StatusCode"]
        pump.join(timeout=10)
        return code
    finally:  # Ctrl-C included
        remove(container)


def start(svc: dict, log: Path, network: str | None = None, labels: dict[str, str] | None = None):
    """Start the service detached (a server, a Ray node); the caller waits for health and stops it.
    A start the engine refuses (port allocated, no GPU runtime, no /dev/kfd) leaves no container behind."""
    kw = run_kwargs(svc, None, network or run_network())
    kw["labels"].update(labels or {})
    container = client().containers.create(**kw)
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_bytes(b"")
        container.start()
    except BaseException:
        remove(container, timeout=5)
        raise
    _pump_logs(container, log, echo=False)
    return container


def state(container_id: str) -> dict:
    """The container's state (Status, ExitCode, Health) or {} if it is gone."""
    import docker

    try:
        return client().api.inspect_container(container_id)["State"]
    except docker.errors.NotFound:
        return {}


def remove(container, timeout: int = 30) -> None:
    import docker

    try:
        container.stop(timeout=timeout)
    except docker.errors.APIError:
        pass
    try:
        container.remove(force=True)
    except docker.errors.APIError:
        pass


def remove_id(container_id: str, timeout: int = 30) -> bool:
    """Remove a container the lab started: one without the lab's label is left alone (a record
    under runs/ is writable by training containers, so it is not trusted to name any container)."""
    import docker

    try:
        container = client().containers.get(container_id)
    except docker.errors.NotFound:
        return False
    if LABEL not in (container.labels or {}):
        return False
    remove(container, timeout)
    return True


def lab_containers(**labels: str) -> list:
    """The running containers this lab checkout started (found by label after a crash or kill -9)."""
    wanted = [f"{RUNS_LABEL}={runs_label()}", *(f"{k}={v}" for k, v in labels.items())]
    return client().containers.list(filters={"label": wanted})
