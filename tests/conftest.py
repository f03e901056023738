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
