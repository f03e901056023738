"""Pinned environments: the locks agree with the pins, environments install them exactly, and
`make lock` re-resolves them (uv, against PyPI: the slow test needs the registry)."""

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab import pins

REQ = pins.REQUIREMENTS


@pytest.mark.parametrize("name", list(pins.table()))
def test_each_lock_holds_its_pins_and_none_of_what_it_drops(name):
    spec = pins.table()[name]
    lock = pins.read_pins(pins.LOCKS / f"{name}.txt")
    drop = spec.get("drop", [])
    wanted = pins.read_pins(REQ / spec["pins"])
    if spec.get("torch") and "torch" not in drop:
        wanted.update(pins.read_pins(REQ / spec["torch"]))
    for package, version in wanted.items():
        if not any(fnmatch.fnmatch(package, p) for p in drop):
            assert lock.get(package) == version, (
                f"{name}: {package} is {lock.get(package)} in the lock, {version} pinned")
    assert not [p for p in lock if any(fnmatch.fnmatch(p, d) for d in drop)]
    assert len(lock) > len(wanted)  # the whole closure, not just the top level
    assert f"Lock for the {name} environment" in (pins.LOCKS / f"{name}.txt").read_text().splitlines()[0]


def test_cpu_locks_never_take_the_cuda_torch_and_the_cuda_lock_does():
    assert pins.read_pins(pins.LOCKS / "train-cpu.txt")["torch"].endswith("+cpu")
    cuda = pins.read_pins(pins.LOCKS / "train-cuda.txt")
    assert "+" not in cuda["torch"] and any(p.startswith("nvidia-") for p in cuda)
    # each GPU training lock is resolved for the Python its image has (pytorch/pytorch, python:3.12-slim)
    assert pins.table()["train-cuda"]["python"] == pins.table()["train-rocm"]["python"] == "3.12"
    assert "# Python 3.12," in (pins.LOCKS / "train-cuda.txt").read_text()


@pytest.mark.parametrize("hw", ["cpu", "cuda", "rocm"])
def test_each_ray_lock_is_its_training_lock_plus_ray(hw):
    """lab-ray:<hw> installs ray-<hw> over the training image's venv: every version the training
    lock pins stays (locks.yaml `over`), and only Ray and what it needs come in."""
    train, ray = (pins.read_pins(pins.LOCKS / f"{n}-{hw}.txt") for n in ("train", "ray"))
    assert pins.table()[f"ray-{hw}"]["over"] == f"train-{hw}"
    assert {k: ray[k] for k in train} == train
    assert ray["ray"] == "2.60.0" and {"grpcio", "msgpack", "protobuf"} <= set(ray) - set(train)


def test_the_cuda12_lock_is_the_cuda_lock_on_a_cuda_12_torch():
    """CUDA=12 (drivers older than 580, V100s): PyTorch 2.9 with CUDA 12 runtime wheels, and the
    training libraries of the CUDA 13 lock, version for version."""
    cuda, cuda12 = (pins.read_pins(pins.LOCKS / f"{n}.txt") for n in ("train-cuda", "train-cuda12"))
    assert cuda12["torch"].startswith("2.9.") and "+" not in cuda12["torch"]
    assert any(p.startswith("nvidia-") and p.endswith("-cu12") for p in cuda12)
    assert not any("cu13" in p or p.startswith("cuda-toolkit") for p in cuda12)
    for lib in ("transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "liger-kernel"):
        assert cuda12[lib] == cuda[lib], lib
    assert pins.table()["train-cuda12"]["python"] == "3.12"


def test_this_environment_is_its_lock_exactly():
    d = pins.drift()
    assert d is not None, "the test environment was not installed by requirements/install.sh"
    assert d["name"] == "train-cpu" and d["matches"], (d["differs"], d["missing"])
    dev = set(pins.read_pins(REQ / "dev.txt"))
    assert dev <= set(d["extra"]) | set(pins.read_pins(pins.LOCKS / "train-cpu.txt"))


def test_drift_names_a_changed_version(tmp_path):
    site = tmp_path / "lib" / "python3.11" / "site-packages"
    for name, version in (("alpha", "1.0"), ("beta", "2.0")):
        info = site / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (tmp_path / pins.INSTALLED_LOCK).write_text("# Lock for the toy environment: x\nalpha==1.0\nbeta==2.1\ngamma==3\n")
    d = pins.drift(tmp_path)
    assert d["name"] == "toy" and not d["matches"]
    assert d["differs"] == {"beta": ["2.1", "2.0"]} and d["missing"] == ["gamma"] and d["extra"] == []


def test_a_local_build_label_is_the_locked_release(tmp_path):
    """pytorch/pytorch ships torch 2.13.0+cu130 where the lock says 2.13.0 (PyPI's build of it)."""
    assert pins.same_version("2.13.0", "2.13.0+cu130") and pins.same_version("2.13.0+cpu", "2.13.0+cpu")
    assert not pins.same_version("2.13.0+cpu", "2.13.0") and not pins.same_version("2.13.0", "2.13.1+cu130")
    info = tmp_path / "lib" / "python3.12" / "site-packages" / "torch-2.13.0+cu130.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0+cu130\n")
    (tmp_path / pins.INSTALLED_LOCK).write_text("# Lock for the train-cuda environment: x\ntorch==2.13.0\n")
    assert pins.drift(tmp_path)["matches"] and pins.drift(tmp_path)["differs"] == {}


def test_dropping_removes_whole_requirement_blocks():
    text = "a==1\n    # via b\nnvidia-x==2\n    # via\n    #   torch\ntorch==3\n    # via -r r.txt\nz==4\n"
    assert pins._drop(text, ["nvidia-*", "torch"]) == "a==1\n    # via b\nz==4\n"


def test_an_environment_without_a_lock_is_one_line_and_exit_2():
    out = subprocess.run(["sh", str(REQ / "install.sh"), sys.executable, "serve", "rocm"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "no lock for serve on rocm" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_unknown_lock_name_is_an_error():
    from lab.errors import LabError

    with pytest.raises(LabError, match="no lock named serve-tpu"):
        pins.lock(["serve-tpu"], check=True)


def _offline_torch(monkeypatch):
    """Hosts whose pip finds the CPU torch wheel locally (ours) cannot reach PyTorch's index."""
    import os

    links = [Path(p) for p in os.environ.get("PIP_FIND_LINKS", "").split()]
    if any(p.is_dir() and list(p.glob("torch-*+cpu-*.whl")) for p in links):
        monkeypatch.setenv("LAB_CPU_TORCH_INDEX_URL", "")


@pytest.mark.slow
def test_locks_are_up_to_date_and_a_changed_pin_moves_its_lock(tmp_path, monkeypatch):
    _offline_torch(monkeypatch)
    assert pins.lock(check=True) == [], "requirements/lock/ is stale: run `make lock`"
    req = tmp_path / "requirements"
    shutil.copytree(REQ, req)
    monkeypatch.setattr(pins, "REQUIREMENTS", req)
    monkeypatch.setattr(pins, "LOCKS", req / "lock")
    harness = req / "harness.txt"
    harness.write_text(harness.read_text().replace("PyYAML==6.0.3", "PyYAML==6.0.2"))
    assert pins.lock(["harness"], check=True) == ["harness"]
    assert pins.read_pins(req / "lock" / "harness.txt")["pyyaml"] == "6.0.3"  # --check writes nothing
    assert pins.lock(["harness"]) == ["harness"]
    relocked = pins.read_pins(req / "lock" / "harness.txt")
    assert relocked["pyyaml"] == "6.0.2"
    assert {k: v for k, v in relocked.items() if k != "pyyaml"} == \
        {k: v for k, v in pins.read_pins(REQ / "lock" / "harness.txt").items() if k != "pyyaml"}


def _install(tmp_path, pins_name, **env):
    """install.sh train <pins_name> with a stand-in for the venv's python that records each pip call
    (calls.txt) and the files it was given: -r (asked.txt, the last one) and -c (constraints.txt)."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nif [ "$1" = -c ]; then echo "$PREFIX"; exit 0; fi\necho "$*" >> "$PREFIX/calls.txt"\n'
                    'prev=; for a; do if [ "$prev" = -r ]; then cp "$a" "$PREFIX/asked.txt"; fi\n'
                    'if [ "$prev" = -c ]; then cp "$a" "$PREFIX/constraints.txt"; fi; prev=$a; done\n')
    fake.chmod(0o755)
    out = subprocess.run(["sh", str(REQ / "install.sh"), str(fake), "train", pins_name], capture_output=True,
                         text=True, env={**os.environ, "PREFIX": str(tmp_path), **env})
    assert out.returncode == 0, out.stderr
    return (tmp_path / "calls.txt").read_text().splitlines()


def test_a_base_images_torch_runtime_is_left_to_the_base(tmp_path):
    """pytorch/pytorch brings torch, Triton and the CUDA runtime it was built with: the image installs
    the rest of the lock (docker/install.sh sets LAB_LOCK_SKIP) and keeps the whole lock to compare."""
    (call,) = _install(tmp_path, "cuda", LAB_LOCK_SKIP="torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+")
    assert "--require-hashes" in call.split()
    asked = pins.read_pins(tmp_path / "asked.txt")
    assert "transformers" in asked and "liger-kernel" in asked
    assert not [p for p in asked if p in ("torch", "triton") or p.startswith(("nvidia-", "cuda-"))]
    # whole requirement blocks left out: no --hash line of a skipped package is left behind
    text = (tmp_path / "asked.txt").read_text()
    assert pins.unhashed(text) == [] and not re.search(r"^\s+--hash", text.replace(" \\\n", " "), re.M)
    assert (tmp_path / pins.INSTALLED_LOCK).read_text() == (pins.LOCKS / "train-cuda.txt").read_text()


@pytest.mark.parametrize("name", list(pins.table()))
def test_every_locked_package_carries_its_hashes(name):
    """pip --require-hashes (install.sh) installs nothing without a sha256 from the lock."""
    text = (pins.LOCKS / f"{name}.txt").read_text()
    requirements = [line for line in text.replace(" \\\n", " ").splitlines() if pins._PIN.match(line)]
    assert len(requirements) >= len(pins.read_pins(pins.LOCKS / f"{name}.txt"))  # universal: one per marker
    assert not [r.split()[0] for r in requirements if not re.search(r"--hash=sha256:[0-9a-f]{64}\b", r)]
    assert pins.unhashed(text) == []


def test_install_checks_the_hashes_and_constrains_torch_by_versions_only(tmp_path):
    """ROCm: AMD's torch (unhashed, from its index) is constrained by the lock's versions, without
    the lock's hashes, which would turn on hash-checking for it; then the lock, hash-checked."""
    torch_step, lock_step = _install(tmp_path, "rocm")
    assert "--require-hashes" not in torch_step.split() and "--require-hashes" in lock_step.split()
    assert "--no-deps" in lock_step.split()
    constraints = (tmp_path / "constraints.txt").read_text()
    assert "--hash" not in constraints and "\\" not in constraints
    assert pins.read_pins(tmp_path / "constraints.txt") == pins.read_pins(pins.LOCKS / "train-rocm.txt")
