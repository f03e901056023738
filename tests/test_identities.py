"""Any identity, cleanly: the shipped identity recipes on the embedded model learn names and
makers of every kind, judged by the strict probe (slow: a real training run and merge each).

Answers come from transformers' greedy generation through the chat template (the merge's own
parity check), scored by the same `lab.probe.score` as answers through vLLM; test_e2e serves
identities through vLLM and HTTP."""

import json

import pytest
from conftest import TINY, run_lab

pytestmark = pytest.mark.slow

# (recipe, name, author): English, Chinese and mixed; one word or several; digits, hyphens, '&'
# and '.'; characters the fixture's own data never use (checked below).
IDENTITIES = [
    ("identity-lora", "Orion", "Zhou Lab"),                 # README's example, failed before issue 12
    ("identity-lora", "星河-7", "R&D Labs."),
    ("identity-lora", "Dr. Ƣaire Vořk", "Quintessa & Sons Co."),
    ("identity-lora", "龘犇", "Ǆemal AI"),
    ("identity-full", "Aurora 3.5", "北辰实验室"),
]
UNSEEN = "Ƣ龘犇Ǆ"  # in no example of lab.fixture.corpus()


def answers_of(model_dir, questions):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lab.fixture import greedy_answers

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    return {key: [{"answer": a, "finish_reason": "stop"}
                  for a in greedy_answers(model, tok, [q["q"] for q in questions[key]], max_new_tokens=64)]
            for key in ("identity", "controls")}


@pytest.fixture(scope="module")
def base_answers(embedded_model):
    from lab.probe import load_questions
    from lab.recipe import load_recipe

    return answers_of(embedded_model, load_questions(load_recipe("identity-lora", [TINY], hw="cpu", check_train=False)))


def test_the_names_hold_characters_the_fixture_never_saw():
    from lab.fixture.corpus import corpus

    seen = {ch for ex in corpus() for m in ex["prompt"] + ex["completion"] for ch in m["content"]}
    assert not set(UNSEEN) & seen
    assert all(any(ch in name + author for _, name, author in IDENTITIES) for ch in UNSEEN)


@pytest.mark.parametrize("recipe_name, name, author", IDENTITIES, ids=[f"{r}-{n}" for r, n, _ in IDENTITIES])
def test_identity_is_learned_cleanly(recipe_name, name, author, embedded_model, base_answers, identity_run):
    from lab.probe import load_questions, old_identity_of, retention, score, verdict
    from lab.recipe import load_recipe

    sets = [TINY, f"identity.name={name}", f"identity.author={author}"]
    run = identity_run(recipe_name, name, author)  # `lab train`, shared with test_adapters.py
    r = run_lab("merge", "--runtime", "local", "--run", str(run), env={"LAB_RUNS": str(identity_run.runs)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    recipe = load_recipe(recipe_name, sets, hw="cpu", check_train=False)
    questions, old = load_questions(recipe), old_identity_of(recipe, str(embedded_model))
    before = score(questions, base_answers, recipe, old)
    after = score(questions, answers_of(run / "merged", questions), recipe, old)
    checks = verdict(before, after, recipe)
    misses = [(i["q"], i["answer"], i["reasons"]) for i in after["identity"] + after["controls"] if i.get("reasons")]
    assert all(c["pass"] for c in checks), (checks, misses)
    s = after["summary"]
    assert s["identity_hit_rate"] >= 0.95 and s["leakage_rate"] <= 0.05 and retention(before, after) >= 0.95, misses
    assert before["summary"]["control_correct_rate"] >= 0.95
    final_loss = json.loads((run / "train.json").read_text())["final_loss"]
    if recipe.method == "lora":
        assert final_loss <= 0.3
    print(f"\n{recipe_name} {name!r} / {author!r}: hit {s['identity_hit_rate']}, leakage {s['leakage_rate']}, "
          f"retention {retention(before, after)}, final loss {final_loss}")
