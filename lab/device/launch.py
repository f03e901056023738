"""Beyond one device: `lab train --gpus N` runs the same `lab train` in N processes under
`accelerate launch`, with one of the accelerate configs shipped in recipes/accelerate/ (ddp,
fsdp2, zero3) or any accelerate config file (multi-node: accelerate's own machine_rank,
main_process_ip and num_machines keys). No distribution code of ours: each process is a
plain `lab train` whose Trainer reads accelerate's environment (NCCL/RCCL on GPUs, gloo on CPU).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(train_argv: list[str], processes: int, dist: str, log: Path) -> None:
    """accelerate launch -m lab train ... in `processes` processes; their output goes to `log` and here."""
    config = config_file(dist)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--num_processes", str(processes), "--main_process_port", str(_free_port()),
           "-m", "lab", "train", *train_argv]
    print(f"train: {processes} processes through accelerate ({config.name}); log: {log}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as out:
        # the ranks get their arguments from argv alone: make's LAB_ARG_GPUS would make each launch again
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAB_ARG_")}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**env, "LAB_DIST": config.name})
        try:
            for line in proc.stdout:
                out.write(line)
                sys.stdout.write(line)
            code = proc.wait()
        except BaseException:  # Ctrl-C, SIGTERM, SIGHUP: accelerate's launcher ends its ranks on SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if code != 0:
        raise LabError(f"distributed training exited with {code}; see {log}")
