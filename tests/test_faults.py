"""Faults injected into the real chain: kill -9 mid-training then RESUME=1, kill during a merge, a
full disk while saving. Real TRL training of the embedded model (slow: about two minutes)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY, run_lab

from lab.merge import MERGE_RECORD

pytestmark = pytest.mark.slow
# Deterministic on CPU, 48 steps, a checkpoint every 5 (save_steps 0.1 of the run), a log every 4.
SHORT = f"{TINY} deterministic=true train.num_train_epochs=4 train.logging_steps=4"


def _lab(*args, env=None, timeout=600):
    r = run_lab(*args, env=env, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


def _wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended (code {proc.returncode}) before {what}")
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def _popen_lab(*args, log: Path):
    return subprocess.Popen([sys.executable, "-m", "lab", *args], cwd=ROOT, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=dict(os.environ))


def _result(run: Path) -> tuple[float, dict]:
    m = json.loads((run / "manifest.json").read_text())
    return json.loads((run / "train.json").read_text())["final_loss"], m["output"]["weights_sha256"]


@pytest.fixture(scope="module")
def fault_runs(embedded_model, tmp_path_factory):
    """One uninterrupted run, and the same run killed with SIGKILL after a checkpoint, then resumed."""
    runs_dir = tmp_path_factory.mktemp("runs")
    os.environ["LAB_RUNS"] = str(runs_dir)
    try:
        _lab("train", "--hw", "cpu", "--set", SHORT, "--run", "whole")
        log = runs_dir.parent / "cut.log"
        proc = _popen_lab("train", "--hw", "cpu", "--set", SHORT, "--run", "cut", log=log)
        ckpt = runs_dir / "cut" / "checkpoints"
        _wait_for(lambda: any(ckpt.glob("checkpoint-*/trainer_state.json")), 300, proc, "a first checkpoint")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        killed_at = sorted(int(d.name.split("-")[1]) for d in ckpt.glob("checkpoint-*"))
        # a save the kill cut short: the newest directory, without the file transformers writes last
        partial = ckpt / "checkpoint-999"
        partial.mkdir()
        (partial / "adapter_model.safetensors").write_bytes(b"\0" * 64)
        resumed = _lab("train", "--resume", "--run", "cut")
        yield {"dir": runs_dir, "killed_at": killed_at, "resumed": resumed, "partial": partial}
    finally:
        os.environ.pop("LAB_RUNS", None)


def test_kill_9_then_resume_ends_like_an_uninterrupted_run(fault_runs):
    runs_dir = fault_runs["dir"]
    assert fault_runs["killed_at"] and max(fault_runs["killed_at"]) < 48  # killed mid-run, not after it
    assert "resuming from checkpoint-" in fault_runs["resumed"].stdout
    assert "removing checkpoint-999: written only in part" in fault_runs["resumed"].stdout
    assert not fault_runs["partial"].exists()
    whole_loss, whole_weights = _result(runs_dir / "whole")
    cut_loss, cut_weights = _result(runs_dir / "cut")
    assert json.loads((runs_dir / "cut" / "train.json").read_text())["global_steps"] == 48
    assert cut_loss == whole_loss
    assert cut_weights == whole_weights  # bit for bit


def test_resume_refuses_another_recipe_or_changed_data(fault_runs, tmp_path):
    runs_dir = fault_runs["dir"]
    r = run_lab("train", "--resume", "--run", "cut", "--set", "identity.name=Other", timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().endswith("RESUME=1 continues cut with the recipe it started with, and this one differs "
                                     "(identity.name: 'Atlas' -> 'Other'); drop RECIPE/SET, or start a new run")
    # the data the run started from, changed under it
    sources = runs_dir / "cut" / "data" / "sources.json"
    original = sources.read_text()
    changed = json.loads(original)
    changed[0]["rows_sha256"] = "0" * 64
    sources.write_text(json.dumps(changed))
    try:
        r = run_lab("train", "--resume", "--run", "cut", timeout=120)
    finally:
        sources.write_text(original)
    assert r.returncode == 2
    assert r.stderr.strip().endswith(f"RESUME=1: dataset {changed[0]['path']} changed since cut started; the "
                                     "checkpoint was trained on the old rows: restore them, or start a new run")


def test_compare_judges_the_resumed_run_by_its_loss_outside_the_resume_window(fault_runs):
    from lab.compare import compare

    runs_dir = fault_runs["dir"]
    # one resume recorded (the refused ones above left no record), at a checkpoint the kill left
    (resume,) = json.loads((runs_dir / "cut" / "manifest.json").read_text())["resumes"]
    assert resume["step"] in fault_runs["killed_at"] and resume["checkpoint"] == f"checkpoint-{resume['step']}"
    r = compare(str(runs_dir / "whole"), str(runs_dir / "cut"))
    assert r["pass"] and r["weights_identical"] is True, r["checks"]
    # logged every 4 steps: the window around a resume between two logs is the one left out
    assert r["loss"]["steps_skipped"] == ([] if resume["step"] % 4 == 0 else [resume["step"] // 4 * 4 + 4])
    assert r["loss"]["max_abs"] == 0 and not any(c.get("judged_by") for c in r["checks"])  # not excused by weights


def test_a_killed_merge_leaves_nothing_a_server_would_pick_up(fault_runs):
    run = fault_runs["dir"] / "whole"
    proc = _popen_lab("merge", "--run", str(run), log=run.parent / "merge-kill.log")
    _wait_for(lambda: (run / ".merged.tmp" / "model.safetensors").exists(), 120, proc, "the merge to write")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (run / "merged").exists()
    r = _lab("merge", "--run", str(run))
    assert "checks passed" in r.stdout and (run / "merged" / MERGE_RECORD).is_file()
    assert not (run / ".merged.tmp").exists()


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_disk_full_while_saving_is_one_line_and_keeps_the_checkpoints(fault_runs, tmp_path):
    """A real ENOSPC: the run lives on a tmpfs with room for its data and one checkpoint and a half,
    so the second checkpoint's save fills the device (mounting needs root: skipped without it)."""
    whole = fault_runs["dir"] / "whole"
    checkpoint = _size(next((whole / "checkpoints").glob("checkpoint-*")))
    room = _size(whole / "data") + (whole / "recipe.yaml").stat().st_size + int(1.5 * checkpoint) + 64 * 1024
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={room}", "tmpfs", str(small)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()})")
    try:
        r = run_lab("train", "--hw", "cpu", "--set", SHORT, "--run", "full-disk",
                    env={"LAB_RUNS": str(small)}, timeout=600)
        assert r.returncode == 2, r.stdout[-1500:] + r.stderr[-1500:]
        assert ("lab train: error: no space left on the device; free some (earlier checkpoints and results are "
                "kept)\n") in r.stderr, r.stderr[-1500:]  # after TRL's progress bar, which shares stderr
        assert "Traceback" not in r.stderr
        kept = [d for d in (small / "full-disk" / "checkpoints").glob("checkpoint-*")
                if (d / "trainer_state.json").is_file()]
        assert kept, "the checkpoint saved before the disk filled is gone"
        assert not (small / "full-disk" / "adapter").exists()  # no result that looks finished
    finally:
        subprocess.run(["umount", str(small)], check=False)
