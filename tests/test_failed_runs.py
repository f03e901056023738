"""A failed `make train` keeps its logs in runs/.failed/<run-id>/ and names them in its one line;
the run itself goes (it failed before its first checkpoint) and `latest` goes back."""

from pathlib import Path

import pytest
from conftest import TINY, run_lab

from lab.errors import LabError, explain


def _failed_run(runs_dir: Path):
    """A run that trained before (kept), and a newer one that failed before its first checkpoint."""
    from lab.runs import new_run

    done = new_run("done")
    (done / "recipe.yaml").write_text("name: done\n")
    failed = new_run("broke")
    (failed / "recipe.yaml").write_text("name: broke\n")
    (failed / "timings.json").write_text('{"train": 1.0}\n')
    (failed / "data").mkdir()
    (failed / "data" / "train.jsonl").write_text("{}\n")  # data stay behind: only logs are kept
    return done, failed


def test_a_failed_run_keeps_its_log_where_the_message_says(runs_dir):
    from lab.runs import discard_run, find_run, keep_failed_logs, owner

    done, run = _failed_run(runs_dir)
    (run / "train.log").write_text("Traceback ...\nRuntimeError: NCCL timeout\n")
    (run / "serve-stderr.log").write_text("other stderr\n")
    # the docker runtime's message; the multi-process one says "see <log>"
    error = LabError(f"`lab train` in the lab-train:cpu container exited with 1 (log: {run / 'train.log'})")
    log = keep_failed_logs(run, error)
    discard_run(run)
    kept = runs_dir / ".failed" / run.name
    assert log == kept / "train.log" and log.read_text().endswith("NCCL timeout\n")
    assert sorted(p.name for p in kept.iterdir()) == ["recipe.yaml", "serve-stderr.log", "timings.json", "train.log"]
    line, status = explain(error)
    assert status == 2
    assert line == f"`lab train` in the lab-train:cpu container exited with 1 (log: {kept / 'train.log'})"
    assert not run.exists() and find_run("latest") == done.resolve()  # `latest` went back
    with pytest.raises(LabError, match=r"'.failed' is not a run: runs/.failed holds the lab's own files"):
        find_run(".failed")
    with pytest.raises(LabError, match=r"is not a run"):
        find_run(str(kept))
    assert owner(kept / "train.log") is None


def test_a_run_failing_again_in_the_same_second_keeps_both_logs(runs_dir):
    from lab.runs import keep_failed_logs

    runs_dir.mkdir()
    for n in (1, 2):
        run = runs_dir / "20250101-000000-x"
        run.mkdir()
        (run / "train.log").write_text(f"try {n}\n")
        keep_failed_logs(run, LabError("distributed training exited with 1"))
        run.rename(runs_dir / f"gone-{n}")
    assert (runs_dir / ".failed" / "20250101-000000-x" / "train.log").read_text() == "try 1\n"
    assert (runs_dir / ".failed" / "20250101-000000-x-2" / "train.log").read_text() == "try 2\n"


def test_an_unexpected_local_failure_leaves_its_traceback_to_read(runs_dir):
    """The local runtime writes no train.log: the error line and the traceback's tail become one."""
    from lab.runs import keep_failed_logs

    _, run = _failed_run(runs_dir)
    try:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    except RuntimeError as e:
        error = e
    log = keep_failed_logs(run, error)
    text = log.read_text()
    assert text.startswith("lab train: error: unexpected RuntimeError: CUDA error: an illegal memory access was "
                           "encountered (a bug in the lab; LAB_DEBUG=1 shows the traceback)\n")
    assert "Traceback (most recent call last)" in text and 'raise RuntimeError("CUDA error' in text
    line, status = explain(error)
    assert status == 70 and line.endswith(f"shows the traceback); log: {log}")


def test_a_lab_error_with_nothing_logged_keeps_nothing(runs_dir):
    """A bad model path, missing data: the one line is the whole story; no runs/.failed clutter."""
    from lab.runs import keep_failed_logs

    _, run = _failed_run(runs_dir)
    error = LabError("model.path 'x' is a file; give a model directory or a hub id")
    assert keep_failed_logs(run, error) is None and not (runs_dir / ".failed").exists()
    assert explain(error) == ("model.path 'x' is a file; give a model directory or a hub id", 2)
    assert keep_failed_logs(run, KeyboardInterrupt()) is None  # Ctrl-C of a local run: nothing to read either


def test_a_failed_multi_process_train_names_its_kept_log(runs_dir, embedded_model, tmp_path):
    """The real CLI: accelerate launch fails (a broken accelerate config) before any checkpoint; the
    run goes, `latest` goes back to the run before, and the one line names the log's new home."""
    earlier = runs_dir / "earlier"
    earlier.mkdir(parents=True)
    (earlier / "recipe.yaml").write_text("name: earlier\n")
    (runs_dir / "latest").symlink_to("earlier")
    bad = tmp_path / "accelerate.yaml"
    bad.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: NOT_A_TYPE\n")
    r = run_lab("train", "--hw", "cpu", "--gpus", "2", "--dist", str(bad), "--set", TINY, timeout=600)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    [kept] = (runs_dir / ".failed").iterdir()
    assert r.stderr.strip() == f"lab train: error: distributed training exited with 1; see {kept / 'train.log'}"
    assert "is not a valid DistributedType" in (kept / "train.log").read_text()
    assert f"lab: removed {kept.name} (no checkpoint to resume from); its log: {kept / 'train.log'}" \
        in r.stdout
    assert sorted(p.name for p in runs_dir.iterdir()) == [".failed", "earlier", "index.html", "latest"]
    assert (runs_dir / "latest").resolve() == earlier.resolve()
