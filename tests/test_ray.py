"""Ray Train on a real two-node Ray cluster (a head and a worker started with `ray start` from
.venv/ray, one CPU each, so the two workers land on different nodes): `lab train --cluster`
gives the losses and weights of the 2-process accelerate run; a worker killed mid-run fails the
worker group, Ray starts it again, and the run resumes from its last checkpoint and ends with the
weights of the uninterrupted run, byte for byte."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import ROOT, TINY, free_port, run_lab

pytestmark = pytest.mark.slow
RAY = ROOT / ".venv" / "ray" / "bin" / "ray"
# deterministic, 2 workers x 16 per step: 24 steps, a checkpoint every 2, a log every 2
SHORT = f"{TINY} deterministic=true train.num_train_epochs=4 train.logging_steps=2 train.save_steps=2"


@pytest.fixture(scope="module")
def ray_cluster():
    """Two Ray nodes on this host, as `ray start` makes them on two machines; stopped after."""
    if not RAY.is_file():
        pytest.fail(f"{RAY} is missing: `make setup-ray` (make test makes it)")
    # Ray's unix sockets live under its temp dir, whose path must stay short
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    gcs, client = free_port(), free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    start = [[str(RAY), "start", "--head", "--port", str(gcs), "--ray-client-server-port", str(client),
              "--include-dashboard", "false", "--temp-dir", temp, *common],
             [str(RAY), "start", "--address", f"127.0.0.1:{gcs}", *common]]
    try:
        for cmd in start:
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        yield f"ray://127.0.0.1:{client}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, env=env, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def _train(*args, timeout=900):
    r = run_lab("train", "--hw", "cpu", "--set", SHORT, *args, timeout=timeout)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    return r


def _losses(run):
    return [e["loss"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in e]


def _weights(run):
    return (run / "adapter" / "adapter_model.safetensors").read_bytes()


def test_two_ray_workers_on_two_nodes_train_as_two_processes(ray_cluster, runs_dir, embedded_model):
    r = _train("--cluster", ray_cluster, "--nodes", "2", "--run", "ray")
    assert f"2 Ray Train workers on {ray_cluster}" in r.stdout
    _train("--gpus", "2", "--run", "ddp")
    ray_run, ddp = runs_dir / "ray", runs_dir / "ddp"
    assert _losses(ray_run) and _losses(ray_run) == pytest.approx(_losses(ddp), rel=1e-5, abs=1e-6)
    assert _weights(ray_run) == _weights(ddp)  # the same ranks on the same data
    m = json.loads((ray_run / "manifest.json").read_text())
    assert m["distributed"] == {"processes": 2, "accelerate_config": None, "type": "MULTI_CPU", "nodes": 2,
                                "engine": "ray", "cluster": ray_cluster, "workers": 2}
    assert "train" in m["timings_s"] and (ray_run / "train.log").is_file()
    assert "LOAD_FAST" not in (ray_run / "train.log").read_text()  # dill's disassembly, printed by Ray's print patch
    assert run_lab("merge", "--run", "ray", timeout=600).returncode == 0  # an ordinary run from here on

    # a worker killed once the run has a checkpoint: Ray starts the group again, which resumes
    log = runs_dir.parent / "ray-cut.log"
    proc = subprocess.Popen([sys.executable, "-m", "lab", "train", "--hw", "cpu", "--set", SHORT, "--cluster",
                             ray_cluster, "--nodes", "2", "--run", "ray-cut"], cwd=ROOT, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=dict(os.environ))
    ckpt = runs_dir / "ray-cut" / "checkpoints"
    deadline = time.monotonic() + 600
    while not any(ckpt.glob("checkpoint-*/trainer_state.json")):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-f", "ray::RayTrainWorker"], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    killed_at = sorted(int(d.name.split("-")[1]) for d in ckpt.glob("checkpoint-*"))
    assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    out = log.read_text()
    assert "resuming from checkpoint-" in out, out[-4000:]
    cut = runs_dir / "ray-cut"
    assert json.loads((cut / "train.json").read_text())["global_steps"] == \
        json.loads((ray_run / "train.json").read_text())["global_steps"]
    assert min(killed_at) < json.loads((cut / "train.json").read_text())["global_steps"]  # killed mid-run
    assert _weights(cut) == _weights(ray_run)  # bit for bit
    (resume,) = json.loads((cut / "manifest.json").read_text())["resumes"]
    assert resume["step"] >= min(killed_at)


def test_no_cluster_there_is_one_line(runs_dir):
    port = free_port()
    r = run_lab("train", "--hw", "cpu", "--set", TINY, "--cluster", f"ray://127.0.0.1:{port}", timeout=300)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("lab train: error: "), r.stderr
    assert f"no Ray cluster answers at ray://127.0.0.1:{port}" in r.stderr
    assert not [p for p in runs_dir.glob("*") if p.is_dir() and not p.name.startswith(".")]


def test_workers_the_cluster_cannot_place_are_one_line_after_the_join_timeout(ray_cluster, runs_dir):
    """Three workers of one CPU on a cluster of two: Ray would wait (and retry) forever for the node
    that never joins; the run waits cluster.join_timeout_s, then says what the cluster has."""
    r = run_lab("train", "--hw", "cpu", "--set", f"{TINY} cluster.join_timeout_s=10", "--cluster", ray_cluster,
                "--nodes", "3", timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"lab train: error: the Ray cluster {ray_cluster} did not place 3 workers (1 CPU each) "
                           "within 10 s (cluster.join_timeout_s); it has 2 node(s), 2 CPU, 0 GPU: start more nodes, "
                           "or ask for fewer workers (GPUS x NODES)"), line
    assert not [p for p in runs_dir.glob("*") if p.is_dir() and not p.name.startswith(".")]
