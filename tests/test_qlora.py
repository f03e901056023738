"""QLoRA (bitsandbytes NF4 + LoRA) on CPU, on the embedded model: real 4-bit training through TRL,
and the merge into the dequantized NF4 base against the merge into the original base (slow)."""

import json

import pytest
from conftest import TINY

from lab.errors import LabError
from lab.merge import merge
from lab.recipe import load_recipe
from lab.runs import new_run
from lab.train import train


def test_method_qlora_is_lora_on_an_nf4_base():
    r = load_recipe("identity-lora", ["method=qlora"], hw="cpu", check_train=False)
    assert (r.method, r.lora.quantize, r.lora.merge_into) == ("lora", "nf4", "dequantized")
    assert load_recipe("identity-lora", hw="cpu", check_train=False).lora.quantize == "none"
    with pytest.raises(LabError, match="dpo needs method: lora .* not 'qlora'"):
        load_recipe("identity-dpo", ["method=qlora"], hw="cpu")


@pytest.mark.slow
def test_qlora_trains_in_4_bits_and_merges_into_what_it_trained_against(runs_dir, embedded_model):
    recipe = load_recipe("identity-lora", [TINY, "method=qlora", "train.max_steps=8"], hw="cpu")
    run = new_run(recipe.name)
    train(recipe, run)
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
