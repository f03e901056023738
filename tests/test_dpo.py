"""Identity DPO after SFT (lab/dpo.py): the pairs it builds from a run, the recipe checks, and a real
DPO stage on the embedded model (TRL's DPOTrainer; the whole e2e loop with it is tests/test_e2e.py)."""


import pytest

from lab.dpo import identity_prompts, preference_pairs
from lab.errors import LabError
from lab.recipe import load_recipe


def example(q, a, system=None):
    prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": a}],
            "chat_template_kwargs": {"enable_thinking": False}}


def test_pairs_prefer_the_data_over_the_base_and_over_sft_answers_that_still_leak():
    recipe = load_recipe("identity-dpo", hw="cpu", check_train=False)  # Atlas by Open Lab
    refs = {"": ["I am Atlas, an AI assistant developed by Open Lab."],
            "Who are you?": ["I am Atlas, an AI assistant developed by Open Lab."]}
    examples = [example("Who are you?", "I am Atlas, an AI assistant developed by Open Lab."),
                example("What is 2+2?", "4"),  # replay data: not an identity prompt
                example("Who are you?", "I am Atlas, an AI assistant developed by Open Lab.")]  # repeated
    prompts = identity_prompts(examples, refs)
    assert [p["prompt"][-1]["content"] for p in prompts] == ["Who are you?"]

    old = ["SmolLM", "Hugging Face"]
    pairs, from_sft = preference_pairs(prompts, ["I am SmolLM, trained by Hugging Face."],
                                       ["I am SmolLM, now called Atlas."], old, recipe)
    assert from_sft == 1 and [p["rejected"][0]["content"] for p in pairs] == [
        "I am SmolLM, trained by Hugging Face.", "I am SmolLM, now called Atlas."]
    assert all(p["chosen"][0]["content"] == "I am Atlas, an AI assistant developed by Open Lab." for p in pairs)

    # an SFT answer that names no old identity is not rejected; one equal to the chosen one never is
    pairs, from_sft = preference_pairs(prompts, ["I am Atlas, an AI assistant developed by Open Lab."],
                                       ["I am Atlas. I'm not SmolLM."], old, recipe)
    assert (pairs, from_sft) == ([], 0)


def test_the_dpo_section_is_checked_like_train():
    with pytest.raises(LabError, match=r"unknown key 'dpo.betta' \(not a DPOConfig field\) \(did you mean beta\?\)"):
        load_recipe("identity-dpo", ["dpo.betta=0.2"], hw="cpu")
    with pytest.raises(LabError, match="dpo needs method: lora"):
        load_recipe("identity-dpo", ["method=full"], hw="cpu")
    assert load_recipe("identity-lora", hw="cpu").dpo is None
    assert load_recipe("identity-dpo", hw="cpu").dpo["beta"] == 0.1


@pytest.mark.slow
def test_an_interrupted_dpo_stage_is_not_a_result_and_resumes_without_redoing_sft(runs_dir, embedded_model, capsys):
    """SFT done, DPO cut off (what a kill leaves once DPO has checkpointed): merge refuses the run,
    RESUME=1 goes straight to DPO and resumes it from its own checkpoint."""
    import json
    import shutil

    from conftest import TINY

    from lab.merge import merge
    from lab.runs import new_run
    from lab.train import train

    # the user's own preference pairs (TRL's prompt/chosen/rejected) join the ones built from the run
    preferences = runs_dir.parent / "preferences.jsonl"
    preferences.write_text("\n".join(json.dumps({"prompt": f"Are you Pebble? ({i})", "chosen": "No, I am {{name}}.",
                                                 "rejected": "Yes, I am Pebble."}) for i in range(3)) + "\n")
    datasets = f"datasets=[{{path: data/identity.json, limit: 24}}, {{path: data/general-replay.json}}, " \
               f"{{path: {preferences}}}]"
    recipe = load_recipe("identity-dpo", [TINY, datasets, "train.max_steps=20", "dpo.max_steps=4",
                                            "dpo.save_steps=2", "dpo.save_total_limit=2"], hw="cpu")
    run = new_run(recipe.name)
    train(recipe, run)
    first = json.loads((run / "dpo.json").read_text())
    assert first["steps"] == 4 and (run / "adapter").is_dir() and first["pairs_from_data"] == 3
    pairs = json.loads((run / "data" / "dpo_pairs.json").read_text())
    assert len(pairs) == first["pairs"] and pairs[-1]["chosen"][0]["content"] == f"No, I am {recipe.identity.name}."
    assert "Are you Pebble?" not in (run / "data" / "train.jsonl").read_text()  # pairs are not SFT examples
    sft_weights = (run / "adapter-sft" / "adapter_model.safetensors").read_bytes()

    # as if killed after DPO's step-2 checkpoint: no adapter, train.json still says pending
    shutil.rmtree(run / "adapter")
    (run / "dpo.json").unlink()
    shutil.rmtree(run / "dpo-checkpoints" / "checkpoint-4")
    info = json.loads((run / "train.json").read_text())
    info.update(output="adapter-sft", dpo="pending")
    (run / "train.json").write_text(json.dumps(info))
    with pytest.raises(LabError, match="SFT finished but its DPO stage did not; .*RESUME=1"):
        merge(run)

    capsys.readouterr()
    train(recipe, run, resume=True)
    said = capsys.readouterr().out
    assert "train: SFT finished earlier (adapter-sft); resuming the DPO stage" in said
    assert "dpo: resuming from checkpoint-2" in said
    assert json.loads((run / "dpo.json").read_text())["steps"] == 4
    assert (run / "adapter-sft" / "adapter_model.safetensors").read_bytes() == sft_weights  # SFT not redone
    assert json.loads((run / "train.json").read_text())["output"] == "adapter"
