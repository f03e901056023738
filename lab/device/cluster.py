"""Beyond one machine on Ray: `lab train --cluster ray://head:10001` (CLUSTER=, or RAY_ADDRESS)
trains the recipe under Ray Train. A driver (lab/raytrain.py) in Ray's own environment (.venv/ray: the training
pins plus Ray, made by `make setup-ray`) starts a `TorchTrainer` of GPUS x NODES workers, one
per device; Ray sets up torch.distributed (NCCL on GPUs, gloo on CPU) and each worker runs the
very `lab train` that accelerate launch would run as one rank. Rank 0 writes the run.

What the nodes share, at the same paths: the lab's checkout (each worker imports `lab` from it:
PYTHONPATH in the workers' runtime environment), runs/ (the run and its checkpoints: where a
restarted worker group resumes from) and the model cache. Either every node's `ray start` runs
from .venv/ray and the driver runs here (RUNTIME=local), or every node runs the lab-ray image
(docker/ray.Dockerfile: the training image plus Ray) and the driver runs in a container of it
(RUNTIME=docker), where the checkout is /opt/lab/app and runs/ and the caches are compose's mounts.

Workers the cluster cannot place (a node that never joins) are waited for up to the recipe's
cluster.join_timeout_s (Ray's worker-group start timeout; an autoscaler may add nodes meanwhile),
then the run fails in one line naming what the cluster has.

A lost worker (a node gone, a process killed) fails the worker group; Ray's FailureConfig
starts it again, up to the recipe's cluster.max_failures times (default 2), and every worker resumes from
the run's last complete checkpoint, as RESUME=1 would.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lab import ROOT
from lab.device.launch import stream
from lab.errors import LabError

RAY_PYTHON = ROOT / ".venv" / "ray" / "bin" / "python"
NO_CLUSTER = 3  # the driver's exit code for "nobody answers at that address"
NO_LAB = 4      # ... for "the cluster's workers cannot import the lab"
NOT_PLACED = 5  # ... for "the cluster did not place every worker in time" (its last line says what it has)


def ray_python() -> Path | None:
    """The driver's interpreter: this one where Ray is installed (the lab-ray image, where
    RUNTIME=docker runs the driver), else .venv/ray; None if neither exists."""
    import importlib.util

    if importlib.util.find_spec("ray") is not None:
        return Path(sys.executable)
    return RAY_PYTHON if RAY_PYTHON.is_file() else None


def address(cluster: str | None) -> str | None:
    """The Ray cluster of this training: CLUSTER=, else RAY_ADDRESS; none (empty) trains here."""
    chosen = os.environ.get("RAY_ADDRESS", "") if cluster is None else cluster
    return chosen.strip() or None


def launch(train_argv: list[str], workers: int, use_gpu: bool, cluster: str, run: Path, log: Path, spec) -> None:
    """The Ray driver, in Ray's environment, streaming its output (and the workers') to `log` and here."""
    python = ray_python()
    if python is None:
        raise LabError(f"CLUSTER={cluster}: Ray's environment {RAY_PYTHON.parent.parent} is missing; `make setup-ray` "
                       "makes it (start every node of the cluster from it: .venv/ray/bin/ray start ...), or "
                       "RUNTIME=docker runs the driver in the lab-ray image")
    cmd = [str(python), "-m", "lab.raytrain", "--address", cluster, "--workers", str(workers),
           "--run", str(run), *(["--use-gpu"] if use_gpu else []), "--cpus-per-worker", str(spec.cpus_per_worker),
           "--max-failures", str(spec.max_failures), "--join-timeout", str(spec.join_timeout_s),
           "--storage", spec.storage_path or str(run.parent / ".ray"), "--", *train_argv]
    print(f"train: {workers} Ray Train workers on {cluster}; log: {log}", flush=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAB_ARG_")}
    code = stream(cmd, log, env, cwd=ROOT)
    if code == NO_CLUSTER:
        raise LabError(f"no Ray cluster answers at {cluster}; start one (.venv/ray/bin/ray start --head) or fix "
                       "CLUSTER=")
    if code == NOT_PLACED:
        said = log.read_text(errors="replace").rpartition("lab.raytrain: cluster has ")[2]
        has = said.splitlines()[0] if said else "fewer resources"
        raise LabError(f"the Ray cluster {cluster} did not place {workers} workers ({spec.cpus_per_worker:g} CPU"
                       f"{' and a GPU' if use_gpu else ''} each) within {spec.join_timeout_s} s "
                       f"(cluster.join_timeout_s); it has {has}: start more nodes, or ask for fewer workers "
                       "(GPUS x NODES)")
    if code == NO_LAB:
        raise LabError(f"the workers on {cluster} cannot import the lab from {ROOT}: start the cluster's nodes from "
                       "this checkout's .venv/ray (RUNTIME=local) or from the lab-ray image (RUNTIME=docker), as "
                       "the driver runs")
    if code != 0:
        raise LabError(f"training on the Ray cluster {cluster} failed (exit {code}); see {log}")
