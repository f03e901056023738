"""The run manifest: sections merge in, timings follow, nothing from the environment leaks."""

import json

from lab import manifest


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
    hw = manifest.hardware("cpu")
    assert hw["backend"] == "cpu" and hw["cpu"] and hw["memory_gib"] > 0 and hw["devices"] == []
    assert "hf_unit_secret" not in json.dumps([env, hw])
