"""train.report_to: trackio, kept local (lab/tracking.py): real trackio under TRL, its SQLite
store in runs/.trackio, the probe's scores in the same run, its dashboard on 127.0.0.1."""

import json
import os
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest
from conftest import ROOT, TINY, free_port, run_lab

from lab import tracking
from lab.recipe import load_recipe


def test_a_trackio_run_is_kept_on_this_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", "elsewhere")  # restored after the test
    for var in tracking.SYNC_VARIABLES:
        monkeypatch.setenv(var, "someone/somewhere")
    recipe = load_recipe("identity-lora", ["train.report_to=[trackio, tensorboard]"], hw="cpu", check_train=False)
    runs = tmp_path / "runs"
    settings = tracking.training_settings(recipe, runs / "20261201-000001-identity-lora", runs)
    assert settings == {"project": "identity-lora", "run_name": "20261201-000001-identity-lora",
                        "trackio_space_id": None, "trackio_bucket_id": None, "trackio_static_space_id": False}
    assert not any(v in os.environ for v in tracking.SYNC_VARIABLES)
    assert os.environ["TRACKIO_DIR"] == str(tmp_path / "runs" / ".trackio")
    plain = load_recipe("identity-lora", hw="cpu", check_train=False)
    assert tracking.training_settings(plain, tmp_path, tmp_path) == {}


def metrics(db, run: str) -> list[dict]:
    with sqlite3.connect(db) as c:
        rows = c.execute("select metrics, space_id from metrics where run_name = ? order by id", (run,)).fetchall()
    assert all(space is None for _, space in rows)  # nothing went to a Space
    return [json.loads(m) for m, _ in rows]


@pytest.mark.slow
def test_losses_and_probe_scores_land_in_the_local_store_and_the_dashboard_shows_them(runs_dir, embedded_model,
                                                                                       monkeypatch):
    env = {"LAB_RUNS": str(runs_dir), "TRACKIO_SPACE_ID": "someone/space", "HF_HUB_OFFLINE": "1"}
    r = run_lab("train", "--hw", "cpu", "--runtime", "local", "--set",
                f"{TINY} train.report_to=trackio train.max_steps=10", env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run = (runs_dir / "latest").resolve()
    db = runs_dir / ".trackio" / "identity-lora.db"
    logged = metrics(db, run.name)
    losses = [m for m in logged if "train/loss" in m]
    assert [m["train/global_step"] for m in losses] == [5, 10]
    assert losses[-1]["train/loss"] == pytest.approx(json.loads((run / "train.json").read_text())["final_loss"])

    recipe = load_recipe("identity-lora", [TINY, "train.report_to=trackio"], hw="cpu", check_train=False)
    assert tracking.log_probe_scores(recipe, run, runs_dir, {"identity_hit_rate": 0.0, "stop_rate": 1.0},
                                     {"identity_hit_rate": 1.0, "stop_rate": 1.0})
    assert metrics(db, run.name)[-1] == {"probe/before/identity_hit_rate": 0.0, "probe/before/stop_rate": 1.0,
                                         "probe/after/identity_hit_rate": 1.0, "probe/after/stop_rate": 1.0}

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lab", "dashboard", "--port", str(port)], cwd=ROOT,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, status = time.monotonic() + 120, None
        while time.monotonic() < deadline and status != 200 and proc.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code
            except httpx.HTTPError:
                time.sleep(1)
        assert status == 200, proc.poll()
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    assert f"dashboard: http://127.0.0.1:{port}" in out
