import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Tests pick their runtime explicitly: an engine on the machine must not move the CPU tests into containers.
os.environ["LAB_RUNTIME"] = "local"
# `make test` exports the make variables as LAB_ARG_* (Makefile); tests give their arguments themselves.
for _name in [k for k in os.environ if k.startswith("LAB_ARG_")]:
    del os.environ[_name]


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    """The real embedded model (built once per content hash, then cached)."""
    from lab.fixture import ensure_fixture

    return ensure_fixture()


@pytest.fixture
def runs_dir(tmp_path, monkeypatch) -> Path:
    from lab import runs

    d = tmp_path / "runs"
    monkeypatch.setattr(runs, "RUNS_DIR", d)
    monkeypatch.setenv("LAB_RUNS", str(d))
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_lab(*args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "lab", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


# The recipes default to a real model (SmolLM2-135M-Instruct); tests that train to check the lab's
# own mechanics use the embedded 0.3M-parameter one, which trains in seconds (test_real_model.py
# runs the real one end to end).
TINY = "model.path=embedded"

HUB_ID = "lab-test/pebble-tiny"  # the embedded model, published into a test HF cache under a hub id


@pytest.fixture(scope="session")
def hub_model(embedded_model, tmp_path_factory) -> dict:
    """The embedded model in a temporary Hugging Face cache, as `HUB_ID` at main; the env a test
    passes its subprocesses to resolve it offline (HF_HOME, HF_HUB_OFFLINE=1)."""
    from hub_cache import publish

    hf_home = tmp_path_factory.mktemp("hf-home")
    commit = publish(embedded_model, hf_home, HUB_ID)
    return {"id": HUB_ID, "commit": commit, "hf_home": hf_home,
            "snapshot": hf_home / "hub" / "models--lab-test--pebble-tiny" / "snapshots" / commit,
            "env": {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}}


@pytest.fixture(scope="session")
def identity_run(embedded_model, tmp_path_factory):
    """`lab train` of a shipped identity recipe on the embedded model, once per (recipe, name,
    author) in the session, into one shared runs directory: tests that need such a run (the
    identity checks, several adapters behind one server) share the training instead of repeating it."""
    runs = tmp_path_factory.mktemp("identity-runs") / "runs"
    made: dict[tuple, Path] = {}

    def train(recipe: str, name: str, author: str) -> Path:
        key = (recipe, name, author)
        if key not in made:
            sets = [TINY, f"identity.name={name}", f"identity.author={author}"]
            r = run_lab("train", "--hw", "cpu", "--recipe", recipe, "--runtime", "local", "--set",
                        " ".join(f"'{s}'" for s in sets), env={"LAB_RUNS": str(runs)})
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
            made[key] = (runs / "latest").resolve()
        return made[key]

    train.runs = runs
    return train
