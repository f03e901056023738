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
