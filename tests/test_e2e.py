"""The whole chain, for real, on CPU: `make e2e` as a user runs it (slow: a few minutes), on a
hub id resolved offline from a Hugging Face cache (the embedded model, published there under a
hub id, as the user of a GPU overlay's Qwen/Qwen3-0.6B has it after one download)."""

import json
import os
import shutil
import subprocess

import pytest
from conftest import ROOT, TINY, free_port, run_lab

pytestmark = pytest.mark.slow
# identity-lora's `models.embedded` overlay, for the embedded model published under a hub id
EMBEDDED_SETTINGS = ("datasets.1.repeat=1 train.num_train_epochs=12 train.learning_rate=1e-3 "
                     "probe.thresholds.after_hit_rate_min=0.95 probe.thresholds.before_control_correct_min=0.95 "
                     "probe.thresholds.control_retention_min=0.95")


def test_e2e_changes_identity_and_keeps_the_rest(runs_dir, hub_model):
    # the README's own example identity (it failed the probe before issue 12), not the recipe's default;
    # identity-dpo: identity-lora's SFT, then DPO on its adapter (one loop proves both)
    env = {**os.environ, **hub_model["env"], "LAB_RUNS": str(runs_dir)}
    r = subprocess.run(["make", "e2e", "HW=cpu", "RUNTIME=local", "RECIPE=identity-dpo",
                        # the embedded model under a hub id: the recipe's settings for it named on the command line
                        f"SET=model.path={hub_model['id']} {EMBEDDED_SETTINGS} identity.name=Orion "
                        "identity.author='Zhou Lab'",
                        f"PORT={free_port()}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = (runs_dir / "latest").resolve()
    # every stage read the one snapshot of the hub id: training, the merge's tokenizer files (byte for
    # byte), serving the base; the manifest pins its commit
    snapshot = hub_model["snapshot"]
    assert json.loads((run / "train.json").read_text())["base_model"] == str(snapshot)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (snapshot / f).is_file():
            assert (run / "merged" / f).read_bytes() == (snapshot / f).read_bytes(), f
    assert "server-base.log" in os.listdir(run) and str(snapshot) in (run / "server-base.log").read_text()
    report = json.loads((run / "report.json").read_text())
    assert report["pass"] is True and report["template_parity"]["match"] is True
    assert report["before"]["identity_hit_rate"] <= 0.10 and report["after"]["identity_hit_rate"] >= 0.95
    assert report["before"]["control_correct_rate"] >= 0.95 and report["after"]["leakage_rate"] <= 0.05
    for stage in ("serve_base", "probe_before", "train", "merge", "serve_merged", "probe_after"):
        assert stage in report["timings_s"]
    after = json.loads((run / "probe-after.json").read_text())
    assert all("Orion" in q["answer"] and not q["reasons"] for q in after["identity"] if q["hit"])
    assert all(q["reasons"] for q in after["identity"] + after["controls"] if not q.get("hit", q.get("correct")))
    assert "| why not |" in (run / "report.md").read_text()
    # DPO after SFT: pairs from the run, margins that rose, no old identity left, shown in the report
    dpo = json.loads((run / "dpo.json").read_text())
    margins = [m for _, m in dpo["margins"]]
    assert dpo["pairs"] >= dpo["prompts"] > 0 and max(margins[len(margins) // 2:]) > margins[0], margins
    assert dpo["old_identity_claims"]["dpo"] <= dpo["old_identity_claims"]["sft"] < dpo["old_identity_claims"]["base"]
    assert "## What DPO changed" in (run / "report.md").read_text() and report["dpo"]["steps"] == dpo["steps"]
    assert (run / "adapter-sft" / "adapter_config.json").is_file()
    for f in ("report.md", "report.html", "loss.png", "merged/model.safetensors", "probe-before.json"):
        assert (run / f).is_file(), f
    assert not list((runs_dir / ".servers").glob("*.json"))  # servers stopped
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["runtime"] == "local" and manifest["probe"]["pass"] is True
    # the run browser, rebuilt after the command, shows the real run: identity, verdict, scores
    page = (runs_dir / "index.html").read_text()
    row = page[page.index(f'<a href="{run.name}/">'):].split("</tr>")[0]
    assert "Orion / Zhou Lab" in row and ">PASS<" in row and "<polyline" in row
    assert f"{report['before']['identity_hit_rate']:.2f} &rarr; {report['after']['identity_hit_rate']:.2f}" in row
    assert manifest["output"]["dir"] == "adapter" and manifest["output"]["sft"]["dir"] == "adapter-sft"
    assert manifest["dpo"]["pairs"] == dpo["pairs"]
    assert (manifest["base_model"]["source"] == hub_model["id"]
            and manifest["base_model"]["commit"] == hub_model["commit"])
    assert manifest["device"]["backend"] == "cpu" and manifest["device"]["dtype"] == "float32"
    assert manifest["merged"]["weights_sha256"] and set(report["timings_s"]) == set(manifest["timings_s"])
    # both environments named with their locks, and both installed exactly
    assert manifest["environment"]["lock"]["name"] == "train-cpu" and manifest["environment"]["lock"]["matches"]
    serving = manifest["serving"]
    assert serving["runtime"] == "local" and serving["lock"]["name"] == "serve-cpu" and serving["lock"]["matches"]
    assert serving["model"].endswith("/merged") and serving["vllm"]

    # the same run served as base + LoRA (vLLM's runtime LoRA, no merge), probed on its own: the
    # probe lands in this run and sets the adapter's answers beside the merged model's. Neither is
    # told the identity: both take the run's own recipe (Orion), and the probe checks template parity.
    port = str(free_port())
    r = run_lab("serve", "--hw", "cpu", "--run", run.name, "--adapter", "--port", port, env=hub_model["env"],
                timeout=900)
    try:
        assert r.returncode == 0 and "+ LoRA" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
        assert f"{snapshot} + LoRA" in r.stdout  # the run's own base: the hub id's snapshot
        assert f"of run {run.name}" in r.stdout
        r = run_lab("probe", "--hw", "cpu", "--port", port, env=hub_model["env"], timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"of run {run.name}" in r.stdout and "identity 'Orion' by 'Zhou Lab'" in r.stdout
        assert "probe: template parity: the server renders" in r.stdout
    finally:
        run_lab("stop", timeout=120)
    (entry,) = json.loads((run / "manifest.json").read_text())["probes"]
    assert entry["serving"]["model"].endswith("/adapter") and entry["summary"]["identity_hit_rate"] >= 0.95
    assert entry["agreement_with_merged"] >= 0.8 and "runtime LoRA vs the merged model" in r.stdout
    assert entry["template_parity"]["match"] is True and entry["template_parity"]["samples"] >= 1

    # a copy of the merged model whose chat template injects a line: `make probe` reports the drift
    # loudly, records it, and exits 1
    drifted = run / "merged-drifted"
    shutil.copytree(run / "merged", drifted)
    jinja = drifted / "chat_template.jinja"
    if jinja.is_file():
        jinja.write_text("{{- 'Be brief.\\n' }}" + jinja.read_text(encoding="utf-8"), encoding="utf-8")
    else:
        config = json.loads((drifted / "tokenizer_config.json").read_text(encoding="utf-8"))
        config["chat_template"] = "{{- 'Be brief.\\n' }}" + config["chat_template"]
        (drifted / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    port = str(free_port())
    try:
        r = run_lab("serve", "--hw", "cpu", "--model", str(drifted), "--port", port, env=hub_model["env"], timeout=900)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        r = run_lab("probe", "--hw", "cpu", "--port", port, env=hub_model["env"], timeout=600)
    finally:
        run_lab("stop", timeout=120)
    assert r.returncode == 1 and "probe: TEMPLATE DRIFT: template drift: training rendered prompt 0" in r.stderr, \
        r.stdout[-2000:] + r.stderr[-2000:]
    entry = json.loads((run / "manifest.json").read_text())["probes"][-1]
    assert entry["serving"]["model"].endswith("/merged-drifted") and entry["template_parity"]["match"] is False


def test_e2e_full_fine_tuning_with_a_chinese_identity(runs_dir, embedded_model):
    """identity-full end to end (train every weight, merge = check and complete, vLLM, probe) on a
    Chinese name and a maker with '&' and '.', through make as a user types it."""
    env = {**os.environ, "LAB_RUNS": str(runs_dir)}
    r = subprocess.run(["make", "e2e", "HW=cpu", "RUNTIME=local", "RECIPE=identity-full",
                        f"SET={TINY} identity.name=星河-7 identity.author='R&D Labs.'", f"PORT={free_port()}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = (runs_dir / "latest").resolve()
    report = json.loads((run / "report.json").read_text())
    assert report["pass"] is True and report["after"]["identity_hit_rate"] >= 0.95
    after = json.loads((run / "probe-after.json").read_text())
    assert after["target"] == {"name": "星河-7", "author": "R&D Labs."}
    assert {c["check"] for c in report["verdict"]} >= {"before control correct rate", "control retention"}
