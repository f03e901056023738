"""Images and compose, checked without building them: lint, compose validity, what each
hardware's services get, and that the images install from the same pins as `make setup`.
(Building and running the CPU images for real is tests/test_docker.py.)"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_lab

from lab import containers
from lab.errors import LabError

HW = ("cpu", "cuda", "rocm")
BIN = Path(sys.executable).parent  # hadolint and docker-compose come from requirements/dev.txt


def pin(path: str, package: str) -> str:
    text = (ROOT / "requirements" / path).read_text()
    return re.search(rf"^{re.escape(package)}==(\S+)", text, re.M).group(1)


def test_interpolation_follows_compose():
    env = {"SET": "x", "EMPTY": ""}
    assert containers.interpolate("${SET}-${UNSET:-d}-${EMPTY:-d}-${EMPTY-d}-${UNSET-d}-$$-$SET", env) == "x-d-d--d-$-x"
    with pytest.raises(LabError, match="UNSET must be set"):
        containers.interpolate("${UNSET:?give it}", env)
    # a default that is itself a variable (compose resolves it inside out); $$ and values stay literal
    nested = "${A:-${B:-./cache}/hub}"
    assert [containers.interpolate(nested, e) for e in ({}, {"B": "/hf"}, {"A": "/hub", "B": "/hf"})] == \
        ["./cache/hub", "/hf/hub", "/hub"]
    assert containers.interpolate("$${SET}-${V}", {"SET": "x", "V": "${SET}"}) == "${SET}-${SET}"


def test_every_hardware_has_a_train_a_serve_and_a_ray_service():
    services = containers.services()
    assert set(services) == {f"{role}-{hw}" for role in ("train", "serve", "ray") for hw in HW}
    for name, svc in services.items():
        assert svc["profiles"] == [name.split("-")[1]]


@pytest.mark.parametrize("hw", HW)
def test_lab_reads_compose_as_docker_compose_does(hw, tmp_path):
    """Our reading of compose.yaml (what RUNTIME=docker runs) == `docker compose config`."""
    env = {"LAB_PORT": "8123", "LAB_RUNS_DIR": str(tmp_path), "LAB_CHAT_TEMPLATE_KWARGS": '{"enable_thinking": false}'}
    out = subprocess.run([str(BIN / "docker-compose"), "-f", str(ROOT / "compose.yaml"), "--profile", hw,
                          "config", "--format", "json"], capture_output=True, text=True,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    theirs = json.loads(out.stdout)["services"]
    assert set(theirs) == {f"train-{hw}", f"serve-{hw}", f"ray-{hw}"}
    for name, their in theirs.items():
        ours = containers.run_kwargs(containers.service(name, env))
        assert ours["image"] == their["image"]
        assert ours["command"] == their["command"] and ours.get("entrypoint") == their.get("entrypoint")
        assert ours.get("user") == their.get("user")
        assert {k: v for k, v in ours["environment"].items()} == {k: v for k, v in their["environment"].items()
                                                                 if v is not None}
        assert {(v["bind"], v["mode"] == "ro") for v in ours["volumes"].values()} == \
               {(v["target"], v.get("read_only", False)) for v in their["volumes"]}
        assert ours["volumes"][str(tmp_path)]["bind"] == "/runs"
        assert ours.get("devices", []) == [f"{d['source']}:{d['target']}:{d['permissions']}"
                                           for d in their.get("devices", [])]
        assert ours.get("group_add", []) == their.get("group_add", [])
        assert ours.get("security_opt", []) == their.get("security_opt", [])
        assert ours.get("ipc_mode") == their.get("ipc")
        assert ours.get("cap_drop") == their.get("cap_drop") == ["ALL"]
        assert "no-new-privileges:true" in ours["security_opt"]
        assert str(ours.get("shm_size", "")) == str(their.get("shm_size", "")) or \
            int(their.get("shm_size", 0)) == _bytes(ours.get("shm_size", "0"))
        assert ours.get("healthcheck", {}).get("test") == their.get("healthcheck", {}).get("test")
        assert ours.get("ports", {}) == {f"{p['target']}/tcp": (p["host_ip"], int(p["published"]))
                                         for p in their.get("ports", [])}
        spec = containers.service(name, env)["build"]
        assert {k: str(v) for k, v in spec["args"].items()} == their["build"]["args"]
        assert spec["dockerfile"] == their["build"]["dockerfile"]


def _bytes(size: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    return int(size[:-1]) * units[size[-1].lower()] if size[-1].lower() in units else int(size)


def test_hardware_specific_settings():
    kw = {name: containers.run_kwargs(containers.service(name)) for name in containers.services()}
    for role in ("train", "serve", "ray"):
        cuda, rocm, cpu = kw[f"{role}-cuda"], kw[f"{role}-rocm"], kw[f"{role}-cpu"]
        (gpu,) = cuda["device_requests"]
        assert gpu["Driver"] == "nvidia" and gpu["Count"] == -1 and gpu["Capabilities"] == [["gpu"]]
        assert rocm["devices"] == ["/dev/kfd:/dev/kfd:rwm", "/dev/dri:/dev/dri:rwm"]
        assert rocm["group_add"][0] == "video"
        assert rocm["security_opt"] == ["no-new-privileges:true", "seccomp=unconfined"]
        assert rocm["ipc_mode"] == "host" and "shm_size" not in rocm  # AMD's documented setting; CUDA: shm_size
        assert "ipc_mode" not in cuda and cuda["shm_size"] == "16g"
        for key in ("device_requests", "devices", "group_add"):
            assert key not in cpu
        for svc in (cuda, rocm, cpu):
            assert svc["cap_drop"] == ["ALL"] and "no-new-privileges:true" in svc["security_opt"]
    assert kw["train-rocm"]["environment"]["TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL"] == "1"
    # Ray's worker image runs the training image's lab: the same entrypoint, user, mounts and environment
    for hw in HW:
        train, ray = kw[f"train-{hw}"], kw[f"ray-{hw}"]
        for key in ("entrypoint", "user", "volumes", "environment", "devices", "group_add", "device_requests"):
            assert ray.get(key) == train.get(key), (hw, key)
    assert kw["ray-cpu"]["shm_size"] == "2g"  # Ray's object store: more than Docker's 64 MiB of /dev/shm
    assert kw["serve-rocm"]["environment"]["VLLM_ROCM_USE_AITER"] == "0"
    assert kw["serve-cpu"]["shm_size"] == "1g"
    # the render group is the host's number, taken from /dev/kfd by the runtime
    svc = containers.service("train-rocm", {"LAB_RENDER_GID": "993"})
    assert containers.run_kwargs(svc)["group_add"] == ["video", "993"]


def test_serve_services_publish_on_loopback_mount_read_only_and_check_health():
    env = {"LAB_PORT": "8555", "LAB_MODEL": "/runs/x/merged", "LAB_CHAT_TEMPLATE_KWARGS": '{"enable_thinking": true}'}
    for hw in HW:
        kw = containers.run_kwargs(containers.service(f"serve-{hw}", env))
        assert kw["ports"] == {"8555/tcp": ("127.0.0.1", 8555)}
        assert {v["mode"] for v in kw["volumes"].values()} == {"ro"}
        assert "/health" in " ".join(kw["healthcheck"]["test"]) and kw["environment"]["LAB_PORT"] == "8555"
        assert kw["environment"]["LAB_CHAT_TEMPLATE_KWARGS"] == '{"enable_thinking": true}'
        assert kw["command"][:2] == ["--model", "/runs/x/merged"]
        assert kw["healthcheck"]["start_period"] == 15 * 60 * 10**9
        # host networking (engines without a bridge) publishes nothing
        assert "ports" not in containers.run_kwargs(containers.service(f"serve-{hw}", env), network="host")


def test_hf_token_passes_through_and_is_never_baked(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert containers.run_kwargs(containers.service("train-cpu"))["environment"]["HF_TOKEN"] == "hf_secret"
    monkeypatch.delenv("HF_TOKEN")
    assert "HF_TOKEN" not in containers.run_kwargs(containers.service("train-cpu"))["environment"]
    for dockerfile in (ROOT / "docker").glob("*.Dockerfile"):
        assert not re.search(r"(TOKEN|PASSWORD|SECRET|API_KEY)", dockerfile.read_text()), dockerfile


def test_paths_map_between_host_and_container(tmp_path):
    svc = containers.service("serve-cpu",
                             {"LAB_RUNS_DIR": str(tmp_path / "runs"), "LAB_CACHE_DIR": str(tmp_path / "c")})
    assert containers.to_container(svc, tmp_path / "runs" / "r1" / "merged") == "/runs/r1/merged"
    assert containers.to_host(svc, "/cache/lab/fixture-1") == tmp_path / "c" / "lab" / "fixture-1"
    with pytest.raises(LabError, match="not visible in the serve-cpu container"):
        containers.to_container(svc, tmp_path / "elsewhere")
    # the Hugging Face cache is its own mount inside /cache: the deepest mount wins both ways
    svc = containers.service("train-cpu", {"LAB_CACHE_DIR": str(tmp_path / "c"), "LAB_HF_HOME": str(tmp_path / "hf")})
    snap = "/cache/huggingface/hub/models--o--m/snapshots/abc"
    assert containers.to_host(svc, snap) == tmp_path / "hf" / "hub/models--o--m/snapshots/abc"
    assert containers.to_container(svc, tmp_path / "hf" / "hub") == "/cache/huggingface/hub"


def test_user_files_are_bound_read_only_at_their_own_path_and_never_over_the_image(tmp_path):
    (tmp_path / "data.json").write_text("[]")
    assert containers.user_mount(tmp_path / "data.json") == f"{tmp_path}/data.json:{tmp_path}/data.json:ro"
    svc = {"name": "train-cpu", "volumes": [containers.user_mount(tmp_path / "data.json")]}
    assert containers.to_container(svc, tmp_path / "data.json") == str(tmp_path / "data.json")
    for path, says in (("/usr/share", "over the container's own /usr"), ("/opt", "over the container's own /opt/lab"),
                       ("/tmp", "over the container's own /tmp"), ("/", "over the container's own"),
                       (str(tmp_path / "missing"), "does not exist")):
        with pytest.raises(LabError, match=says):
            containers.user_mount(path)
    (tmp_path / "a:b").mkdir()
    with pytest.raises(LabError, match="cannot be mounted"):
        containers.user_mount(tmp_path / "a:b")


def test_unmapped_compose_keys_are_refused(tmp_path, monkeypatch):
    compose = tmp_path / "compose.yaml"
    compose.write_text("services:\n  train-cpu:\n    image: x\n    privileged: true\n")
    monkeypatch.setattr(containers, "COMPOSE_FILE", compose)
    with pytest.raises(LabError, match="privileged"):
        containers.services()


def test_dockerfiles_are_hadolint_clean():
    files = sorted(str(p) for p in (ROOT / "docker").glob("*.Dockerfile"))
    assert len(files) == 3  # train, serve, ray
    out = subprocess.run([str(BIN / "hadolint"), *files], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfiles_take_their_base_as_argument_and_run_as_non_root():
    for dockerfile in (ROOT / "docker").glob("*.Dockerfile"):
        text = dockerfile.read_text()
        froms = [line.split()[1] for line in text.splitlines() if line.startswith("FROM")]
        if dockerfile.name == "ray.Dockerfile":  # over the training image: root only to install, then its user
            assert text.split("FROM", 1)[0].count("ARG TRAIN_IMAGE=") == 1 and froms == ["${TRAIN_IMAGE}"]
            assert re.findall(r"^USER (\S+)", text, re.M) == ["0", "${LAB_UID}"] and "ARG LAB_UID=1000" in text
            continue
        assert text.split("FROM", 1)[0].count("ARG BASE_IMAGE=") == 1
        assert froms[0] == "${BASE_IMAGE}" and set(froms) == {"${BASE_IMAGE}", "base", "scratch"}
        assert re.findall(r"^USER (\S+)", text, re.M) == ["${LAB_UID}"] and "ARG LAB_UID=1000" in text


def test_images_install_the_same_pins_as_make_setup():
    services = containers.services()
    install = (ROOT / "docker" / "install.sh").read_text()
    assert 'reqs="$src/requirements/$role-$pins.txt"' in install  # the files `make setup` installs
    for name, svc in services.items():
        role, hw = name.split("-")
        assert svc["build"]["args"]["PINS"] == hw and svc["build"]["dockerfile"] == f"docker/{role}.Dockerfile"
        assert (ROOT / "requirements" / f"{role}-{hw}.txt").is_file()
        if role == "ray":  # installed over that hardware's training image
            assert svc["build"]["args"]["TRAIN_IMAGE"] == services[f"train-{hw}"]["image"]
            assert f"-r train-{hw}.txt" in (ROOT / "requirements" / f"ray-{hw}.txt").read_text()
    # bases that already carry the pinned package must carry exactly the pinned version
    assert services["train-cuda"]["build"]["args"]["BASE_IMAGE"].startswith(
        f"pytorch/pytorch:{pin('train-cuda.txt', 'torch')}-")
    for hw in ("cuda", "rocm"):
        assert services[f"serve-{hw}"]["build"]["args"]["BASE_IMAGE"].endswith(f":v{pin(f'serve-{hw}.txt', 'vllm')}")
    assert "device-gfx1151" in (ROOT / "requirements" / "torch-rocm.txt").read_text()
    assert services["train-rocm"]["build"]["args"]["GPU_ARCH"] == "gfx1151"
    # one name for the AMD architecture, in compose, the Makefile and the installers
    gfx942 = containers.services({"GPU_ARCH": "gfx942"})["train-rocm"]
    assert gfx942["image"] == "lab-train:rocm-gfx942" and gfx942["build"]["args"]["GPU_ARCH"] == "gfx942"
    for f in ("compose.yaml", "Makefile", "requirements/install.sh", "docker/train.Dockerfile", "README.md"):
        assert "LAB_GPU_ARCH" not in (ROOT / f).read_text(), f
    # what the ROCm training image must have to run at all: libatomic for AMD's torch, a compiler for Triton
    assert set(services["train-rocm"]["build"]["args"]["APT_PACKAGES"].split()) >= {"libatomic1", "gcc"}


def test_build_options_refuse_bad_input(tmp_path):
    r = run_lab("images", "--hw", "tpu")
    assert r.returncode == 2 and "HW='tpu'" in r.stderr and "Traceback" not in r.stderr
    r = run_lab("images", "--hw", "cpu", "--wheels", str(tmp_path))
    assert r.returncode == 2 and "no *.whl files" in r.stderr
    (tmp_path / "ca.crt").write_text("not a cert")
    r = run_lab("images", "--hw", "cpu", "--ca-bundle", str(tmp_path / "ca.crt"))
    assert r.returncode == 2 and "not a PEM certificate" in r.stderr


def test_docker_runtime_without_an_engine_is_one_line(tmp_path):
    r = run_lab("train", "--hw", "cpu", "--runtime", "docker",
                env={"DOCKER_HOST": f"unix://{tmp_path}/no.sock", "LAB_RUNS": str(tmp_path / "runs")})
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("lab train: error: no Docker engine answers")
    assert "Traceback" not in r.stderr
    r = run_lab("e2e", "--hw", "cpu", "--runtime", "podman")
    assert r.returncode == 2 and "RUNTIME='podman'" in r.stderr


def test_compose_cli_is_available_for_users():
    """compose.yaml is also the file users run by hand; its binary is pinned in requirements/dev.txt."""
    assert shutil.which("docker-compose", path=str(BIN))


HOST_ENV = {"HF_ENDPOINT": "https://hf-mirror.com", "HTTPS_PROXY": "http://proxy:3128", "no_proxy": "localhost",
            "PIP_INDEX_URL": "https://mirrors.example/simple"}


def test_the_hosts_hub_mirror_proxies_and_index_pass_through(monkeypatch):
    for key, value in HOST_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    for hw in HW:
        env = containers.run_kwargs(containers.service(f"train-{hw}"))["environment"]
        assert {k: env.get(k) for k in HOST_ENV} == HOST_ENV
        assert "CUDA_VISIBLE_DEVICES" not in env  # the devices themselves are narrowed (below)
    for key in HOST_ENV:
        monkeypatch.delenv(key)
    assert not set(HOST_ENV) & set(containers.run_kwargs(containers.service("train-cpu"))["environment"])


@pytest.mark.parametrize("var,value,ids", [("CUDA_VISIBLE_DEVICES", "1,3", ["1", "3"]),
                                           ("NVIDIA_VISIBLE_DEVICES", "GPU-5f1c", ["GPU-5f1c"]),
                                           ("CUDA_VISIBLE_DEVICES", "all", None)])
def test_a_container_gets_the_gpus_the_host_selected(monkeypatch, var, value, ids):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv(var, value)
    for role in ("train", "serve"):
        (gpu,) = containers.run_kwargs(containers.service(f"{role}-cuda"))["device_requests"]
        assert gpu["DeviceIDs"] == (ids or []) and gpu["Count"] == (0 if ids else -1)


def test_amd_selection_passes_through_and_an_empty_one_is_refused(monkeypatch):
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "1")
    monkeypatch.setenv("ROCR_VISIBLE_DEVICES", "0,1")
    for role in ("train", "serve"):
        env = containers.run_kwargs(containers.service(f"{role}-rocm"))["environment"]
        assert (env["HIP_VISIBLE_DEVICES"], env["ROCR_VISIBLE_DEVICES"]) == ("1", "0,1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(LabError, match="CUDA_VISIBLE_DEVICES='' hides every GPU"):
        containers.run_kwargs(containers.service("train-cuda"))


def test_the_hosts_hf_hub_cache_is_mounted_where_the_images_look(monkeypatch, tmp_path):
    from lab.runtime import hf_home, hf_hub_cache

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert hf_hub_cache() == hf_home() / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hf_hub_cache() == tmp_path / "hub"
    for name, mode in (("train-cpu", "rw"), ("serve-cpu", "ro")):
        svc = containers.service(name, {"LAB_HF_HUB_CACHE": str(tmp_path / "hub")})
        volumes = containers.run_kwargs(svc)["volumes"]
        assert volumes[str(tmp_path / "hub")] == {"bind": "/cache/huggingface/hub", "mode": mode}


def test_the_ray_driver_container_asks_for_no_gpu():
    """make train CLUSTER= RUNTIME=docker may run on a machine without a GPU runtime: its container
    (the lab-ray image) gets no GPU reservation or device, the nodes' containers do."""
    from lab.runtime import driver_service

    for hw in HW:
        node = containers.run_kwargs(containers.service(f"ray-{hw}"))
        driver = containers.run_kwargs(driver_service(containers.service(f"ray-{hw}")))
        for key in ("device_requests", "devices", "group_add"):
            assert key not in driver, (hw, key)
        assert driver["image"] == node["image"] and driver["volumes"] == node["volumes"]
    assert "device_requests" in containers.run_kwargs(containers.service("ray-cuda"))
    assert "devices" in containers.run_kwargs(containers.service("ray-rocm"))
