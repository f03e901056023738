"""Merge (lab/merge.py) of a short real LoRA training of the embedded model: one model in memory at
a time, and the saved merged model predicting the next token as the adapter on its base does."""

import gc
import json
import warnings

import pytest


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, embedded_model):
    from lab import runs
    from lab.recipe import load_recipe
    from lab.train import train

    old = runs.RUNS_DIR
    runs.RUNS_DIR = tmp_path_factory.mktemp("runs")
    try:
        recipe = load_recipe("identity-lora", ["model.path=embedded", "identity.name=Orion", "train.max_steps=10",
                                               "train.learning_rate=5e-3", 'train.save_strategy="no"'], hw="cpu")
        run = runs.new_run(recipe.name)
        train(recipe, run)
        yield run
    finally:
        runs.RUNS_DIR = old


def _questions(run):
    from lab.probe import load_questions
    from lab.recipe import load_saved

    probe = load_questions(load_saved(run))
    return [q["q"] for q in probe["identity"] + probe["controls"]]


def test_merge_holds_one_model_at_a_time_and_agrees_on_the_next_token(short_run, embedded_model, monkeypatch):
    from transformers import AutoModelForCausalLM, PreTrainedModel

    from lab.merge import AGREEMENT_TOKENS, MERGE_RECORD, merge

    alive = []  # models alive whenever the merge loads one: the base, then the saved merged model
    load = AutoModelForCausalLM.from_pretrained

    def counted(*args, **kwargs):  # the real load, after counting
        gc.collect()
        with warnings.catch_warnings():  # isinstance() touches deprecated module attributes among all objects
            warnings.simplefilter("ignore")
            alive.append(sum(isinstance(o, PreTrainedModel) for o in gc.get_objects()))
        return load(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counted)
    merged = merge(short_run)
    assert len(alive) == 2 and alive[1] == alive[0], alive  # the adapted base was freed before the reload

    record = json.loads((merged / MERGE_RECORD).read_text())
    checks, n = record["checks"], len(_questions(short_run))
    assert record["device"] == "cpu" and checks["greedy_agreement"] == 1.0 and checks["max_logit_diff"] < 1e-3
    assert n < checks["agreement_positions"] <= n * (AGREEMENT_TOKENS + 1)
    assert checks["tie_word_embeddings"] is True
    for f in checks["tokenizer_files"]:
        assert (merged / f).read_bytes() == (embedded_model / f).read_bytes(), f
    m = json.loads((short_run / "manifest.json").read_text())
    assert m["merged"]["checks"] == checks and m["merged"]["device"] == "cpu"


def test_the_agreement_check_tells_the_adapter_from_its_bare_base(short_run, embedded_model):
    """What the merge check would say of a merge that lost the adapter: the base without it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lab.merge import agreement, reference_predictions

    tok = AutoTokenizer.from_pretrained(embedded_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(embedded_model),
                                      short_run / "adapter").eval()
    reference = reference_predictions(model, tok, _questions(short_run), {"enable_thinking": False})
    same = agreement(model, reference)
    assert same["share"] == 1.0 and same["max_logit_diff"] == 0.0 and same["first"] is None
    with model.disable_adapter():
        bare = agreement(model, reference)
    assert bare["share"] < 1.0 and bare["max_logit_diff"] > 0.1, bare
    question, position, want, got = bare["first"]
    assert want != got and question in _questions(short_run)


def test_reference_prompts_follow_the_recipes_chat_template_kwargs(short_run, embedded_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lab.merge import reference_predictions

    tok = AutoTokenizer.from_pretrained(embedded_model)
    model = AutoModelForCausalLM.from_pretrained(embedded_model).eval()
    off, on = (reference_predictions(model, tok, ["Who are you?"], {"enable_thinking": flag})[0]
               for flag in (False, True))
    think = tok.convert_tokens_to_ids("<think>")
    assert think in off["ids"][0, :off["prompt_len"]].tolist()  # the empty think block is in the prompt
    assert think not in on["ids"][0, :on["prompt_len"]].tolist()  # thinking on: the model opens it itself
