"""The CPU images, built and run for real through a Docker engine: the whole before/after loop
with training and serving in containers (`make e2e HW=cpu RUNTIME=docker`).

Needs an engine. Without one the tests skip, except under CI (CI=true), where .ci/run starts
one and a skip would hide a broken setup, so they fail instead.
"""

import json
import os
import subprocess

import pytest

from conftest import ROOT, free_port

from lab import containers

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
    for name in ("train-cpu", "serve-cpu"):
        svc = containers.service(name)
        containers.ensure_image(svc, ROOT / "runs" / ".images" / f"{name}.log")
    return engine


def test_images_run_as_their_non_root_user(images):
    for image in ("lab-train:cpu", "lab-serve:cpu"):
        out = images.containers.run(image, entrypoint=["id", "-u"], remove=True, network_mode="none")
        assert out.decode().strip() == "1000", image
    help_text = images.containers.run("lab-train:cpu", remove=True, network_mode="none").decode()
    assert "fine-tune with TRL SFTTrainer" in help_text  # the lab CLI is the entrypoint
    env = images.images.get("lab-serve:cpu").attrs["Config"]["Env"]
    assert "LAB_SERVE_CONFIG=/opt/lab/app/serve/cpu.yaml" in env


def test_e2e_in_containers(images, tmp_path):
    """Base model probed in the serve container, trained and merged in the train container,
    merged model served and probed again: the same outputs under runs/ as the local runtime."""
    runs_dir = tmp_path / "runs"
    env = {**os.environ, "LAB_RUNS": str(runs_dir)}
    env.pop("LAB_RUNTIME", None)  # the Makefile's RUNTIME decides
    r = subprocess.run(["make", "e2e", "HW=cpu", "RUNTIME=docker", f"PORT={free_port()}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=2400)
    print(r.stdout[-6000:], r.stderr[-3000:])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "runtime docker" in r.stdout and "e2e: PASS" in r.stdout
    run = (runs_dir / "latest").resolve()
    report = json.loads((run / "report.json").read_text())
    assert report["pass"] is True and report["runtime"] == "docker"
    assert report["after"]["identity_hit_rate"] >= 0.9
    for name in ("adapter", "merged", "train.json", "parity.json", "probe-before.json", "probe-after.json",
                 "server-base.log", "server-merged.log", "train.log", "report.md"):
        assert (run / name).exists(), name
    assert json.loads((run / "train.json").read_text())["base_model"].startswith("/cache/lab/fixture-")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["runtime"] == "docker" and manifest["probe"]["pass"] is True
    assert manifest["environment"]["container"]["image"] == "lab-train:cpu"
    assert manifest["environment"]["container"]["image_id"] == images.images.get("lab-train:cpu").id
    # the image's own lock, installed exactly, and the commit it was built from
    assert manifest["environment"]["lock"]["name"] == "train-cpu" and manifest["environment"]["lock"]["matches"]
    built_from = images.images.get("lab-train:cpu").labels["org.opencontainers.image.revision"]
    assert len(built_from) == 40 and manifest["environment"]["code"]["commit"] == built_from
    assert manifest["serving"]["image_id"] == images.images.get("lab-serve:cpu").id
    # nothing left running
    assert not images.containers.list(all=True, filters={"label": containers.LABEL})

    # the same run's adapter over the base with vLLM's runtime LoRA in the serving image (no merge):
    # its probe lands in the run and is compared with the merged model's answers
    port = str(free_port())
    try:
        for target in ("serve", "probe"):
            r = subprocess.run(["make", target, "ADAPTER=1", f"RUN={run}", "HW=cpu", "RUNTIME=docker", f"PORT={port}"],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    finally:
        subprocess.run(["make", "stop"], cwd=ROOT, env=env, capture_output=True, timeout=300)
    (entry,) = json.loads((run / "manifest.json").read_text())["probes"]
    assert entry["serving"]["runtime"] == "docker" and entry["serving"]["runtime_lora"] is True
    assert entry["serving"]["model"].endswith("/adapter") and entry["agreement_with_merged"] >= 0.75
    assert not images.containers.list(all=True, filters={"label": containers.LABEL})

    # make reproduce in the training image, from that run's manifest alone: same image, same
    # CPU, so the same-host (exact) tolerances apply
    r = subprocess.run(["make", "reproduce", f"RUN={run}", "RUNTIME=docker"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800)
    print(r.stdout[-4000:], r.stderr[-2000:])
    assert r.returncode == 0 and "runtime docker" in r.stdout and "compare: PASS" in r.stdout, r.stderr[-2000:]
    again = json.loads(((runs_dir / "latest").resolve() / "manifest.json").read_text())
    assert again["reproduces"] == run.name and again["environment"]["container"]["image"] == "lab-train:cpu"
    assert again["merged"]["weights_sha256"] == manifest["merged"]["weights_sha256"]
    assert not list((ROOT / "recipes").glob(".reproduce-*"))


def test_serve_ask_stop_on_the_compose_network(images, tmp_path):
    """`make serve RUNTIME=docker` without host networking: the container joins compose's project
    network and publishes its port on 127.0.0.1, as `docker compose up serve-cpu` would."""
    env = {k: v for k, v in os.environ.items() if k not in ("LAB_RUNTIME", "LAB_DOCKER_NETWORK")}
    env["LAB_RUNS"] = str(tmp_path / "runs")
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
        assert container.attrs["HostConfig"]["PortBindings"] == {f"{port}/tcp": [{"HostIp": "127.0.0.1", "HostPort": port}]}
        assert "Pebble" in make("ask", "Q=Who are you?")  # the embedded base model's own persona
    finally:
        make("stop")
    assert not images.containers.list(all=True, filters={"label": containers.LABEL})
