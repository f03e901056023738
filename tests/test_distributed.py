"""The distributed path on CPU: `lab train --gpus 2` is two real processes under accelerate
launch (torch.distributed over gloo), each a plain `lab train`; rank 0 alone writes the run.
Two machines are two `lab train` commands on loopback (NODES=2, NODE_RANK=0|1, MAIN=)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY, free_port, run_lab

pytestmark = pytest.mark.slow


def test_two_processes_over_gloo_split_the_data(runs_dir, embedded_model):
    r = run_lab("train", "--hw", "cpu", "--gpus", "2", "--set", f"{TINY} train.num_train_epochs=2", "--run", "ddp",
                timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = runs_dir / "ddp"
    info = json.loads((run / "train.json").read_text())
    # the global batch is 2 x 16: half the steps one process would take
    assert info["global_steps"] == 2 * math.ceil(info["examples"] / (2 * 16))
    m = json.loads((run / "manifest.json").read_text())
    assert m["distributed"] == {"processes": 2, "accelerate_config": "ddp.yaml", "type": "MULTI_CPU", "nodes": 1}
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and "train" in m["timings_s"]
    # not safetensors' 0600: readable by a serving container's user, as the umask (022 here) allows
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_mode & 0o044 == 0o044
    assert "2 processes through accelerate" in r.stdout and (run / "train.log").is_file()
    r = run_lab("merge", "--run", "ddp", timeout=600)  # the result is an ordinary run
    assert r.returncode == 0, r.stderr[-2000:]

    # the same training on two "machines" of one process each: two lab commands that rendezvous at
    # node 0 (loopback here), node 0 writing the run; the same ranks, so the same losses
    main = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "lab", "train", "--hw", "cpu", "--set",
                               f"{TINY} train.num_train_epochs=2", "--nodes", "2", "--node-rank", str(rank),
                               "--main", main, *(["--run", "two-nodes"] if rank == 0 else [])],
                              cwd=ROOT, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in (1, 0)]
    out = [p.communicate(timeout=900)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], out[0][-3000:] + out[1][-3000:]
    assert "node 1 of 2 done; node 0 wrote the run" in out[0] and f"on node 0 of 2, rendezvous at {main}" in out[1]
    two = runs_dir / "two-nodes"
    assert sorted(p.name for p in runs_dir.iterdir() if not p.name.startswith(".")) == ["ddp", "index.html",
                                                                                         "latest", "two-nodes"]
    m = json.loads((two / "manifest.json").read_text())
    assert m["distributed"] == {"processes": 2, "accelerate_config": "ddp.yaml", "type": "MULTI_CPU", "nodes": 2,
                                "main": main}

    def losses(r):
        return [e["loss"] for e in map(json.loads, (r / "metrics.jsonl").read_text().splitlines()) if "loss" in e]

    assert losses(two) and losses(two) == pytest.approx(losses(run), rel=1e-5, abs=1e-6)
    # the same ranks on the same data: the same adapter, byte for byte (seen: identical sha256)
    weights = "adapter/adapter_model.safetensors"
    assert (two / weights).read_bytes() == (run / weights).read_bytes()


def test_an_unknown_distribution_config_is_one_line(runs_dir):
    r = run_lab("train", "--hw", "cpu", "--gpus", "2", "--dist", "zero9", "--run", "bad", "--set", TINY, timeout=300)
    assert r.returncode == 2 and "DIST='zero9'" in r.stderr and "ddp, fsdp2, zero3" in r.stderr
    assert "Traceback" not in r.stderr and not runs_dir.exists()


def test_a_machine_that_never_joins_is_one_line_after_the_join_timeout(runs_dir, embedded_model):
    """NODES=2 with one machine missing: node 0 alone waits cluster.join_timeout_s for the other,
    a node 1 alone as long for node 0; each then fails in one line that says which, its log kept."""
    short = f"{TINY} cluster.join_timeout_s=10"
    alone = {rank: subprocess.Popen([sys.executable, "-m", "lab", "train", "--hw", "cpu", "--set", short, "--nodes",
                                     "2", "--node-rank", str(rank), "--main", f"127.0.0.1:{free_port()}"],
                                    cwd=ROOT, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for rank in (0, 1)}
    said = {rank: p.communicate(timeout=600) for rank, p in alone.items()}
    for rank, (out, err) in said.items():
        assert alone[rank].returncode == 2 and "Traceback" not in err, out[-2000:] + err[-2000:]
        (line,) = err.strip().splitlines()
        assert line.startswith("lab train: error: "), line
        kept = Path(line.rpartition("; see ")[2])
        assert kept.is_file() and kept.is_relative_to(runs_dir / ".failed"), line
    main0 = alone[0].args[alone[0].args.index("--main") + 1]
    main1 = alone[1].args[alone[1].args.index("--main") + 1]
    assert said[0][1].strip().startswith(
        f"lab train: error: only 1 of 2 machines joined the rendezvous at {main0} within 10 s "
        "(cluster.join_timeout_s): start the same `make train` with NODE_RANK=1 on the others (same NODES and MAIN)")
    assert said[1][1].strip().startswith(
        f"lab train: error: node 0 did not answer at {main1} within 10 s (cluster.join_timeout_s): start node 0 "
        "(NODE_RANK=0, on the machine MAIN names) or fix MAIN")
    # nothing left that looks like a run
    assert [p.name for p in runs_dir.iterdir() if not p.name.startswith(".")] in ([], ["index.html"])
