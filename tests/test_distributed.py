"""The distributed path on CPU: `lab train --gpus 2` is two real processes under accelerate
launch (torch.distributed over gloo), each a plain `lab train`; rank 0 alone writes the run."""

import json
import math

import pytest
from conftest import TINY, run_lab

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
    assert m["distributed"] == {"processes": 2, "accelerate_config": "ddp.yaml", "type": "MULTI_CPU"}
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and "train" in m["timings_s"]
    assert "2 processes through accelerate" in r.stdout and (run / "train.log").is_file()
    r = run_lab("merge", "--run", "ddp", timeout=600)  # the result is an ordinary run
    assert r.returncode == 0, r.stderr[-2000:]


def test_an_unknown_distribution_config_is_one_line(runs_dir):
    r = run_lab("train", "--hw", "cpu", "--gpus", "2", "--dist", "zero9", "--run", "bad", "--set", TINY, timeout=300)
    assert r.returncode == 2 and "DIST='zero9'" in r.stderr and "ddp, fsdp2, zero3" in r.stderr
    assert "Traceback" not in r.stderr and not runs_dir.exists()
