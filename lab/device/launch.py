"""Beyond one device: `lab train --gpus N` runs the same `lab train` in N processes under
`accelerate launch`, with one of the accelerate configs shipped in recipes/accelerate/ (ddp,
fsdp2, zero3) or any accelerate config file. Beyond one machine: the same command on every
node with NODES, NODE_RANK and MAIN (node 0's address and a port), or an accelerate config
whose num_machines, machine_rank, main_process_ip and main_process_port say so; accelerate
(torchrun underneath) rendezvouses. No distribution code of ours: each process is a plain
`lab train` whose Trainer reads accelerate's environment (NCCL/RCCL on GPUs, gloo on CPU).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lab import ROOT
from lab.errors import LabError

CONFIGS = ROOT / "recipes" / "accelerate"


def is_main_process() -> bool:
    """Rank 0 (or no distribution at all): the one process that writes the run's files."""
    return int(os.environ.get("RANK", "0")) == 0


def config_file(dist: str) -> Path:
    path = CONFIGS / f"{dist}.yaml" if "/" not in dist and not dist.endswith(".yaml") else Path(dist).expanduser()
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
        raise LabError(f"DIST={dist!r}: no accelerate config {path}; shipped: {shipped}, or a path to your own")
    return path


@dataclass(frozen=True)
class Topology:
    """Machines of one training: how many, which one this is, and node 0's rendezvous address."""
    nodes: int = 1
    node_rank: int = 0
    main: tuple[str, int] | None = None

    @property
    def address(self) -> str:
        return f"{self.main[0]}:{self.main[1]}" if self.main else ""

    def record(self) -> dict:
        return {"nodes": self.nodes, **({"main": self.address} if self.nodes > 1 else {})}


def topology(nodes: int | None, node_rank: int | None, main: str | None, config: Path | None) -> Topology:
    """NODES/NODE_RANK/MAIN, else what an accelerate config with num_machines > 1 says: a launch
    flag would override the config's topology, so the lab passes the config's own."""
    cfg = {}
    if config is not None and nodes is None:
        import yaml

        cfg = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        if int(cfg.get("num_machines") or 1) > 1:
            if not cfg.get("main_process_ip") or not cfg.get("main_process_port"):
                raise LabError(f"{config}: num_machines {cfg['num_machines']} needs main_process_ip and "
                               "main_process_port (node 0's address and a free port)")
            nodes, node_rank = int(cfg["num_machines"]), int(cfg.get("machine_rank") or 0)
            main = f"{cfg['main_process_ip']}:{cfg['main_process_port']}"
    nodes, node_rank = nodes or 1, node_rank or 0
    if nodes < 1 or not 0 <= node_rank < nodes:
        raise LabError(f"NODES={nodes} NODE_RANK={node_rank}: give the number of machines and this one's rank, "
                       f"0 to {max(nodes, 1) - 1} (0 on the machine MAIN names)")
    if nodes == 1:
        return Topology()
    host, _, port = (main or "").rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise LabError(f"NODES={nodes}: MAIN={main or ''!r} must be node 0's address and a free port, as host:port "
                       "(the same on every node)")
    return Topology(nodes, node_rank, (host.strip("[]"), int(port)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(train_argv: list[str], processes: int, dist: str, log: Path, topo: Topology = Topology(),
           join_timeout_s: int = 600) -> None:
    """accelerate launch -m lab train ... in `processes` processes on this node (of topo.nodes);
    their output goes to `log` and here. Machines that do not come together within
    join_timeout_s (torch's static rendezvous: node 0 waits for the others, they for it) fail it."""
    config = config_file(dist)
    if topo.nodes > 1:  # accelerate counts processes over all machines
        where = ["--num_machines", str(topo.nodes), "--machine_rank", str(topo.node_rank),
                 "--main_process_ip", topo.main[0], "--main_process_port", str(topo.main[1]),
                 "--rdzv_conf", f"timeout={join_timeout_s}"]
    else:
        where = ["--main_process_port", str(_free_port())]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--num_processes", str(processes * topo.nodes), *where, "-m", "lab", "train", *train_argv]
    print(f"train: {processes} processes through accelerate ({config.name})"
          + (f" on node {topo.node_rank} of {topo.nodes}, rendezvous at {topo.address}" if topo.nodes > 1 else "")
          + f"; log: {log}", flush=True)
    # the ranks get their arguments from argv alone: make's LAB_ARG_GPUS would make each launch again
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAB_ARG_")}
    code = stream(cmd, log, {**env, "LAB_DIST": config.name, "LAB_TOPOLOGY": json.dumps(topo.record())})
    if code != 0:
        raise LabError(_rendezvous_failure(log, topo, join_timeout_s) or f"distributed training exited with {code}; "
                       f"see {log}")


def _rendezvous_failure(log: Path, topo: Topology, timeout: int) -> str | None:
    """What torch's static rendezvous said when the machines did not come together, in one line."""
    if topo.nodes < 2:
        return None
    tail = log.read_text(errors="replace")[-20000:]
    if m := re.search(r"waiting for clients\. (\d+)/(\d+) clients joined", tail):
        others = "NODE_RANK=1" if topo.nodes == 2 else f"NODE_RANK=1..{topo.nodes - 1}"
        return (f"only {m.group(1)} of {m.group(2)} machines joined the rendezvous at {topo.address} within "
                f"{timeout} s (cluster.join_timeout_s): start the same `make train` with {others} on the others "
                f"(same NODES and MAIN); see {log}")
    if "client socket has timed out" in tail:
        return (f"node 0 did not answer at {topo.address} within {timeout} s (cluster.join_timeout_s): start node 0 "
                f"(NODE_RANK=0, on the machine MAIN names) or fix MAIN; see {log}")
    return None


def stream(cmd: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> int:
    """Run a launcher (accelerate's, Ray's driver), its output to `log` and here; its exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            for line in proc.stdout:
                out.write(line)
                sys.stdout.write(line)
            return proc.wait()
        except BaseException:  # Ctrl-C, SIGTERM, SIGHUP: the launchers end their workers on SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
