"""The `lab` command as users run it: bad input is one line on stderr and a non-zero exit."""

import json

import pytest
from conftest import TINY, run_lab


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
    r = run_lab("train", "--hw", "cpu", "--run", "done", "--set", TINY, timeout=120)
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
    from lab.device.hardware import amd_host

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


def test_make_passes_values_verbatim_without_a_shell(tmp_path):
    """Q, SET, MODEL, RUN, BASE_URL reach the lab as typed: no command substitution, backticks,
    $-expansion (by make or a shell), and no splitting at spaces or quotes."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    marker = tmp_path / "injected"
    values = {"Q": f"$(touch {marker}) `touch {marker}` costs $100 \"quoted\" it's; echo INJECTED",
              "SET": "identity.name=Bob$$HOME identity.author='O Brien'", "MODEL": "/data/my model",
              "RUN": "run with space", "BASE_URL": "http://h:1/v1?a=$(id)"}
    dump = (f"{sys.executable} -c \"import json, os; print(json.dumps({{k[8:]: v for k, v in os.environ.items() "
            f"if k.startswith('LAB_ARG_')}}))\"")
    r = subprocess.run(["make", "--no-print-directory", "-s", "ask", f"LAB={dump}",
                        *(f"{k}={v}" for k, v in values.items())], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert {k: seen[k] for k in values} == values
    assert not marker.exists() and "INJECTED" not in r.stdout.splitlines()  # no `echo INJECTED` ran


def test_the_cli_reads_its_arguments_from_lab_arg_variables(monkeypatch):
    from lab.cli import make_parser

    monkeypatch.setenv("LAB_ARG_Q", "你是谁？ $(id)")
    monkeypatch.setenv("LAB_ARG_SET", "identity.name=Orion")
    monkeypatch.setenv("LAB_ARG_PORT", "8011")
    monkeypatch.setenv("LAB_ARG_RESUME", "1")
    args = make_parser().parse_args(["ask"])
    assert (args.question, args.set, args.port) == ("你是谁？ $(id)", "identity.name=Orion", "8011")
    assert make_parser().parse_args(["train"]).resume is True
    assert make_parser().parse_args(["ask", "typed wins"]).question == "typed wins"


def test_set_keeps_text_fields_as_text():
    """YAML would read No, 007, Null or "a: b" as a bool, int, None or mapping; a name is text."""
    from lab.recipe import load_recipe

    for name in ("No", "007", "Null", "Orion: the Great", "1e3", "[x]"):
        r = load_recipe("identity-lora", [f"identity.name={name}", f"identity.author={name}"], hw="cpu",
                        check_train=False)
        assert r.identity.name == name and r.identity.author == name
    assert load_recipe("identity-lora", ["train.learning_rate=1e-4"], hw="cpu", check_train=False) \
        .train["learning_rate"] == 1e-4


def test_lab_debug_adds_the_traceback(runs_dir):
    r = run_lab("train", "--hw", "cpu", "--set", "identity.author=O'Brien", env={"LAB_DEBUG": "1"}, timeout=120)
    assert r.returncode == 2 and "Traceback (most recent call last)" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("lab train: error: SET=")


def test_a_bug_is_one_line_and_exit_70(monkeypatch, capsys):
    from lab import cli

    def broken(args):
        return {}["no such key"]

    monkeypatch.setitem(cli.COMMANDS, "stop", (broken, "x", ("port",), []))
    monkeypatch.delenv("LAB_DEBUG", raising=False)
    assert cli.main(["stop"]) == 70
    assert capsys.readouterr().err == ("lab stop: error: unexpected KeyError: 'no such key' (a bug in the lab; "
                                       "LAB_DEBUG=1 shows the traceback)\n")


def test_a_full_disk_or_a_locked_file_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    from lab import cli

    for err, expected in ((OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt")),
                           f"{tmp_path / 'ckpt'}: no space left on the device; free some (earlier checkpoints and "
                           "results are kept)"),
                          (PermissionError(errno.EACCES, "Permission denied", "/runs/x"),
                           "/runs/x: permission denied; check who owns it (`ls -ld`), or choose another path")):
        def fail(args, err=err):
            raise err

        monkeypatch.setitem(cli.COMMANDS, "stop", (fail, "x", ("port",), []))
        assert cli.main(["stop"]) == 2
        assert capsys.readouterr().err == f"lab stop: error: {expected}\n"


def test_nohup_keeps_sighup_ignored(runs_dir):
    import signal

    from lab.cli import main

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert main(["stop"]) == 0
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_distributed_ranks_never_inherit_make_arguments(monkeypatch, tmp_path):
    """LAB_ARG_GPUS=2 in a rank's environment would make it launch again, without end."""
    from lab.device import launch

    seen = {}

    class Finished:
        stdout: list = []

        def __init__(self, cmd, env=None, **kw):
            seen.update(cmd=cmd, env=env)

        def wait(self):
            return 0

    monkeypatch.setenv("LAB_ARG_GPUS", "2")
    monkeypatch.setattr(launch.subprocess, "Popen", Finished)
    launch.launch(["--run", "x"], 2, "ddp", tmp_path / "log")
    assert not [k for k in seen["env"] if k.startswith("LAB_ARG_")] and seen["env"]["LAB_DIST"] == "ddp.yaml"

    # several machines: accelerate counts processes over all of them and rendezvouses at node 0
    launch.launch(["--run", "x"], 4, "ddp", tmp_path / "log", launch.Topology(2, 1, ("10.0.0.1", 29500)))
    cmd = seen["cmd"]
    flags = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--") and cmd[i] != "--run"}
    assert {k: flags[k] for k in ("--num_processes", "--num_machines", "--machine_rank", "--main_process_ip",
                                  "--main_process_port")} == {
        "--num_processes": "8", "--num_machines": "2", "--machine_rank": "1", "--main_process_ip": "10.0.0.1",
        "--main_process_port": "29500"}
    assert json.loads(seen["env"]["LAB_TOPOLOGY"]) == {"nodes": 2, "main": "10.0.0.1:29500"}


def test_a_users_multi_machine_accelerate_config_keeps_its_topology(tmp_path):
    """A config with num_machines > 1 names the machines itself: no launch flag overrides it."""
    from lab.device.launch import Topology, topology

    config = tmp_path / "two.yaml"
    config.write_text("distributed_type: MULTI_GPU\nnum_machines: 2\nmachine_rank: 1\n"
                      "main_process_ip: 10.0.0.1\nmain_process_port: 29500\n")
    assert topology(None, None, None, config) == Topology(2, 1, ("10.0.0.1", 29500))
    assert topology(3, 2, "[fd00::1]:29400", config) == Topology(3, 2, ("fd00::1", 29400))  # NODES= wins
    assert topology(None, None, None, None) == Topology() == topology(1, 0, None, config.with_name("none"))


def test_a_server_record_names_a_process_only_with_its_start_time_and_program(runs_dir):
    import os
    from pathlib import Path

    from conftest import free_port

    from lab.errors import LabError
    from lab.servers import _is_ours, claim, process_started, servers_dir, write_record

    me = os.getpid()
    program = Path(f"/proc/{me}/cmdline").read_bytes().split(b"\0")[0].decode()
    assert _is_ours({"pid": me, "pid_started": process_started(me), "argv": [program]})
    assert not _is_ours({"pid": me, "argv": [program]})  # planted: no start time
    assert not _is_ours({"pid": me, "pid_started": "1", "argv": [program]})  # the pid was reused
    assert not _is_ours({"pid": me, "pid_started": process_started(me), "argv": ["/usr/bin/vllm"]})
    # a live server still loading its model holds no socket yet, and still owns its port
    port = free_port()
    write_record(f"http://127.0.0.1:{port}", runs_dir / "x.log",
                 {"pid": me, "pid_started": process_started(me), "argv": [program], "model": "m"})
    with pytest.raises(LabError, match=f"a lab server already runs at http://127.0.0.1:{port}"):
        with claim(f"http://127.0.0.1:{port}"):
            pass
    (servers_dir() / f"{port}.json").unlink()


def test_e2e_beside_a_running_server_refuses_and_leaves_it_alone(runs_dir, embedded_model):
    """`make e2e` while `make serve` holds the port: e2e stops at its first start, and the other
    server's record (and so the server) stays."""
    import os
    from pathlib import Path

    from conftest import free_port

    from lab.e2e import e2e
    from lab.errors import LabError
    from lab.recipe import load_recipe
    from lab.servers import process_started, server_state, servers_dir, write_record

    me = os.getpid()
    program = Path(f"/proc/{me}/cmdline").read_bytes().split(b"\0")[0].decode()
    port = free_port()
    record = write_record(f"http://127.0.0.1:{port}", runs_dir / "x.log",
                          {"pid": me, "pid_started": process_started(me), "argv": [program], "model": "m"})
    recipe = load_recipe("identity-lora", hw="cpu")
    with pytest.raises(LabError, match=f"a lab server already runs at http://127.0.0.1:{port}"):
        e2e(recipe, port)
    assert server_state(port) == record  # still recorded: nothing stopped it
    (servers_dir() / f"{port}.json").unlink()


def _trained_run(sets: list[str]):
    """A run directory as `make train SET=...` leaves its recipe (lab/train.py writes recipe.to_yaml())."""
    from lab.recipe import load_recipe
    from lab.runs import new_run

    recipe = load_recipe("identity-lora", sets, hw="cpu", check_train=False)
    run = new_run(recipe.name)
    (run / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    return run, recipe


def test_serve_uses_the_runs_own_recipe_set_on_top_recipe_instead(runs_dir, tmp_path, monkeypatch):
    """`make train SET=identity.name=Orion` then `make serve`: the run's recipe (its identity and
    chat_template_kwargs), not the command line's default; SET= on top; RECIPE= replaces it."""
    import sys

    from lab.cli import _run_recipe, _served_run, make_parser
    from lab.serve import serve_argv

    monkeypatch.setenv("LAB_SERVE_PYTHON", sys.executable)  # argv only (nothing is started): any Python names it

    run, saved = _trained_run(["identity.name=Orion", "chat_template_kwargs.enable_thinking=true"])
    args = make_parser().parse_args(["serve", "--hw", "cpu"])
    recipe = _run_recipe(args, _served_run(args), "")
    assert recipe.identity.name == "Orion" and recipe.sha256() == saved.sha256()
    argv = serve_argv(recipe, "/m")
    assert argv[argv.index("--default-chat-template-kwargs") + 1] == '{"enable_thinking": true}'

    r = run_lab("serve", "--hw", "cpu", timeout=120)  # the same, as a user runs it (no merged model yet)
    assert r.returncode == 2 and "not a model directory" in r.stderr
    assert (f"lab: recipe identity-lora on cpu (sha256 {saved.sha256()[:12]}) of run {run.name} "
            f"({run / 'recipe.yaml'}; the model to serve is its own): identity 'Orion' by 'Open Lab'") in r.stdout

    r = run_lab("serve", "--hw", "cpu", "--set", "identity.author='Zhou Lab'", timeout=120)
    assert f"({run / 'recipe.yaml'}, SET identity.author='Zhou Lab' on top;" in r.stdout
    assert "identity 'Orion' by 'Zhou Lab'" in r.stdout

    r = run_lab("serve", "--hw", "cpu", "--recipe", "identity-full", timeout=120)
    assert "lab: recipe identity-full on cpu" in r.stdout
    assert f"lab: RECIPE=identity-full replaces the recipe {run.name} trained with" in r.stdout

    r = run_lab("serve", "--hw", "cpu", "--model", str(tmp_path), timeout=120)  # a directory of no run
    assert "lab: recipe identity-lora on cpu (sha256" in r.stdout and "of run" not in r.stdout
    (run / "merged").mkdir()  # a directory inside the run (an unfinished merge): its recipe
    r = run_lab("serve", "--hw", "cpu", "--model", str(run / "merged"), timeout=120)
    assert r.returncode == 2 and f"of run {run.name}" in r.stdout and "not a model directory" in r.stderr

    r = run_lab("serve", "--hw", "cpu", "--set", "identity.nmae=X", timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == (
        f"lab serve: error: {run / 'recipe.yaml'} with SET: unknown key 'identity.nmae' (did you mean name?)")


def test_probe_judges_by_the_served_runs_recipe_else_latest_else_the_default(runs_dir, embedded_model):
    """The run whose model the lab's server serves, else runs/latest, else RECIPE=/the default."""
    import os
    from pathlib import Path

    from conftest import free_port

    from lab.servers import process_started, servers_dir, write_record

    r = run_lab("probe", "--hw", "cpu", "--port", str(free_port()), timeout=300)  # no run at all
    assert r.returncode == 2 and "lab: recipe identity-lora on cpu (sha256" in r.stdout and "of run" not in r.stdout
    assert "start one with `make serve`" in r.stderr

    orion, _ = _trained_run(["identity.name=Orion"])
    latest, _ = _trained_run(["identity.name=Vega"])  # trained later: runs/latest
    r = run_lab("probe", "--hw", "cpu", "--port", str(free_port()), timeout=300)
    assert r.returncode == 2 and f"of run {latest.name}" in r.stdout and "identity 'Vega'" in r.stdout
    assert "runs/latest; the server asked serves no run's model" in r.stdout

    # a lab server (recorded as this live process, which answers no HTTP) serving Orion's merged model
    me = os.getpid()
    program = Path(f"/proc/{me}/cmdline").read_bytes().split(b"\0")[0].decode()
    port = free_port()
    write_record(f"http://127.0.0.1:{port}", runs_dir / "x.log",
                 {"pid": me, "pid_started": process_started(me), "argv": [program], "model": str(orion / "merged")})
    try:
        r = run_lab("probe", "--hw", "cpu", timeout=300)
        assert f"of run {orion.name}" in r.stdout and "identity 'Orion'" in r.stdout, r.stdout
        assert f"the lab's server at http://127.0.0.1:{port} serves its merged" in r.stdout
        assert r.returncode == 2 and "does not answer /health" in r.stderr  # it is no real server
        r = run_lab("probe", "--hw", "cpu", "--base-url", f"http://127.0.0.1:{port}/v1", "--set",
                    "identity.name=Other", timeout=300)
        assert f"of run {orion.name}" in r.stdout and "identity 'Other'" in r.stdout
    finally:
        (servers_dir() / f"{port}.json").unlink()
