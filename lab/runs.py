"""Run directories: runs/<run-id>/ holds everything one run made; runs/latest points at the newest.

Layout: recipe.yaml (resolved), data/train.jsonl, checkpoints/, adapter/ (or the full model),
merged/, metrics.jsonl, parity.json, probe-*.json, timings.json, manifest.json, report.{md,json},
loss.png.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from datetime import datetime
from pathlib import Path

from lab.errors import LabError

RUNS_DIR = Path(os.environ.get("LAB_RUNS", Path(__file__).resolve().parent.parent / "runs"))


def new_run(recipe_name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run = RUNS_DIR / f"{stamp}-{recipe_name}"
    n = 1
    while run.exists():  # two runs in the same second
        n += 1
        run = RUNS_DIR / f"{stamp}-{recipe_name}-{n}"
    run.mkdir(parents=True)
    _point_latest(run)
    return run


def run_dir(ref: str) -> Path:
    """A run to train into, named by the caller (the docker runtime names the run it created)."""
    run = Path(ref) if "/" in ref else RUNS_DIR / ref
    if (run / "adapter").exists() or (run / "model").exists():
        raise LabError(f"run {run} is already trained; use RESUME=1 to continue it, or a new run")
    run.mkdir(parents=True, exist_ok=True)
    if run.resolve().parent == RUNS_DIR.resolve():
        _point_latest(run)
    return run


def owner(path: Path | str) -> Path | None:
    """The run a path lies in (runs/<id>/merged -> runs/<id>), if any."""
    p, top = Path(path).resolve(), RUNS_DIR.resolve()
    if top in p.parents:
        run = top / p.relative_to(top).parts[0]
        return run if run.is_dir() else None
    return None


def _point_latest(run: Path) -> None:
    latest = RUNS_DIR / "latest"
    tmp = RUNS_DIR / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run.name)
    tmp.replace(latest)  # atomic: `latest` never dangles half-updated


def find_run(ref: str | None = None) -> Path:
    """A run by directory, by name under runs/, or `latest`."""
    ref = ref or "latest"
    for candidate in (Path(ref), RUNS_DIR / ref):
        if candidate.is_dir():
            return candidate.resolve()
    raise LabError(f"run {ref!r} not found under {RUNS_DIR}; start one with `make train`")


def read_json(path: Path, what_makes_it: str):
    if not path.is_file():
        raise LabError(f"{path} is missing; `{what_makes_it}` produces it")
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


@contextlib.contextmanager
def stage(run: Path, name: str):
    """Time one stage into timings.json (kept up to date as stages finish)."""
    path = run / "timings.json"
    started = time.perf_counter()
    try:
        yield
    finally:
        timings = json.loads(path.read_text()) if path.is_file() else {}
        timings[name] = round(time.perf_counter() - started, 1)
        write_json(path, timings)
