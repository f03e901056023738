"""Where the stages run: here (RUNTIME=local) or in the lab's containers (RUNTIME=docker).

Both runtimes offer the same five operations, so the CLI and the e2e loop do not care which
one they have: resolve the base model, train, merge, start a server, and translate paths.
The docker runtime runs the very same `lab` subcommands inside the training image and vLLM
inside the serving image, over shared mounts of runs/ and the cache, so outputs land under
runs/ either way. The probe and the report always run here: they are the client.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Protocol

from lab import runs
from lab.errors import LabError
from lab.recipe import EMBEDDED, Recipe

RUNTIMES = ("auto", "local", "docker")
RUN_LABEL = "org.lab.run"  # on training containers: the run they write (RESUME=1 refuses while one lives)


def container_user() -> tuple[int, int]:
    """Who the containers run as, and who owns what they write: the caller; as root (containers
    never run as root), the user LAB_UID/LAB_GID name. Root is not guessed for: handing runs/ and
    the caches to uid 1000 gives them to whoever that is on a shared host."""
    if os.getuid() != 0:
        return os.getuid(), os.getgid()
    uid, gid = os.environ.get("LAB_UID", ""), os.environ.get("LAB_GID", "") or os.environ.get("LAB_UID", "")
    if not (uid.isdigit() and gid.isdigit()) or uid == "0":
        raise LabError("RUNTIME=docker as root: set LAB_UID (and LAB_GID) to the non-root user the containers run "
                       "as and who will own runs/ and the caches, e.g. LAB_UID=$(id -u alice) LAB_GID=$(id -g alice)")
    return int(uid), int(gid)


class Runtime(Protocol):
    """What the CLI, e2e, probe and reproduce need from where stages run; Local and Docker offer it."""

    name: str

    def base_model(self, recipe: Recipe, model: str | None = None) -> str:
        """The base model's directory, as the stages that read it see it."""

    def train(self, recipe: Recipe, run: Path, resume: bool = False, gpus: int = 1, dist: str = "ddp",
              topo=None, cluster: str | None = None) -> None:
        """`lab train` into `run` (gpus processes here; topo: of several machines; cluster: gpus Ray
        Train workers on that Ray cluster)."""

    def merge(self, run: Path) -> Path:
        """`lab merge` of `run`: its merged/ directory on this host."""

    def start(self, recipe: Recipe, model: str, log: Path, port: int | None = None,
              adapter: str | dict[str, str] | None = None) -> str:
        """vLLM serving `model` (or base + `adapter`) in the background; its base URL once healthy."""

    def served_path(self, host_path: Path) -> str:
        """A host path as the server sees it."""

    def host_path(self, path: str) -> Path:
        """A path the server or a container reported, as this host sees it."""


class Local:
    name = "local"

    def __init__(self, recipe_argv: list[str] | None = None):
        self.recipe_argv = list(recipe_argv or [])

    def base_model(self, recipe: Recipe, model: str | None = None) -> str:
        """The base model's local directory: built, found, or a hub snapshot in the HF cache."""
        from lab.models import resolve

        allow = recipe.model.allow_pickle
        return resolve(model, None, allow) if model else resolve(recipe.model.path, recipe.model.revision, allow)

    def train(self, recipe: Recipe, run: Path, resume: bool = False, gpus: int = 1, dist: str = "ddp",
              topo=None, cluster: str | None = None) -> None:
        if cluster:  # the same `lab train` in each Ray Train worker (lab/device/cluster.py)
            from lab.device import cluster as ray_cluster

            self.base_model(recipe)  # built or found here once (the workers read it from the shared cache)
            ray_cluster.launch([*self.recipe_argv, *(["--resume"] if resume else [])], gpus,
                               use_gpu=recipe.backend != "cpu", cluster=cluster, run=run, log=run / "train.log",
                               spec=recipe.cluster)
            return
        if gpus > 1 or (topo and topo.nodes > 1):  # the same `lab train`, once per device, under accelerate launch
            from lab.device.launch import Topology, launch

            self.base_model(recipe)  # build or download it once, not in every process
            launch([*self.recipe_argv, "--run", str(run), "--runtime", "local", *(["--resume"] if resume else [])],
                   gpus, dist, run / "train.log", topo or Topology(), recipe.cluster.join_timeout_s)
            return
        from lab.device.launch import is_main_process
        from lab.train import last_complete_checkpoint, train

        # The checkpoint train() continues from (the same pick), recorded once it has: the trainer
        # restarts its loss window there, which `lab compare` leaves out. checkpoint-N is step N.
        start = last_complete_checkpoint(run / "checkpoints", remove_partial=False) if resume else None
        train(recipe, run, resume=resume)
        if is_main_process():
            runs.share_weights(run)
        if start is not None and is_main_process():
            from lab import manifest

            manifest.append(run, "resumes", {"checkpoint": start.name, "step": int(start.name.split("-")[-1])})

    def merge(self, run: Path) -> Path:
        from lab.merge import merge

        return merge(run)

    def start(self, recipe: Recipe, model: str, log: Path, port: int | None = None,
              adapter: str | dict[str, str] | None = None) -> str:
        from lab.serve import start

        return start(recipe, model, log, port, adapter)

    def served_path(self, host_path: Path) -> str:
        return str(host_path)

    def host_path(self, path: str) -> Path:
        return Path(path)


class Docker:
    """Stages in containers of compose.yaml's `train-<hw>` and `serve-<hw>` services.

    runs/, the lab's cache and the Hugging Face cache (HF_HOME) are compose's mounts; any other
    file a recipe names (the recipe itself, datasets, probe questions, a model directory, a vLLM
    config) is bound read-only at its own path, so every path means the same in a container as
    here."""

    name = "docker"

    def __init__(self, backend: str, recipe_argv: list[str], recipe: Recipe | None = None):
        from lab import containers

        self.c = containers
        self.backend = backend
        self.cache_dir = Path(os.environ.get("LAB_CACHE_DIR") or containers.ROOT / ".cache").resolve()
        self.hf_home = hf_home()
        self.mounts: dict[str, str] = {}  # host path -> compose volume spec (user files)
        containers.client()  # fail now, in one line, if no engine answers
        self.recipe_argv = list(recipe_argv)
        if "--recipe" in self.recipe_argv:  # a recipe file given by path: where the container sees it
            i = self.recipe_argv.index("--recipe") + 1
            if Path(self.recipe_argv[i]).is_absolute():
                self.recipe_argv[i] = self.visible(Path(self.recipe_argv[i]))
        if recipe is not None:
            self.mount_inputs(recipe)

    def env(self, **extra: str) -> dict[str, str]:
        uid, gid = container_user()
        env = {"LAB_RUNS_DIR": str(runs.RUNS_DIR.resolve()), "LAB_CACHE_DIR": str(self.cache_dir),
               "LAB_HF_HOME": str(self.hf_home), "LAB_HF_HUB_CACHE": str(hf_hub_cache()),
               "LAB_UID": str(uid), "LAB_GID": str(gid)}
        if Path("/dev/kfd").exists():  # AMD: the host's numeric render group (not a name the image knows)
            env["LAB_RENDER_GID"] = str(Path("/dev/kfd").stat().st_gid)
        if self.backend == "rocm":  # which lab-train:rocm-<arch> image: this host's GPU unless GPU_ARCH says
            from lab.device.hardware import gpu_arch

            env["GPU_ARCH"] = gpu_arch()[0]
        return {**env, **extra}

    def spec(self, role: str, **extra: str) -> dict:
        """The service as compose.yaml resolves it for this host, plus the user files' mounts."""
        svc = self.c.service(f"{role}-{self.backend}", self.env(**extra))
        svc["volumes"] = [*(svc.get("volumes") or []), *self.mounts.values()]
        return svc

    def service(self, role: str, **extra: str) -> dict:
        """The service, its image built if missing (lab-ray's after the training image it extends)."""
        if role == "ray":
            self.service("train")
        svc = self.spec(role, **extra)
        self.c.ensure_image(svc, runs.RUNS_DIR / ".images" / f"{svc['name']}.log")
        return svc

    def visible(self, host_path: Path) -> str:
        """A host path as the containers see it: under compose's mounts, or bound at its own path."""
        try:
            return self.c.to_container(self.spec("train"), host_path)
        except LabError:
            self.mounts[str(Path(host_path).resolve())] = self.c.user_mount(host_path)
            return str(Path(host_path).resolve())

    def mount_inputs(self, recipe: Recipe) -> None:
        """Every local file the recipe reads, visible in the containers at the path it names."""
        def named(path: str, what: str) -> None:
            if path.startswith("~") or (what == "model.path" and not Path(path).is_absolute()):
                raise LabError(f"{what} {path!r}: give an absolute path with RUNTIME=docker (a container has "
                               "another home and working directory)")

        for i, ds in enumerate(recipe.datasets):
            local = recipe.resolve_path(ds.path)
            if local.exists():
                named(ds.path, f"datasets.{i}.path")
                self.visible(local)
        questions = recipe.resolve_path(recipe.probe.questions)
        if questions.is_file():
            named(recipe.probe.questions, "probe.questions")
            self.visible(questions)
        if recipe.model.path != EMBEDDED and Path(recipe.model.path).expanduser().exists():
            named(recipe.model.path, "model.path")
            self.visible(Path(recipe.model.path))

    def _writable(self, *dirs: Path) -> None:
        """Directories the containers write into; as root we hand them to the image's user."""
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
            if os.getuid() == 0:
                os.chown(d, *container_user())

    def _writable_mounts(self) -> None:
        """runs/ and the caches, which the containers write into."""
        self._writable(runs.RUNS_DIR, self.cache_dir, self.cache_dir / "lab")
        for cache in (self.hf_home, hf_hub_cache()):  # a new HF cache for downloads; an existing one keeps its owner
            if not cache.exists():
                self._writable(cache)

    def ray_node(self, head: str | None, port: int, ray_args: list[str], timeout_s: float = 180):
        """A Ray node in a lab-ray container (host network: Ray's nodes talk on many ports): the
        head on `port`, or a worker joining `head`. Returns (container, image, log, what it is) once
        Ray runs there."""
        import time

        role = f"worker of {head}" if head else f"head on port {port}"
        start = ["start", "--block", "--disable-usage-stats",
                 *(["--address", head] if head else ["--head", "--port", str(port)]), *ray_args]
        svc = self.service("ray")
        self._writable_mounts()  # the workers write runs and caches
        log = runs.RUNS_DIR / ".nodes" / (f"worker-{head.replace(':', '-')}.log" if head else f"head-{port}.log")
        container = self.c.start({**svc, "entrypoint": ["ray"], "command": start}, log, network="host",
                                 labels={self.c.NODE_LABEL: "ray"})
        deadline = time.monotonic() + timeout_s
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if not self.c.state(container.id).get("Running") or time.monotonic() > deadline:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                self.c.remove(container, timeout=5)
                raise LabError(f"the Ray {role} did not start ({tail[0][:200]}); log: {log}")
            time.sleep(0.5)
        return container, svc["image"], log, role

    def lab(self, *argv: str, log: Path, run: Path | None = None, role: str = "train", own_log: bool = False) -> None:
        """`python -m lab ARGV` in the training container (role ray: the lab-ray image's), labelled
        with the run it works on; its output goes to `log`, unless the command writes it (own_log:
        a launcher's, whose output is that log)."""
        self._writable_mounts()
        svc = self.service(role)
        if role == "ray":  # the Ray driver: it asks the cluster for workers and needs no GPU itself
            svc = driver_service(svc)
        if run is not None:
            alive = self.c.lab_containers(**{RUN_LABEL: str(run.resolve())})
            if alive:  # its lab command was killed (kill -9), the container was not
                raise LabError(f"a container still works on {run.name} ({alive[0].short_id}, left by an interrupted "
                               f"lab command); `docker rm -f {alive[0].short_id}` before running it again")
        print(f"docker: {svc['image']}: lab {' '.join(argv)}", flush=True)
        code = self.c.run(svc, list(argv), None if own_log else log,
                          labels={RUN_LABEL: str(run.resolve())} if run else None)
        if code != 0:
            raise LabError(f"`lab {argv[0]}` in the {svc['image']} container exited with {code} (log: {log})")

    def base_model(self, recipe: Recipe, model: str | None = None) -> str:
        """The base model's directory as the containers see it: a local directory is bound at its
        own path; the embedded model and hub snapshots are resolved in the training container, into
        the mounted caches (so a hub id downloads once, honouring HF_HUB_OFFLINE)."""
        path, revision = (model, None) if model else (recipe.model.path, recipe.model.revision)
        if path != EMBEDDED and Path(path).expanduser().is_dir():
            return self.visible(Path(path).expanduser())
        if Path(path).expanduser().is_file():  # a .gguf file: converted in the container, into the lab cache
            self.visible(Path(path).expanduser().resolve())
        out = runs.RUNS_DIR / f".resolve-{uuid.uuid4().hex[:8]}.json"
        try:
            self.lab("resolve", "--model", path, *(["--revision", revision] if revision else []),
                     *(["--allow-pickle"] if recipe.model.allow_pickle else []),
                     "--out", self.c.to_container(self.spec("train"), out), log=runs.RUNS_DIR / "resolve.log")
            return json.loads(out.read_text())["model"]
        finally:
            out.unlink(missing_ok=True)

    def train(self, recipe: Recipe, run: Path, resume: bool = False, gpus: int = 1, dist: str = "ddp",
              topo=None, cluster: str | None = None) -> None:
        self.mount_inputs(recipe)
        self._writable(run)
        if cluster:  # the Ray driver in the lab-ray image, whose workers (nodes of that image) see the same paths
            self.lab("train", *self.recipe_argv, "--run", self.c.to_container(self.spec("train"), run),
                     *(["--resume"] if resume else []), "--gpus", str(gpus), "--cluster", cluster,
                     log=run / "train.log", run=run, role="ray", own_log=True)
            return
        nodes = ["--nodes", str(topo.nodes), "--node-rank", str(topo.node_rank), "--main", topo.address] \
            if topo and topo.nodes > 1 else []  # the container must reach node 0 (LAB_DOCKER_NETWORK=host)
        self.lab("train", *self.recipe_argv, "--run", self.c.to_container(self.spec("train"), run),
                 *(["--resume"] if resume else []),
                 *(["--gpus", str(gpus), "--dist", dist] if gpus > 1 or nodes else []), *nodes,
                 log=run / "train.log", run=run, own_log=gpus > 1 or bool(nodes))  # accelerate's launcher writes it

    def merge(self, run: Path) -> Path:
        from lab.recipe import load_saved

        # what the merge reads besides the run: the base (train.json, as the container saw it) and
        # the probe questions of the run's recipe; user files were bound at their own paths
        saved = load_saved(run)
        base = runs.read_json(run / "train.json", "make train")["base_model"]
        for path in (base, str(saved.resolve_path(saved.probe.questions))):
            self._bind_if_user_file(path)
        self.lab("merge", "--run", self.c.to_container(self.spec("train"), run), log=run / "merge.log", run=run)
        return run / "merged"

    def _bind_if_user_file(self, container_path: str) -> None:
        try:
            self.c.to_host(self.spec("train"), container_path)  # under compose's mounts (or an image path)
        except LabError:
            if Path(container_path).exists():  # bound at its own path when it was trained
                self.visible(Path(container_path))

    def start(self, recipe: Recipe, model: str, log: Path, port: int | None = None,
              adapter: str | dict[str, str] | None = None) -> str:
        from lab.serve import (
            adapter_loading_env,
            check_adapter_loading,
            check_model_dir,
            check_ray,
            context_args,
            engine_args,
            parallel_env,
            ray_env,
            ray_record,
            serve_config,
            served_record,
            server_key,
        )
        from lab.servers import claim, wait_healthy, write_record

        port = port or recipe.serve.port
        url = f"http://127.0.0.1:{port}"
        check_model_dir(self.host_path(model))
        check_adapter_loading(recipe, isinstance(adapter, dict))
        check_ray(recipe)
        host_network = self.c.network() == "host"
        name = recipe.serve.served_model_name
        # the recipe's own vLLM config instead of the image's serve/<hw>.yaml, bound in like any user file
        config = self.visible(serve_config(recipe)) if recipe.serve.config != "auto" else None
        svc = self.service("serve", LAB_MODEL=model, LAB_PORT=str(port),
                           LAB_SERVED_MODEL_NAME=f"{name}-base" if adapter else name,
                           LAB_CHAT_TEMPLATE_KWARGS=json.dumps(recipe.chat_template_kwargs),
                           LAB_SEED=str(recipe.probe.seed), **{k: os.environ.get(k, v) for k, v in
                                                               parallel_env(recipe).items()},
                           # sharing the host's network, listen on loopback only, as the local runtime does
                           LAB_SERVE_BIND="127.0.0.1" if host_network else "0.0.0.0")
        # tensor parallelism, runtime LoRA, tool parsing, a context the model has
        svc["command"] = [*svc["command"], *engine_args(recipe, adapter), *context_args(recipe, self.host_path(model))]
        if config:
            svc["environment"] = {**(svc.get("environment") or {}), "LAB_SERVE_CONFIG": config}
        # the key vLLM requires, as the local runtime passes it (the environment, never argv)
        key, generated = server_key(recipe)
        svc["environment"] = {**(svc.get("environment") or {}), "VLLM_API_KEY": key or "",
                              **adapter_loading_env(recipe), **ray_env(recipe)}
        with claim(url):  # the port's lock, as the local runtime takes it
            container = self.c.start(svc, log)
            record = write_record(url, log, {"container": container.id, "image": svc["image"],
                                             "image_id": container.image.id, **served_record(model, adapter),
                                             "tensor_parallel_size": recipe.serve.tensor_parallel_size,
                                             **ray_record(recipe), **({"api_key": key} if generated else {}),
                                             "adapter_loading": recipe.serve.adapter_loading})
        print(f"docker: {svc['image']} serving {model} (container {container.short_id})", flush=True)
        return wait_healthy(url, recipe.serve.startup_timeout_s, log, record, failed=lambda: self._failed(container.id))

    def _failed(self, container_id: str) -> str | None:
        """The engine's view: the container exited, or its compose health check gave up."""
        st = self.c.state(container_id)
        if not st:
            return "container disappeared"
        if not st.get("Running"):
            return f"container exited unexpectedly (code {st.get('ExitCode')})"
        if (st.get("Health") or {}).get("Status") == "unhealthy":
            return "container is unhealthy (its /health check failed)"
        return None

    def served_path(self, host_path: Path) -> str:
        try:
            return self.c.to_container(self.spec("serve"), host_path)
        except LabError:
            return self.visible(host_path)

    def host_path(self, path: str) -> Path:
        return self.c.to_host(self.spec("serve"), path)


def driver_service(svc: dict) -> dict:
    """The Ray driver's container: the ray service without its GPUs. The driver only asks the
    cluster for workers, from any machine that reaches the head, which may have no GPU runtime
    (NVIDIA's) or /dev/kfd (AMD's) for the engine to give it."""
    return {k: v for k, v in svc.items() if k not in ("deploy", "devices", "group_add")}


def hf_home() -> Path:
    """The host's Hugging Face cache (huggingface_hub's own default), shared by both runtimes:
    mounted at /cache/huggingface in the containers, so a model downloaded once serves both."""
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser().resolve()


def hf_hub_cache() -> Path:
    """Where the host's hub downloads live: HF_HUB_CACHE when set (huggingface_hub reads it before
    HF_HOME), else $HF_HOME/hub. Mounted at /cache/huggingface/hub, where the images' HF_HOME looks."""
    cache = os.environ.get("HF_HUB_CACHE")
    return Path(cache).expanduser().resolve() if cache else hf_home() / "hub"


def choose(name: str, backend: str, recipe_argv: list[str], recipe: Recipe | None = None) -> Runtime:
    """RUNTIME=auto: docker when an engine answers, else local. The docker runtime binds the files
    `recipe` reads into its containers."""
    name = name or os.environ.get("LAB_RUNTIME") or "auto"
    if name not in RUNTIMES:
        raise LabError(f"RUNTIME={name!r} is not one of {', '.join(RUNTIMES)}")
    if name == "auto":
        from lab.containers import engine_available

        name = "docker" if engine_available() else "local"
    return Docker(backend, recipe_argv, recipe) if name == "docker" else Local(recipe_argv)
