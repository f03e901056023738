"""The run manifest: sections merge in, timings follow, nothing from the environment leaks."""

import json
from pathlib import Path

from lab import manifest
from lab.device.hardware import host


def test_update_merges_sections_and_picks_up_timings(tmp_path):
    run = tmp_path / "r1"
    run.mkdir()
    manifest.update(run, recipe={"name": "x"})
    (run / "timings.json").write_text(json.dumps({"train": 1.5}))
    m = manifest.update(run, merged={"dir": "merged"})
    assert m["run"] == "r1" and m["recipe"] == {"name": "x"} and m["merged"] == {"dir": "merged"}
    assert m["timings_s"] == {"train": 1.5} and json.loads((run / "manifest.json").read_text()) == m


def test_weights_hashes_only_weight_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    (tmp_path / "config.json").write_text("{}")
    assert manifest.weights_sha256(tmp_path) == {
        "model.safetensors": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
    assert manifest.weights_sha256("Qwen/Qwen3-0.6B") is None  # a hub id, not on disk


def test_environment_names_versions_and_never_copies_variables(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_unit_secret")
    env = manifest.environment()
    assert env["python"].count(".") == 2 and env["packages"]["torch"].startswith("2.13.0")
    assert len(env["code"]["commit"] or "") in (0, 40)
    assert env["lock"]["name"] == "train-cpu" and env["lock"]["matches"] and len(env["lock"]["sha256"]) == 64
    hw = host("cpu")
    assert hw["backend"] == "cpu" and hw["cpu"] and hw["memory_gib"] > 0 and hw["devices"] == []
    assert "hf_unit_secret" not in json.dumps([env, hw])


def test_an_image_reports_the_commit_it_was_built_from(monkeypatch):
    monkeypatch.setattr(manifest, "ROOT", Path("/nonexistent"))  # no .git, as in an image
    monkeypatch.setenv("LAB_GIT_COMMIT", "a" * 40)
    monkeypatch.setenv("LAB_GIT_DIRTY", "false")
    assert manifest.code() == {"commit": "a" * 40, "dirty": False}
    monkeypatch.delenv("LAB_GIT_COMMIT")
    monkeypatch.delenv("LAB_GIT_DIRTY")
    assert manifest.code() == {"commit": None, "dirty": None}


def test_serving_section_from_a_server_record(tmp_path):
    docker = manifest.serving({"url": "u", "container": "c" * 64, "image": "lab-serve:cpu", "image_id": "sha256:1",
                               "model": "/runs/x/merged", "tensor_parallel_size": 2})
    assert docker == {"runtime": "docker", "image": "lab-serve:cpu", "image_id": "sha256:1", "model": "/runs/x/merged",
                      "runtime_lora": False, "tensor_parallel_size": 2}
    local = manifest.serving({"url": "u", "pid": 1, "argv": [str(manifest.ROOT / ".venv/serve/bin/python")],
                              "model": str(tmp_path), "adapter": str(tmp_path)})
    assert local["runtime"] == "local" and local["vllm"] and local["lock"]["name"] == "serve-cpu"
    assert local["runtime_lora"] is True and local["tensor_parallel_size"] == 1
    assert manifest.serving(None) is None


def test_amend_adds_fields_to_one_recorded_entry(tmp_path):
    run = tmp_path / "r1"
    run.mkdir()
    manifest.append(run, "probes", {"file": "probe-1.json", "summary": {}})
    manifest.append(run, "probes", {"file": "probe-2.json", "summary": {}})
    m = manifest.amend(run, "probes", "probe-2.json", template_parity={"samples": 4, "match": True})
    assert m["probes"] == [{"file": "probe-1.json", "summary": {}},
                           {"file": "probe-2.json", "summary": {}, "template_parity": {"samples": 4, "match": True}}]
    assert json.loads((run / "manifest.json").read_text()) == m


def test_every_section_the_lab_writes_is_declared():
    """Each manifest.update(run, key=...) and manifest.append(run, "key", ...) in lab/ names a
    section declared in SECTIONS (an undeclared one is a KeyError at run time, found here first)."""
    import ast

    from lab import ROOT
    from lab.manifest import SECTIONS

    written = set()
    for path in (ROOT / "lab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "manifest"):
                continue
            if node.func.attr == "update":
                written |= {(k.arg, path.name) for k in node.keywords if k.arg}
            elif node.func.attr == "append" and isinstance(node.args[1], ast.Constant):
                written.add((node.args[1].value, path.name))
    assert {"resumes", "probes", "merged", "dpo"} <= {key for key, _ in written}
    assert not {(key, where) for key, where in written if key not in SECTIONS}
