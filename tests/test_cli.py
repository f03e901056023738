"""The `lab` command as users run it: bad input is one line on stderr and a non-zero exit."""

import pytest

from conftest import run_lab


@pytest.mark.parametrize("args, message", [
    (["train", "--recipe", "nope"], "recipe 'nope' not found; shipped recipes:"),
    (["train", "--hw", "cpu", "--set", "identity.nmae=X"], "did you mean name"),
    (["train", "--hw", "cpu", "--set", "train.learning_rat=1"], "did you mean learning_rate"),
    (["train", "--hw", "tpu"], "HW='tpu' is not one of"),
    (["merge", "--run", "no-such-run"], "run 'no-such-run' not found"),
    (["train", "--resume", "--run", "no-such-run"], "run 'no-such-run' not found"),
])
def test_bad_input_is_one_line_without_traceback(args, message, runs_dir):
    r = run_lab(*args, timeout=120)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_merge_of_a_run_without_training_names_the_command(runs_dir):
    (runs_dir / "empty-run").mkdir(parents=True)
    r = run_lab("merge", "--run", str(runs_dir / "empty-run"), timeout=120)
    assert r.returncode == 2 and "`make train` produces it" in r.stderr


def test_ask_without_a_server_says_how_to_start_one(runs_dir):
    r = run_lab("ask", "--hw", "cpu", "--base-url", "http://127.0.0.1:9", "hi", timeout=120)
    assert r.returncode == 2 and "make serve" in r.stderr and "Traceback" not in r.stderr


def test_training_into_a_trained_run_is_refused(runs_dir):
    (runs_dir / "done" / "adapter").mkdir(parents=True)
    r = run_lab("train", "--hw", "cpu", "--run", "done", timeout=120)
    assert r.returncode == 2 and "is already trained; use RESUME=1" in r.stderr


def test_stop_without_server_is_fine(runs_dir):
    r = run_lab("stop", timeout=60)
    assert r.returncode == 0 and "no lab server" in r.stdout


def test_help_lists_every_stage():
    r = run_lab("--help", timeout=60)
    for cmd in ("fixture", "train", "merge", "serve", "stop", "ask", "probe", "e2e", "report", "resolve", "images",
                "doctor", "lock", "compare", "reproduce"):
        assert cmd in r.stdout


def test_doctor_reads_an_amd_hosts_gtt_and_kernel(tmp_path):
    from lab.hardware import amd_host

    assert amd_host(str(tmp_path)) is None
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "kfd").touch()
    card = tmp_path / "sys/class/drm/card1/device"
    card.mkdir(parents=True)
    (card / "mem_info_gtt_total").write_text(str(64 * 2**30) + "\n")
    amd = amd_host(str(tmp_path))
    assert amd["gtt_gib"] == {"card1": 64.0} and amd["kernel"] and any("amd-ttm" in n for n in amd["notes"])


def test_doctor_reports_what_this_host_has():
    import json

    r = run_lab("doctor", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["backend"] == "cpu" and seen["devices"] == [] and seen["cpu_count"] >= 1
    assert seen["attention"]["sdpa"] is True and seen["attention"]["flash_attention_2"] is False
    assert seen["defaults"]["train"]["use_cpu"] is True and seen["speed"]["attention"] == ["sdpa"]
    assert seen["free_memory_gib"] > 0 and seen["amd_host"] is None  # no /dev/kfd here
    r = run_lab("doctor", "--hw", "tpu", timeout=60)
    assert r.returncode == 2 and "HW='tpu'" in r.stderr and "Traceback" not in r.stderr
