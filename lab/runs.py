"""Run directories: runs/<run-id>/ holds everything one run made; runs/latest points at the newest.

Layout: recipe.yaml (resolved), data/train.jsonl, checkpoints/, adapter/ (or the full model),
merged/, metrics.jsonl, parity.json, probe-*.json, timings.json, manifest.json, report.{md,json},
loss.png.

runs/.failed/<run-id>/ holds only the logs of a new run that failed before its first checkpoint
(the run itself is removed); like every dot-entry of runs/ (.servers, .images) it is not a run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import traceback
from datetime import datetime
from pathlib import Path

from lab import ROOT
from lab.errors import LabError, explain

RUNS_DIR = Path(os.environ.get("LAB_RUNS", ROOT / "runs"))


def new_run(recipe_name: str, latest: bool = True) -> Path:
    """A new run directory; `latest` moves to it unless it only records a probe or a benchmark."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        run = RUNS_DIR / (f"{stamp}-{recipe_name}" if n == 1 else f"{stamp}-{recipe_name}-{n}")
        try:
            run.mkdir()  # atomic: two runs started in the same second get different names
            break
        except FileExistsError:
            n += 1
    if latest:
        _point_latest(run)
    return run


def discard_run(run: Path) -> None:
    """Remove a run that failed before it produced anything worth keeping (no checkpoint), so a
    half-made run never looks like a result; `latest` goes back to the newest remaining run."""
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    latest = RUNS_DIR / "latest"
    if latest.is_symlink() and not latest.exists():
        latest.unlink(missing_ok=True)
        remaining = sorted((d for d in RUNS_DIR.iterdir() if d.is_dir() and not d.is_symlink()
                            and not d.name.startswith(".") and (d / "recipe.yaml").is_file()), key=lambda d: d.name)
        if remaining:
            _point_latest(remaining[-1])


FAILED = ".failed"
# What is worth reading after a failure: the logs (train.log of the docker and multi-process
# runtimes, stderr logs), the loss curve, the recipe it ran, the stage times. Never weights or data.
FAILED_KEEPS = ("*.log", "metrics.jsonl", "recipe.yaml", "timings.json")
TRACEBACK_LINES = 40


def keep_failed_logs(run: Path, error: BaseException) -> Path | None:
    """Before a failed run is discarded: move its logs to runs/.failed/<run-id>/ and point the error
    at them (its message, and `error.lab_log` for the CLI's one line). Kept when there is a log to
    read, or when the error was unexpected: the local runtime writes no train.log, so the error line
    and the traceback's tail become one. A LabError with nothing logged (a bad model path, missing
    data) is the whole story in its one line: nothing is kept. Returns the log to read, or None."""
    logs = [f for pattern in FAILED_KEEPS for f in sorted(run.glob(pattern)) if f.is_file()]
    unexpected = isinstance(error, Exception) and not isinstance(error, LabError)  # not Ctrl-C either
    if not (unexpected or any(f.suffix in (".log", ".jsonl") for f in logs)):
        return None
    root = RUNS_DIR / FAILED
    root.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:  # a run name comes back when a run started in the same second failed before
        dest = root / (run.name if n == 1 else f"{run.name}-{n}")
        try:
            dest.mkdir()
            break
        except FileExistsError:
            n += 1
    for f in logs:
        f.replace(dest / f.name)  # a rename: runs/.failed is on the same file system as the run
    log = dest / "train.log"
    if unexpected and not log.exists():
        lines = "".join(traceback.format_exception(error)).splitlines()
        log.write_text(f"lab train: error: {explain(error)[0]}\n\n" + "\n".join(lines[-TRACEBACK_LINES:]) + "\n",
                       encoding="utf-8")
    if not log.exists():  # the loss curve of a diverged run, or another log
        log = next(dest / f.name for f in logs if f.suffix in (".log", ".jsonl"))
    if isinstance(error, LabError) and error.args:  # "see runs/<id>/train.log" -> where it is now
        error.args = (str(error.args[0]).replace(str(run), str(dest)), *error.args[1:])
    error.lab_log = log
    return log


def run_dir(ref: str) -> Path:
    """A run to train into, named by the caller (the docker runtime names the run it created)."""
    if ref.strip() in ("", ".", "..") or ".." in Path(ref).parts:
        raise LabError(f"RUN={ref!r} is not a run name; give a name such as my-run (kept under {RUNS_DIR}) "
                       "or a run directory path")
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
        return run if run.is_dir() and not run.name.startswith(".") else None  # .failed, .servers: no runs
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
    top = RUNS_DIR.resolve()
    for candidate in (Path(ref), RUNS_DIR / ref):
        if candidate.is_dir():
            found = candidate.resolve()
            if top in found.parents and found.relative_to(top).parts[0].startswith("."):
                raise LabError(f"{ref!r} is not a run: runs/{found.relative_to(top).parts[0]} holds the lab's own "
                               "files (.failed: the logs of runs that failed before their first checkpoint); "
                               "give a run under runs/, or start one with `make train`")
            return found
    raise LabError(f"run {ref!r} not found under {RUNS_DIR}; start one with `make train`")


def read_json(path: Path, what_makes_it: str):
    if not path.is_file():
        raise LabError(f"{path} is missing; `{what_makes_it}` produces it")
    return read_json_file(path, f"`{what_makes_it}` writes it again")


def write_json(path: Path, data, private: bool = False) -> None:
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n", private)


def write_text_atomic(path: Path, text: str, private: bool = False) -> None:
    """A temp file of this process's own, then a rename: a reader never sees half a file.
    private: readable by its owner only (mode 0600) from the moment it exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if private:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
            os.chmod(tmp, 0o600)  # an earlier temp file of this name may have had another mode
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def share_weights(root: Path) -> None:
    """safetensors (0.8) creates its files mode 0600 whatever the umask; the lab's other outputs
    follow the umask. The weights under `root` get the mode the umask gives, so a serving
    container that runs as another user (root here, LAB_UID there) can read a run trained here."""
    try:
        mask = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                        if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):  # no /proc: leave the files as they are
        return
    for f in root.rglob("*.safetensors"):
        if f.is_file() and not f.is_symlink():
            f.chmod(0o666 & ~mask)


def read_json_file(path: Path, what: str):
    """JSON the lab wrote; a damaged file is one line naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LabError(f"{path} is damaged ({e}); {what}") from None


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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
