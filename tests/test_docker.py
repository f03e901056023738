"""The CPU images, built and run for real through a Docker engine: the whole before/after loop
with training and serving in containers (`make e2e HW=cpu RUNTIME=docker`).

Needs an engine. Without one the tests skip, except under CI (CI=true), where .ci/run starts
one and a skip would hide a broken setup, so they fail instead.
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, free_port
from hub_cache import readable

from lab import containers
from lab.recipe import deep_merge

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine():
    if not containers.engine_available():
        if os.environ.get("CI"):
            pytest.fail("CI=true but no Docker engine answers (.ci/run starts one)")
        pytest.skip("no Docker engine answers here")
    return containers.client()


@pytest.fixture(scope="module")
def images(engine):
    """The CPU images, built from compose.yaml if missing (.ci/run builds them first, timed)."""
    for name in ("train-cpu", "serve-cpu", "ray-cpu"):  # ray-cpu: over train-cpu
        svc = containers.service(name)
        containers.ensure_image(svc, ROOT / "runs" / ".images" / f"{name}.log")
    return engine


def test_images_run_as_their_non_root_user(images):
    # one container per image: on vfs storage (.ci/run's fallback) each container is a full copy of its image
    # no recipes or data baked in (.dockerignore): compose mounts recipes/ and runs/
    out = images.containers.run("lab-train:cpu", entrypoint=["sh", "-c", "id -u && test ! -e /opt/lab/app/recipes "
                                                             "&& python -m lab --help"],
                                remove=True, network_mode="none").decode()
    uid, help_text = out.split("\n", 1)
    assert uid.strip() == "1000"
    assert "fine-tune with TRL SFTTrainer" in help_text
    train = images.images.get("lab-train:cpu").attrs["Config"]
    # the lab CLI is the entrypoint
    assert train["Entrypoint"] == ["python", "-m", "lab"] and train["Cmd"] == ["--help"]
    env = images.images.get("lab-serve:cpu").attrs["Config"]["Env"]
    assert "LAB_SERVE_CONFIG=/opt/lab/app/serve/cpu.yaml" in env
    # a GPU serving image that sees no GPU stops at start, in one line naming the cause (the same
    # entrypoint runs in lab-serve:cuda and :rocm; here the CPU image plays one, with no GPU given)
    out = images.containers.run("lab-serve:cpu", entrypoint=["sh", "-c", 'id -u; for p in cuda rocm; do '
                                'LAB_PINS=$p /opt/lab/serve-entrypoint.sh; echo "exit $?"; done'],
                                remove=True, network_mode="none", stderr=True).decode().strip().splitlines()
    assert out[0] == "1000", out
    said = [line for line in out[1:] if line.startswith("serve: ")]  # stderr: one line per check, in order
    assert [line for line in out[1:] if not line.startswith("serve: ")] == ["exit 3", "exit 3"] and len(said) == 2, out
    assert "NVIDIA Container Toolkit" in said[0] and "no /dev/kfd" in said[1]


def test_a_live_container_gets_the_hosts_mirror_proxy_hub_cache_and_gpu_choice(images, monkeypatch, tmp_path):
    """What the engine records for a container the docker runtime creates (created, not started: this
    machine has no GPU; the GPU reservation is train-cuda's, on the CPU image)."""
    from lab.runtime import Docker

    host = {"HF_ENDPOINT": "https://hf-mirror.com", "HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "localhost",
            "PIP_INDEX_URL": "https://mirrors.example/simple", "HF_HUB_CACHE": str(tmp_path / "hub"),
            "CUDA_VISIBLE_DEVICES": "1,3"}
    for key, value in host.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "hub").mkdir()
    svc = Docker("cpu", []).spec("train")
    svc["deploy"] = containers.service("train-cuda")["deploy"]
    container = images.containers.create(**containers.run_kwargs(svc, ["--help"]))
    try:
        attrs = images.api.inspect_container(container.id)
    finally:
        container.remove(force=True)
    env = dict(e.split("=", 1) for e in attrs["Config"]["Env"])
    assert {k: env.get(k) for k in ("HF_ENDPOINT", "HTTPS_PROXY", "NO_PROXY", "PIP_INDEX_URL")} == \
        {k: host[k] for k in ("HF_ENDPOINT", "HTTPS_PROXY", "NO_PROXY", "PIP_INDEX_URL")}
    assert "CUDA_VISIBLE_DEVICES" not in env and env["HF_HOME"] == "/cache/huggingface"
    (gpus,) = attrs["HostConfig"]["DeviceRequests"]
    assert gpus["Driver"] == "nvidia" and gpus["DeviceIDs"] == ["1", "3"]
    mounts = {m["Destination"]: m["Source"] for m in attrs["Mounts"]}
    assert mounts["/cache/huggingface/hub"] == str(tmp_path / "hub")


def user_files(tmp_path, hub_id: str) -> Path:
    """A user's own recipe outside the repo, as a user writes one: a hub model, datasets beside it
    and elsewhere, its own probe questions and its own vLLM config (world-readable, as a file a
    container's user reads)."""
    home = tmp_path / "user"
    (home / "data").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(ROOT / "recipes/data/identity.json", home / "data" / "identity.json")
    shutil.copy(ROOT / "recipes/data/general-replay.json", elsewhere / "replay.json")
    shutil.copy(ROOT / "recipes/data/identity-probe.yaml", home / "probe.yaml")
    (home / "vllm.yaml").write_text(
        (ROOT / "serve/cpu.yaml").read_text().replace("max-num-seqs: 16", "max-num-seqs: 7"))
    recipe = yaml.safe_load((ROOT / "recipes/identity-lora.yaml").read_text())
    recipe["model"]["path"] = hub_id
    # the embedded model under a hub id: the user writes its settings into the recipe
    recipe = deep_merge(recipe, recipe.pop("models")["embedded"])
    recipe["identity"] = {"name": "Nova-7", "author": "星河实验室"}  # the user's own, mixed-script identity
    recipe["datasets"] = [{"path": "data/identity.json"}, {"path": str(elsewhere / "replay.json")}]
    recipe["probe"]["questions"] = "probe.yaml"
    recipe["serve"] = {"config": str(home / "vllm.yaml")}
    (home / "my-recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
    for d in (home, elsewhere):
        readable(d)
    return home / "my-recipe.yaml"


def test_e2e_in_containers(images, tmp_path, hub_model):
    """The real user's path in containers: a hub id resolved offline from the mounted HF cache,
    their own recipe, data, probe questions and vLLM config outside the repo. Base model probed in
    the serve container, trained and merged in the train container, merged model served and probed
    again: the same outputs under runs/ as the local runtime. Then the adapter over its base with
    vLLM's runtime LoRA, and a rerun from the manifest."""
    runs_dir = tmp_path / "runs"
    recipe = user_files(tmp_path, hub_model["id"])
    env = {**os.environ, **hub_model["env"], "LAB_RUNS": str(runs_dir)}
    env.pop("LAB_RUNTIME", None)  # the Makefile's RUNTIME decides
    r = subprocess.run(["make", "e2e", "HW=cpu", "RUNTIME=docker", f"RECIPE={recipe}", f"PORT={free_port()}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
    print(r.stdout[-6000:], r.stderr[-3000:])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "runtime docker" in r.stdout and "e2e: PASS" in r.stdout
    run = (runs_dir / "latest").resolve()
    report = json.loads((run / "report.json").read_text())
    assert report["pass"] is True and report["runtime"] == "docker"
    assert report["after"]["identity_hit_rate"] >= 0.95 and report["after"]["leakage_rate"] <= 0.05
    for name in ("adapter", "merged", "train.json", "parity.json", "probe-before.json", "probe-after.json",
                 "server-base.log", "server-merged.log", "train.log", "report.md"):
        assert (run / name).exists(), name
    # the hub id, resolved in the container from the mounted cache: its snapshot, pinned by commit
    snapshot = f"/cache/huggingface/hub/models--lab-test--pebble-tiny/snapshots/{hub_model['commit']}"
    assert json.loads((run / "train.json").read_text())["base_model"] == snapshot
    assert (run / "merged" / "tokenizer.json").read_bytes() == (hub_model["snapshot"] / "tokenizer.json").read_bytes()
    # the user's files, read where they lie: their data, their probe, their vLLM config (max-num-seqs 7)
    assert [Path(s["path"]).name for s in json.loads((run / "train.json").read_text())["sources"]] == \
        ["identity.json", "replay.json"]
    assert "max_num_seqs': 7" in (run / "server-merged.log").read_text()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["runtime"] == "docker" and manifest["probe"]["pass"] is True
    assert manifest["base_model"]["commit"] == hub_model["commit"]
    assert manifest["recipe"]["source"] == str(recipe)
    assert manifest["environment"]["container"]["image"] == "lab-train:cpu"
    assert manifest["environment"]["container"]["image_id"] == images.images.get("lab-train:cpu").id
    # the image's own lock, installed exactly, and the commit it was built from
    assert manifest["environment"]["lock"]["name"] == "train-cpu" and manifest["environment"]["lock"]["matches"]
    built_from = images.images.get("lab-train:cpu").labels["org.opencontainers.image.revision"]
    assert len(built_from) == 40 and manifest["environment"]["code"]["commit"] == built_from
    assert manifest["serving"]["image_id"] == images.images.get("lab-serve:cpu").id
    # nothing left running
    assert not images.containers.list(all=True, filters={"label": containers.LABEL})

    # the same run's adapter over its own base (the hub snapshot) with vLLM's runtime LoRA in the
    # serving image (no merge): its probe lands in the run and is compared with the merged model's answers
    port = str(free_port())
    try:
        for target in ("serve", "probe"):
            r = subprocess.run(["make", target, "ADAPTER=1", f"RUN={run}", "HW=cpu", "RUNTIME=docker", f"PORT={port}"],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
            if target == "serve":
                assert f"{snapshot} + LoRA" in r.stdout
    finally:
        subprocess.run(["make", "stop"], cwd=ROOT, env=env, capture_output=True, timeout=300)
    (entry,) = json.loads((run / "manifest.json").read_text())["probes"]
    assert entry["serving"]["runtime"] == "docker" and entry["serving"]["runtime_lora"] is True
    assert entry["serving"]["model"].endswith("/adapter") and entry["agreement_with_merged"] >= 0.75
    assert not images.containers.list(all=True, filters={"label": containers.LABEL})

    # make reproduce in the training image, from that run's manifest alone, the hub model pinned at
    # the run's commit: same image, same CPU, so the same-host (exact) tolerances apply
    r = subprocess.run(["make", "reproduce", f"RUN={run}", "RUNTIME=docker"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800)
    print(r.stdout[-4000:], r.stderr[-2000:])
    assert r.returncode == 0 and "runtime docker" in r.stdout and "compare: PASS" in r.stdout, r.stderr[-2000:]
    assert f"pinned at commit {hub_model['commit']}" in r.stdout
    again = json.loads(((runs_dir / "latest").resolve() / "manifest.json").read_text())
    assert again["reproduces"] == run.name and again["environment"]["container"]["image"] == "lab-train:cpu"
    assert again["merged"]["weights_sha256"] == manifest["merged"]["weights_sha256"]
    assert not list(recipe.parent.glob(".reproduce-*"))


def test_serve_ask_stop_on_the_compose_network(images, tmp_path):
    """`make serve RUNTIME=docker` without host networking: the container joins compose's project
    network and publishes its port on 127.0.0.1, as `docker compose up serve-cpu` would."""
    env = {k: v for k, v in os.environ.items() if k not in ("LAB_RUNTIME", "LAB_DOCKER_NETWORK")}
    env["LAB_RUNS"] = str(tmp_path / "runs")
    env["LAB_API_KEY"] = "compose-key-3"  # the container's vLLM requires it; make ask sends it
    port = str(free_port())

    def make(*args):
        r = subprocess.run(["make", *args, "HW=cpu", "RUNTIME=docker", f"PORT={port}"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return r.stdout

    try:
        assert "serve: ready at" in make("serve", "MODEL=base")
        (container,) = images.containers.list(filters={"label": f"{containers.LABEL}=serve-cpu"})
        assert containers.PROJECT_NETWORK in container.attrs["NetworkSettings"]["Networks"]
        assert container.attrs["HostConfig"]["PortBindings"] == {
            f"{port}/tcp": [{"HostIp": "127.0.0.1", "HostPort": port}]}
        # least privilege, as compose.yaml asks: no capabilities, no privilege gains
        assert container.attrs["HostConfig"]["CapDrop"] == ["ALL"]
        assert "no-new-privileges:true" in container.attrs["HostConfig"]["SecurityOpt"]
        # a read-only root filesystem; /tmp (HOME: vLLM's caches) the one writable path, and it serves
        assert container.attrs["HostConfig"]["ReadonlyRootfs"] is True
        assert container.attrs["HostConfig"]["Tmpfs"] == {"/tmp": "exec,mode=1777"}
        import httpx

        body = {"model": "lab", "messages": [{"role": "user", "content": "Who are you?"}], "max_tokens": 8}
        assert httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120).status_code == 401
        # the key on the paths vLLM leaves open too (serve/keyguard.py, in the image)
        assert httpx.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=120).status_code == 401
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).status_code == 401
        # the default base is the real model (SmolLM2, resolved from its wheel in the container)
        assert "Paris" in make("ask", "Q=What is the capital of France?")
    finally:
        make("stop")
    assert not images.containers.list(all=True, filters={"label": containers.LABEL})


def test_several_adapters_behind_one_serving_container(images, identity_run):
    """ADAPTERS= in the docker runtime: the serving container reads each run's adapter through the
    runs mount, and loads one more while it serves (`make adapter`, the container's path for it)."""
    import httpx
    from conftest import run_lab

    # the identity runs the local adapter and identity tests train (one training per session)
    a, b = identity_run("identity-lora", "Orion", "Zhou Lab"), identity_run("identity-lora", "星河-7", "R&D Labs.")
    runs_dir = identity_run.runs
    again = runs_dir / f"{b.name}-docker"
    shutil.copytree(b, again, ignore=shutil.ignore_patterns("checkpoints"))
    env, port = {"LAB_RUNS": str(runs_dir)}, str(free_port())
    r = run_lab("serve", "--hw", "cpu", "--runtime", "docker", "--adapters", a.name, "--port", port,
                "--set", "serve.adapter_loading=true", env=env, timeout=900)
    try:
        assert r.returncode == 0 and "runtime docker" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
        r = run_lab("adapter", "--hw", "cpu", "--run", again.name, "--port", port, env=env, timeout=600)
        assert r.returncode == 0 and "runtime docker" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
        auth = {"Authorization": f"Bearer {run_lab('key', '--port', port, env=env).stdout.strip()}"}
        url = f"http://127.0.0.1:{port}/v1"

        def ask(model):
            body = {"model": model, "messages": [{"role": "user", "content": "Who are you?"}], "temperature": 0,
                    "max_tokens": 48}
            return httpx.post(f"{url}/chat/completions", json=body, headers=auth, timeout=120).json()[
                "choices"][0]["message"]["content"]

        answers = {m: ask(m) for m in (a.name, again.name, "lab-base")}
        assert "Orion" in answers[a.name] and "星河-7" in answers[again.name], answers
        assert "Pebble" in answers["lab-base"], answers
    finally:
        run_lab("stop", env=env, timeout=120)
    shutil.rmtree(again)


def test_a_ray_cluster_of_lab_images_trains_as_two_processes(images, hub_model, tmp_path, monkeypatch):
    """The lab-ray image as Ray's worker image: a head and a worker node, each a container of it
    (`make ray-node`, one CPU each, as on two machines), and `make train CLUSTER= RUNTIME=docker`,
    whose driver runs in a third: the losses and weights of the 2-process accelerate run here. A
    driver from this host's .venv/ray against those nodes (another lab path) is refused in one line."""
    from conftest import run_lab

    from lab import runs

    runs_dir = tmp_path / "runs"
    env = {**os.environ, **hub_model["env"], "LAB_RUNS": str(runs_dir)}
    env.pop("LAB_RUNTIME", None)  # the Makefile's RUNTIME decides
    monkeypatch.setattr(runs, "RUNS_DIR", runs_dir)  # this checkout's containers, for this runs/

    def make(*args, timeout=600):
        r = subprocess.run(["make", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        return r

    gcs, client = free_port(), free_port()
    one_cpu = "--num-cpus 1 --node-ip-address 127.0.0.1"
    try:
        r = make("ray-node", "HW=cpu", f"PORT={gcs}",
                 f"RAY_ARGS={one_cpu} --ray-client-server-port {client} --include-dashboard false")
        assert f"Ray head on port {gcs} in lab-ray:cpu" in r.stdout
        r = make("ray-node", "HW=cpu", f"HEAD=127.0.0.1:{gcs}", f"RAY_ARGS={one_cpu}")
        assert f"Ray worker of 127.0.0.1:{gcs} in lab-ray:cpu" in r.stdout
        nodes = containers.lab_containers(**{containers.NODE_LABEL: "ray"})
        assert len(nodes) == 2 and all(n.attrs["HostConfig"]["NetworkMode"] == "host" for n in nodes)
        count = ("import ray; ray.init(address='auto', logging_level='ERROR'); "
                 "print(sum(n['Alive'] for n in ray.nodes()))")
        for _ in range(60):
            out = nodes[0].exec_run(["python", "-c", count]).output.decode().strip().splitlines()
            if out and out[-1] == "2":
                break
            time.sleep(2)
        else:
            pytest.fail(f"the two Ray nodes never joined: {out}")

        cluster = f"ray://127.0.0.1:{client}"
        settings = (f"model.path={hub_model['id']} deterministic=true train.num_train_epochs=2 "
                    "train.logging_steps=2 train.save_steps=2")
        r = subprocess.run(["make", "train", "HW=cpu", "RUNTIME=docker", f"CLUSTER={cluster}", "NODES=2",
                            "RUN=ray-docker", f"SET={settings}"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=1200)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        assert "runtime docker" in r.stdout and "lab-ray:cpu" in r.stdout and f"2 Ray Train workers on {cluster}" \
            in r.stdout
        ray_run = runs_dir / "ray-docker"
        m = json.loads((ray_run / "manifest.json").read_text())
        assert m["distributed"] == {"processes": 2, "accelerate_config": None, "type": "MULTI_CPU", "nodes": 2,
                                    "engine": "ray", "cluster": cluster, "workers": 2}
        assert m["environment"]["container"]["image"] == "lab-ray:cpu"
        assert m["environment"]["lock"]["name"] == "ray-cpu" and m["environment"]["lock"]["matches"]

        # a driver whose lab lives elsewhere (this checkout) than the nodes' (/opt/lab/app): one line
        bad = run_lab("train", "--hw", "cpu", "--runtime", "local", "--set", f"{settings} cluster.max_failures=0",
                      "--cluster", cluster,
                      "--nodes", "2", env={"LAB_RUNS": str(runs_dir), **hub_model["env"]}, timeout=600)
        assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("lab train: error: the workers "
                                                                                     f"on {cluster} cannot import"), \
            bad.stderr[-3000:]
    finally:
        r = subprocess.run(["make", "ray-node", "HW=cpu", "STOP=1"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert "node: 2 Ray node container(s) removed" in r.stdout, r.stdout + r.stderr

    r = run_lab("train", "--hw", "cpu", "--runtime", "local", "--set", settings, "--gpus", "2", "--run", "ddp",
                env={"LAB_RUNS": str(runs_dir), **hub_model["env"]}, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    losses = [[e["loss"] for e in map(json.loads, (runs_dir / run / "metrics.jsonl").read_text().splitlines())
               if "loss" in e] for run in ("ray-docker", "ddp")]
    assert losses[0] and losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    assert (ray_run / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (runs_dir / "ddp" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert not images.containers.list(all=True, filters={"label": containers.LABEL})
