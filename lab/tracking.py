"""Local experiment tracking with trackio (`train.report_to: trackio`): every run's losses in one
SQLite store under runs/.trackio, the recipe as the project, the run id as the run's name, the
probe's before/after scores logged into the same run, and `make dashboard` on loopback.

Kept local on purpose: the variables that would send a run to a Hugging Face Space, bucket,
dataset or a remote trackio server are removed from the training process, and the static Space
snapshot transformers would make after training is switched off. TensorBoard (`report_to:
tensorboard`) stays available and writes into the run directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from lab.errors import LabError

# What would take a run off this machine (trackio/*.py and transformers' TrackioCallback read them).
SYNC_VARIABLES = ("TRACKIO_SPACE_ID", "TRACKIO_BUCKET_ID", "TRACKIO_DATASET_ID", "TRACKIO_SERVER_URL",
                  "TRACKIO_REGISTRY_BUCKET_ID", "TRACKIO_WEBHOOK_URL")


def store(runs_dir: Path) -> Path:
    return runs_dir / ".trackio"


def wanted(report_to) -> bool:
    return "trackio" in ([report_to] if isinstance(report_to, str) else list(report_to or []))


def local_only(runs_dir: Path) -> None:
    """This process's trackio writes into runs/.trackio and nowhere else."""
    for var in SYNC_VARIABLES:
        os.environ.pop(var, None)
    os.environ["TRACKIO_DIR"] = str(store(runs_dir))


def training_settings(recipe, run: Path, runs_dir: Path) -> dict:
    """SFTConfig fields for a run that reports to trackio (none otherwise)."""
    if not wanted(recipe.train.get("report_to")):
        return {}
    local_only(runs_dir)
    return {"project": recipe.name, "run_name": run.name, "trackio_space_id": None, "trackio_bucket_id": None,
            "trackio_static_space_id": False}


# trackio fixes its store (TRACKIO_DIR) when first imported: the scores are logged by a fresh
# interpreter, so they land in this runs/ whatever the calling process imported before.
_LOG = """
import json, sys, trackio
a = json.load(sys.stdin)
trackio.init(project=a["project"], name=a["run"], resume="allow", space_id=None)
trackio.log(a["metrics"])
trackio.finish()
"""


def log_probe_scores(recipe, run: Path, runs_dir: Path, before: dict, after: dict) -> bool:
    """The probe's summaries as metrics of the run's own trackio run (probe/before/*, probe/after/*)."""
    if not wanted(recipe.train.get("report_to")):
        return False
    if importlib.util.find_spec("trackio") is None:  # a host that only drives containers
        print("tracking: probe scores not logged to trackio (not installed here); they are in the run's report")
        return False
    metrics = {f"probe/{label}/{k}": v for label, summary in (("before", before), ("after", after))
               for k, v in summary.items() if isinstance(v, (int, float))}
    env = {k: v for k, v in os.environ.items() if k not in SYNC_VARIABLES}
    done = subprocess.run([sys.executable, "-c", _LOG], input=json.dumps(
        {"project": recipe.name, "run": run.name, "metrics": metrics}), text=True, capture_output=True,
        env={**env, "TRACKIO_DIR": str(store(runs_dir))})
    if done.returncode != 0:
        raise LabError(f"trackio could not log the probe scores: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return True


def dashboard(runs_dir: Path, port: int) -> int:
    """trackio's own dashboard over runs/.trackio, on 127.0.0.1 only, in the foreground (Ctrl-C ends it)."""
    if not store(runs_dir).is_dir():
        raise LabError(f"no trackio store in {store(runs_dir)}: train with SET=train.report_to=trackio first")
    local_only(runs_dir)
    import trackio

    print(f"dashboard: http://127.0.0.1:{port} over {store(runs_dir)} (Ctrl-C stops it)", flush=True)
    trackio.show(open_browser=False, block_thread=True, host="127.0.0.1", server_port=port)
    return 0
