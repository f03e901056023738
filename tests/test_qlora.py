"""QLoRA (bitsandbytes NF4 + LoRA) on CPU, on the embedded model: real 4-bit training through TRL,
served by vLLM and probed, and the merge into the dequantized NF4 base against the merge into the
original base (slow)."""

import json
import os
import subprocess

import pytest
from conftest import ROOT, TINY, free_port

from lab.errors import LabError
from lab.merge import merge
from lab.recipe import load_recipe


def test_method_qlora_is_lora_on_an_nf4_base():
    r = load_recipe("identity-lora", ["method=qlora"], hw="cpu", check_train=False)
    assert (r.method, r.lora.quantize, r.lora.merge_into) == ("lora", "nf4", "dequantized")
    assert load_recipe("identity-lora", hw="cpu", check_train=False).lora.quantize == "none"
    with pytest.raises(LabError, match="dpo needs method: lora .* not 'qlora'"):
        load_recipe("identity-dpo", ["method=qlora"], hw="cpu")


@pytest.mark.slow
def test_qlora_end_to_end_and_both_merge_paths(runs_dir, embedded_model):
    """`make e2e SET=method=qlora`: trained in 4 bits, merged into the dequantized NF4 base, served by
    vLLM and probed with the strict bar; then the same adapter merged into the original base."""
    r = subprocess.run(["make", "e2e", "HW=cpu", "RUNTIME=local", f"SET={TINY} method=qlora", f"PORT={free_port()}"],
                       cwd=ROOT, env={**os.environ, "LAB_RUNS": str(runs_dir)}, capture_output=True, text=True,
                       timeout=1500)
    assert r.returncode == 0 and "e2e: PASS" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    run = (runs_dir / "latest").resolve()
    report = json.loads((run / "report.json").read_text())
    assert report["pass"] is True and report["template_parity"]["match"] is True
    assert report["after"]["identity_hit_rate"] >= 0.95 and report["after"]["leakage_rate"] <= 0.05
    assert json.loads((run / "manifest.json").read_text())["merged"]["checks"]["qlora"]["merged_into"] == "dequantized"
    info = json.loads((run / "train.json").read_text())
    assert info["quantize"] == "nf4" and info["method"] == "lora" and info["final_loss"] is not None
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"

    gaps = {}
    for into in ("dequantized", "original"):
        if into == "original":  # the same adapter, merged the other way
            import shutil

            shutil.rmtree(run / "merged")
            text = (run / "recipe.yaml").read_text().replace("merge_into: dequantized", "merge_into: original")
            (run / "recipe.yaml").write_text(text)
        merged = merge(run)
        checks = json.loads((merged / "lab_merge.json").read_text())["checks"]
        assert checks["qlora"] == {"quantize": "nf4", "merged_into": into}
        assert not any("Linear4bit" in k for k in json.loads((merged / "config.json").read_text()))
        assert "quantization_config" not in json.loads((merged / "config.json").read_text())
        gaps[into] = checks["max_logit_diff"]
    # merged into the dequantized NF4 base, the model is the one that trained; into the original
    # base, it differs by the quantization error
    assert gaps["dequantized"] < gaps["original"], gaps
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["merged"]["checks"]["qlora"]["merged_into"] == "original"
