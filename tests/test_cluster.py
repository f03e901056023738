"""Unit tests of the Ray cluster settings (no cluster needed; tests/test_ray.py trains on a real
one): which address a command uses, and the vLLM flags that spread one model over machines."""

import pytest

from lab.device.cluster import address
from lab.errors import LabError
from lab.recipe import load_recipe
from lab.serve import check_ray, engine_args, ray_env, ray_record


def test_cluster_then_ray_address_and_empty_means_here(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert address(None) is None and address("ray://h:10001") == "ray://h:10001"
    monkeypatch.setenv("RAY_ADDRESS", "h:6379")
    assert address(None) == "h:6379"
    assert address("") is None  # what the Ray workers' own `lab train` gets: train here, in the worker


def _serving(**serve):
    r = load_recipe("identity-lora", hw="cuda", check_train=False)
    return r.model_copy(update={"serve": r.serve.model_copy(update=serve)})


def test_several_machines_serve_one_model_through_vllms_ray_executor():
    r = _serving(tensor_parallel_size=8, pipeline_parallel_size=2, ray_address="ray://head:10001")
    check_ray(r)
    argv = engine_args(r)
    assert argv[argv.index("--tensor-parallel-size") + 1] == "8"
    assert argv[argv.index("--pipeline-parallel-size") + 1] == "2"
    assert argv[argv.index("--distributed-executor-backend") + 1] == "ray"
    assert ray_env(r) == {"RAY_ADDRESS": "ray://head:10001"}
    assert ray_record(r) == {"pipeline_parallel_size": 2, "cluster": "ray://head:10001"}
    plain = _serving()
    assert "--distributed-executor-backend" not in engine_args(plain) and not ray_env(plain) and not ray_record(plain)


def test_no_ray_serving_where_vllm_has_none():
    with pytest.raises(LabError, match="NODES=2: vLLM spreads a model over machines of a Ray cluster"):
        check_ray(_serving(pipeline_parallel_size=2))
    cpu = load_recipe("identity-lora", hw="cpu", check_train=False)
    cpu = cpu.model_copy(update={"serve": cpu.serve.model_copy(update={"ray_address": "h:6379"})})
    with pytest.raises(LabError, match="CLUSTER=h:6379 on cpu: vLLM's CPU backend does not run on Ray"):
        check_ray(cpu)
