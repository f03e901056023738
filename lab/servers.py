"""The lab's servers as processes: one record per port (runs/.servers/<port>.json), a lock so two
starts never race for one port, the identity of a process (pid + its start time, or a container),
health polling, and stopping exactly the server the lab started, with its whole process group.
serve.py starts vLLM; this module keeps track of what runs, for the local and the Docker runtime."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import time
from pathlib import Path

from lab import runs
from lab.errors import LabError
from lab.runs import write_json


def healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _tail(log: Path, n: int = 3) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    return " | ".join(lines[-n:])[-600:]


def check_free(url: str) -> None:
    """Refuse a port something already listens on (a TCP connect: a server still loading its model
    answers no /health yet, but holds its port), naming the lab server that holds it, if one does."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=1.0):
            pass
    except OSError:
        return
    record = server_state(parts.port)
    if record and _record_alive(record):
        raise _busy(record)
    raise LabError(f"port {parts.port} on {parts.hostname} is taken by a program the lab did not start; pick another "
                   "PORT")


def servers_dir() -> Path:
    """runs/.servers/<port>.json: one record per port, so `make stop` from another shell finds each."""
    return runs.RUNS_DIR / ".servers"


def port_of(url: str) -> int:
    from urllib.parse import urlsplit

    return urlsplit(url).port


@contextlib.contextmanager
def claim(url: str):
    """Hold the port's lock while checking it is free and starting a server on it: two `make serve`
    (or `make e2e` beside `make serve`) never both pass the check and fight over one port."""
    import fcntl

    servers_dir().mkdir(parents=True, exist_ok=True)
    with open(servers_dir() / f"{port_of(url)}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = server_state(port_of(url))
        if record and _record_alive(record):  # still loading its model: it holds no socket yet
            raise _busy(record)
        if record:
            _drop(record)  # a server that died (kill -9, reboot): its record only
        check_free(url)
        yield


_STARTED_HERE: dict[str, dict] = {}  # url -> the record of the server this process started there


def _busy(record: dict) -> LabError:
    return LabError(f"a lab server already runs at {record['url']} (serving {record.get('model')}; log "
                     f"{record.get('log')}): `make stop PORT={record['port']}` first, or pick another PORT")


def write_record(url: str, log: Path, record: dict) -> dict:
    """runs/.servers/<port>.json, its owner's only (mode 0600): it may hold the server's API key."""
    record = {"url": url, "port": port_of(url), "log": str(log), **record}
    servers_dir().mkdir(parents=True, exist_ok=True)
    write_json(servers_dir() / f"{record['port']}.json", record, private=True)
    _STARTED_HERE[url] = record
    return record


def update_record(record: dict, **changes) -> dict:
    """The server's record with `changes` (an adapter loaded while it serves), still its owner's only."""
    record = {**record, **changes}
    write_json(servers_dir() / f"{record['port']}.json", record, private=True)
    return record


def new_key() -> str:
    return "lab-" + secrets.token_urlsafe(24)


def recorded_key(url: str) -> str | None:
    """The key the lab generated for its own server at `url` (scheme, host and port as recorded):
    a client of any other address never gets it."""
    from urllib.parse import urlsplit

    try:
        record = server_state(port_of(url))
    except (LabError, ValueError):
        return None
    if not record or urlsplit(record["url"])[:2] != urlsplit(url)[:2]:
        return None
    return record.get("api_key")


def _same(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("pid", "pid_started", "container", "url"))


def wait_healthy(url: str, timeout_s: float, log: Path, record: dict, failed) -> str:
    """Poll /health until it answers. `failed()` returns None while the server may still come up,
    else what went wrong; then (or on Ctrl-C, SIGTERM, SIGHUP) this server, and only this one, stops."""
    record = {"url": url, "port": port_of(url), "log": str(log), **record}
    deadline = time.monotonic() + timeout_s
    try:
        while not healthy(url):
            problem = failed()
            if problem:
                raise LabError(f"Server {problem}; {log}: {_tail(log)}")
            if time.monotonic() > deadline:
                raise LabError(f"Server failed to start in time ({timeout_s:.0f} s); see {log}")
            time.sleep(1.0)
    except BaseException:  # a server that never came up is not left behind
        stop_server(_STARTED_HERE.pop(url, record))
        raise
    return url


def records() -> list[dict]:
    return [runs.read_json_file(p, "remove it once no lab server runs (`ps`, `docker ps`)")
            for p in sorted(servers_dir().glob("*.json"))] if servers_dir().is_dir() else []


def server_state(port: int | None = None) -> dict | None:
    """The lab's record of the server on `port` (url, log, model, and pid + argv or container +
    image); without a port, the only one (or the first, when several run)."""
    if port is not None:
        path = servers_dir() / f"{port}.json"
        return runs.read_json_file(path, "remove it once no lab server runs (`ps`, `docker ps`)") \
            if path.is_file() else None
    found = records()
    return found[0] if found else None


def process_started(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22): with the pid,
    it names one process; a pid reused after a crash or reboot has another."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, as another user's process (a pid reused after a reboot)
        return True
    try:  # a zombie child of ours counts as gone
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def _is_ours(record: dict) -> bool:
    """The recorded process is still the one the lab started: same pid, same start time, same
    program. A record without them (hand-written, or planted through the runs/ mount) names none."""
    pid, started, argv = record.get("pid"), record.get("pid_started"), record.get("argv")
    if not isinstance(pid, int) or pid <= 1 or not started or not isinstance(argv, list) or not argv:
        return False
    if not _alive(pid) or process_started(pid) != started:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and cmdline[0].decode(errors="replace") == str(argv[0])


def _record_alive(record: dict) -> bool:
    if "container" in record:
        from lab.containers import state

        return bool(state(record["container"]).get("Running"))
    return _is_ours(record)


def _drop(record: dict) -> None:
    """Remove the port's record if it is still this one (another server may hold the port now)."""
    path = servers_dir() / f"{record['port']}.json"
    try:
        current = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        current = None
    if current is None or _same(current, record):
        path.unlink(missing_ok=True)


def stop_server(record: dict) -> str:
    """Stop one recorded server, after checking it is the one the lab started; drop its record."""
    if "container" in record:
        from lab.containers import remove_id

        removed = remove_id(record["container"])  # only a container carrying the lab's label
        what = f"container {record['container'][:12]}" if removed else "its container was already gone"
    elif _is_ours(record):
        stop_process_group(record["pid"])
        what = f"pid {record['pid']}"
    else:  # exited, or the pid now names another process: kill nothing
        what = f"pid {record.get('pid')} was no longer the lab's server; nothing killed"
    if not record.get("_gone"):
        _drop(record)
    return what


def stop(quiet: bool = False, port: int | None = None) -> bool:
    """Stop the lab's server on `port`, or every one it recorded; True if one was."""
    found = [r for r in ([server_state(port)] if port is not None else records()) if r]
    if not found and not quiet:
        print(f"stop: no lab server is running{f' on port {port}' if port else ''}")
    for record in found:
        what = stop_server(record)
        if not quiet:
            print(f"stop: stopped the server at {record['url']} ({what})")
    return bool(found)


def stop_url(url: str | None) -> None:
    """Stop the server this process started at `url` (e2e's own), never one started since by another."""
    mine = _STARTED_HERE.pop(url, None) if url else None
    if mine:
        record = server_state(port_of(url))
        stop_server(record if record and _same(record, mine) else {**mine, "_gone": True})


def stop_process_group(pid: int) -> None:
    """SIGTERM the group, then SIGKILL whatever of it is left (an engine child can outlive its parent)."""
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while _group_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _group_alive(pid):
            return


def _group_alive(pgid: int) -> bool:
    _alive(pgid)  # reaps the leader if it is our zombie child
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _alive(pgid) or _members(pgid)


def _members(pgid: int) -> bool:
    """Any live (non-zombie) process left in the group, from /proc."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def running_url(port: int | None = None) -> str | None:
    """The URL of the lab's server (on `port`, or the only one); None when none is recorded. A
    recorded server that died or does not answer is an error naming its log."""
    record = server_state(port)
    if record is None:
        return None
    if healthy(record["url"]):
        return record["url"]
    if not _record_alive(record):
        _drop(record)
        log = Path(record["log"])
        tail = _tail(log) if runs.RUNS_DIR.resolve() in log.resolve().parents else ""  # never an arbitrary file
        raise LabError(f"the lab's server at {record['url']} has exited; its log: {record['log']}"
                       f"{f': {tail}' if tail else ''}")
    raise LabError(f"the lab's server at {record['url']} does not answer /health (still starting, or hung); "
                   f"its log: {record['log']}")
