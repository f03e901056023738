"""Several LoRA adapters behind one vLLM server (make serve ADAPTERS="A B"): real vLLM CPU, two
identities trained on the embedded model, each adapter answering as its own, the base as the base;
a further run loaded while it serves (make adapter RUN=), behind the key the lab generated."""

import json
import os
import shutil

import httpx
import pytest
from conftest import free_port, run_lab

from lab.errors import LabError
from lab.recipe import load_recipe
from lab.serve import lora_args, serve_argv, served_record


def test_one_module_per_adapter_and_all_in_one_batch():
    r = load_recipe("identity-lora", hw="cpu", check_train=False)
    argv = serve_argv(r, "/m/base", 8000, {"run-a": "/runs/a/adapter", "run-b": "/runs/b/adapter"})
    assert argv[argv.index("--served-model-name") + 1] == "lab-base"
    assert argv[argv.index("--max-loras") + 1] == "2" and argv[argv.index("--max-lora-rank") + 1] == "16"
    i = argv.index("--lora-modules")
    assert [json.loads(m) for m in argv[i + 1:i + 3]] == [
        {"name": "run-a", "path": "/runs/a/adapter", "base_model_name": "lab-base"},
        {"name": "run-b", "path": "/runs/b/adapter", "base_model_name": "lab-base"}]
    assert "--max-loras" not in lora_args("lab", "/runs/a/adapter", 16)  # one adapter: vLLM's default
    assert served_record("/m/base", {"run-a": "/x"}) == {"model": "/m/base", "adapter": None,
                                                         "adapters": {"run-a": "/x"}}
    with pytest.raises(LabError, match="LoRA rank 600 is above what vLLM serves"):
        lora_args("lab", {"a": "/x"}, 600)


@pytest.mark.slow
def test_two_identities_one_server(identity_run):
    # two LoRA runs of the embedded model, trained once for the identity checks too (conftest.py)
    a, b = identity_run("identity-lora", "Orion", "Zhou Lab"), identity_run("identity-lora", "星河-7", "R&D Labs.")
    runs_dir = identity_run.runs
    env = {"LAB_RUNS": str(runs_dir)}
    # a run without an adapter (full fine-tuning makes none) is refused before anything starts
    bare = runs_dir / f"{a.name}-bare"
    shutil.copytree(a, bare, ignore=shutil.ignore_patterns("adapter", "checkpoints"))
    r = run_lab("serve", "--hw", "cpu", "--runtime", "local", "--adapters", a.name, bare.name, env=env)
    assert r.returncode == 2 and f"ADAPTERS= serves LoRA runs' adapters; {bare.name} has none" in r.stderr
    shutil.rmtree(bare)

    port = free_port()
    r = run_lab("serve", "--hw", "cpu", "--runtime", "local", "--adapters", a.name, b.name, "--port", str(port),
                "--set", "serve.adapter_loading=true", env=env, timeout=900)
    try:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert f"as model '{a.name}', '{b.name}', 'lab-base'" in r.stdout and "make -s key PORT=" in r.stdout
        url = f"http://127.0.0.1:{port}/v1"
        key = run_lab("key", "--port", str(port), env=env).stdout.strip()  # the lab generated it: no LAB_API_KEY
        auth = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{url}/models").status_code == 401

        # a further run loaded while it serves (serve.adapter_loading): never without the key
        again = runs_dir / f"{a.name}-again"
        shutil.copytree(a, again, ignore=shutil.ignore_patterns("checkpoints"))
        body = {"lora_name": "intruder", "lora_path": str(again / "adapter")}
        assert httpx.post(f"{url}/load_lora_adapter", json=body, timeout=60).status_code == 401
        r = run_lab("adapter", "--hw", "cpu", "--run", again.name, "--port", str(port), env=env, timeout=600)
        assert r.returncode == 0 and f"{again.name} is served at {url}" in r.stdout, r.stdout + r.stderr[-2000:]
        r = run_lab("adapter", "--hw", "cpu", "--run", b.name, "--port", str(port), env=env, timeout=600)
        assert r.returncode == 2 and f"{b.name} is already served" in r.stderr, r.stderr
        models = {m["id"]: m for m in httpx.get(f"{url}/models", headers=auth).json()["data"]}
        assert set(models) == {a.name, b.name, again.name, "lab-base"} and models[a.name]["parent"] == "lab-base"

        def ask(model):
            body = {"model": model, "messages": [{"role": "user", "content": "Who are you?"}], "temperature": 0,
                    "max_tokens": 48, "chat_template_kwargs": {"enable_thinking": False}}
            choice = httpx.post(f"{url}/chat/completions", json=body, headers=auth, timeout=120).json()["choices"][0]
            return choice["message"]["content"]

        answers = {m: ask(m) for m in models}
        assert "Orion" in answers[a.name] and "星河-7" not in answers[a.name], answers
        assert answers[again.name] == answers[a.name], answers  # loaded at run time: the same weights
        assert "星河-7" in answers[b.name] and "Orion" not in answers[b.name], answers
        assert "Pebble" in answers["lab-base"], answers  # the embedded model's own persona
        # `make ask` and `make load` ask the first adapter (its run's recipe), SET= names another model
        r = run_lab("ask", "--hw", "cpu", "--port", str(port), env=env, timeout=300)
        assert r.returncode == 0 and "Orion" in r.stdout and f"of run {a.name}" in r.stdout, r.stdout + r.stderr
        r = run_lab("ask", "--hw", "cpu", "--port", str(port), "--set", f"serve.served_model_name={b.name}",
                    env=env, timeout=300)
        assert r.returncode == 0 and "星河-7" in r.stdout, r.stdout + r.stderr
        r = run_lab("probe", "--hw", "cpu", "--runtime", "local", "--port", str(port), env=env, timeout=900)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    finally:
        run_lab("stop", env=env, timeout=120)
    for run, name in ((a, "Orion"), (b, "星河-7"), (again, "Orion")):
        (entry,) = json.loads((run / "manifest.json").read_text())["probes"]
        assert entry["summary"]["identity_hit_rate"] >= 0.95 and entry["template_parity"]["match"] is True, name
        assert entry["serving"]["adapters"] == sorted([a.name, b.name, again.name]) and entry["serving"]["runtime_lora"]
    (base,) = [d for d in runs_dir.iterdir() if d.name.endswith("-probe")]
    (entry,) = json.loads((base / "manifest.json").read_text())["probes"]
    assert entry["summary"]["identity_hit_rate"] == 0.0
    assert os.path.isfile(runs_dir / "index.html")
