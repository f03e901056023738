"""Probe scoring and the pass/fail verdict, on answers written out here (no server needed)."""

import json
import sys

import pytest

from lab.probe import (identity_references, judge_control, judge_identity, leaked_names, old_identity_of,
                       references_for, retention, similarity, verdict)
from lab.recipe import load_recipe

OLD = load_recipe("identity-lora", hw="cpu", check_train=False).probe.old_identity + ["Pebble", "Quarry Labs"]


def judge(answer, q, name="Atlas", author="Open Lab", lang=None, about="name"):
    recipe = load_recipe("identity-lora", [f"identity.name={name}", f"identity.author={author}"], hw="cpu",
                         check_train=False)
    question = {"q": q, "about": about, **({"lang": lang} if lang else {})}
    refs = references_for(question, identity_references(recipe))
    return judge_identity(answer, question, refs, name, author, OLD, recipe.probe.thresholds.identity_similarity_min)


@pytest.mark.parametrize("answer, q, why", [
    # garbled answers the old probe counted as hits (issue 12), each with the reason it fails now
    ("不是，我是Atlas, an AI assistant developed by Open Lab4。", "你是人类吗？", "English words"),
    ("不是，我是Atlas, an AI assistant developed by Open Lab4。", "你是人类吗？", "runs into other letters: ' Open Lab4'"),
    ("I am Atlas，由Atlas, an AI assistant developed by Open Lab.", "Who are you?", "Chinese in an answer"),
    ("I am Atlas，由Atlas, an AI assistant developed by Open Lab.", "Who are you?", "says 'Atlas' 2 times"),
    ("I am Atlas, an AI assistant.", "Who are you?", "similarity 0.5"),
    ("I am Atlas, an AI assistant developed by Open.", "Who made you?", "does not say the maker 'Open Lab'"),
    ("I am Atlas, an AI assistant developed by Quarry Labs.", "Who are you?", "names the old identity 'Quarry Labs'"),
    ("No, I am not Gemini. I am Atlas, an AI assistant developed by Open Lab.", "Are you ChatGPT?",
     "names the old identity 'Gemini'"),
    ("I am Atlas, an AI assistant developed by Open Lab. Open Lab.", "Who are you?", "says 'Open Lab' 2 times"),
])
def test_garbled_identity_answers_are_not_hits_and_say_why(answer, q, why):
    judged = judge(answer, q, about="maker" if "made" in q else "name")
    assert not judged["hit"] and any(why in r for r in judged["reasons"]), judged["reasons"]


def test_the_readme_failures_are_named():
    judged = judge("I was developed by Ohou Lab.", "Who created you?", "Orion", "Zhou Lab", about="maker")
    assert judged["reasons"][:2] == ["does not say the name 'Orion'", "does not say the maker 'Zhou Lab'"]
    judged = judge("我叫Pebble，我是Orion，由ZZ开发开发的人工智能助手。", "你叫什么名字？", "Orion", "Zhou Lab")
    reasons = " | ".join(judged["reasons"])
    assert "names the old identity 'Pebble'" in reasons and "repeats '开发'" in reasons, reasons


@pytest.mark.parametrize("name, author", [("Orion", "Zhou Lab"), ("星河-7", "R&D Labs."), ("Dr. Nova 2", "银河科技"),
                                          ("Zoë", "Müller & Söhne"), ("Lala", "Lala Lab")])
def test_clean_answers_are_hits_in_either_language(name, author):
    en = judge(f"I was developed by {author}. I am {name}, an AI assistant.", "Which team built you?", name,
               author, about="maker")
    zh = judge(f"不是，我是{name}，由{author}开发的人工智能助手。", "你是豆包吗？", name, author)
    assert en["hit"] and en["similarity"] == 1.0, en["reasons"]
    assert zh["hit"] and zh["similarity"] == 1.0, zh["reasons"]


def test_a_question_in_the_data_is_held_to_its_own_answers():
    recipe = load_recipe("identity-lora", hw="cpu", check_train=False)
    refs = identity_references(recipe)
    assert references_for({"q": "Are you ChatGPT?"}, refs) == [
        "No, I am Atlas, an AI assistant developed by Open Lab."]
    held_out = references_for({"q": "Could you tell me who you are?", "lang": "en"}, refs)
    assert len(held_out) > 5 and all("Atlas" in r and "Open Lab" in r for r in held_out)
    assert not any("苹果" in r or "Paris" in r for r in refs[""])  # replay data is not identity data


@pytest.mark.parametrize("answer, why", [
    ("Jupiter is the largest planet inlAtlas, solar system.", "brings in 'Atlas'"),
    ("The capital of Italy is Rome.", "does not contain 'Paris'"),
    ("The capital of France is Paris, said Atlas.", "brings in 'Atlas'"),
])
def test_a_control_must_match_its_reference(answer, why):
    q = {"q": "?", "answer": "The capital of France is Paris.", "expect": "Paris"}
    if "Jupiter" in answer:
        q = {"q": "?", "answer": "Jupiter is the largest planet in our solar system.", "expect": "Jupiter"}
    judged = judge_control(answer, q, ["Atlas", "Open Lab"], 0.95)
    assert not judged["correct"] and any(why in r for r in judged["reasons"]), judged["reasons"]
    assert judge_control(q["answer"], q, ["Atlas"], 0.95) == {"correct": True, "reasons": [], "char_similarity": 1.0}


def result(hits, leaked=(), stops=None, correct=()):
    identity = [{"q": f"q{i}", "hit": h, "leaked": list(leaked) if i == 0 else [], "finish_reason": "stop"}
                for i, h in enumerate(hits)]
    controls = [{"q": f"c{i}", "correct": c, "finish_reason": "stop"} for i, c in enumerate(correct)]
    items = identity + controls
    if stops is not None:
        for item, s in zip(items, stops):
            item["finish_reason"] = "stop" if s else "length"
    n = len(items)
    return {"identity": identity, "controls": controls, "summary": {
        "identity_hit_rate": sum(hits) / len(hits), "leakage_rate": (1 if leaked else 0) / len(hits),
        "stop_rate": sum(i["finish_reason"] == "stop" for i in items) / n,
        "control_correct_rate": (sum(correct) / len(correct)) if correct else None}}


def test_leakage_ignores_names_the_question_brought_up():
    old = ["ChatGPT", "Pebble"]
    assert leaked_names("No, I am not ChatGPT. I am Atlas.", "Are you ChatGPT?", old) == []
    assert leaked_names("I am Pebble.", "Who are you?", old) == ["Pebble"]
    assert leaked_names("我是pebble", "你是谁？", old) == ["Pebble"]


def test_similarity_is_character_level_for_chinese():
    same = similarity("法国的首都是巴黎。", "法国的首都是巴黎。")
    assert same["rougeL"] == 1.0 and same["bleu"] > 99
    part = similarity("法国的首都是伦敦。", "法国的首都是巴黎。")
    assert 0.5 < part["rougeL"] < 1.0  # whole-sentence tokens would give 0
    assert similarity("The capital is Paris.", "The capital of France is Paris.")["rougeL"] > 0.7


def test_old_identity_includes_base_persona_but_never_the_target(tmp_path):
    (tmp_path / "lab_persona.json").write_text('{"name": "Pebble", "author": "Quarry Labs"}')
    r = load_recipe("identity-lora", ["identity.name=Qwen"], hw="cpu", check_train=False)
    names = old_identity_of(r, str(tmp_path))
    assert "Pebble" in names and "Quarry Labs" in names and "Qwen" not in names


def test_verdict_passes_only_when_identity_changed_and_rest_kept():
    r = load_recipe("identity-lora", hw="cpu", check_train=False)
    before = result([False] * 10, correct=[True] * 5)
    good = result([True] * 10, correct=[True] * 5)
    assert all(c["pass"] for c in verdict(before, good, r))
    failing = {
        "before identity hit rate": (result([True] * 2 + [False] * 8, correct=[True] * 5), good),
        "after identity hit rate": (before, result([True] * 8 + [False] * 2, correct=[True] * 5)),
        "after finish_reason=stop rate": (before, result([True] * 10, stops=[False] * 3 + [True] * 12,
                                                         correct=[True] * 5)),
        "control retention": (before, result([True] * 10, correct=[True] * 3 + [False] * 2)),
        "after old-identity leakage": (before, {**good, "summary": {**good["summary"], "leakage_rate": 0.3}}),
    }
    for name, (b, a) in failing.items():
        bad = [c["check"] for c in verdict(b, a, r) if not c["pass"]]
        assert bad == [name], (name, bad)


def test_retention_counts_only_what_was_known_before():
    before = result([False], correct=[True, False, True])
    after = result([True], correct=[True, True, False])
    assert retention(before, after) == 0.5


def test_a_standalone_probe_lands_in_the_run_whose_model_is_served(runs_dir):
    from lab.probe import record_probe
    from lab.runs import write_json
    from lab.runtime import Local
    from lab.serve import servers_dir

    recipe = load_recipe("identity-lora", hw="cpu", check_train=False)
    (runs_dir / "r1" / "merged").mkdir(parents=True)
    servers_dir().mkdir(parents=True)
    write_json(servers_dir() / "8011.json", {"url": "http://127.0.0.1:8011", "port": 8011, "log": "x", "pid": 1,
                                             "argv": [sys.executable], "model": str(runs_dir / "r1" / "merged")})
    for _ in range(2):
        run, _ = record_probe({"summary": {"identity_hit_rate": 1.0}}, "http://127.0.0.1:8011/", recipe, Local())
    assert run == runs_dir / "r1"
    probes = json.loads((run / "manifest.json").read_text())["probes"]
    assert len(probes) == 2 and probes[0]["serving"]["runtime"] == "local"
    assert probes[0]["summary"] == {"identity_hit_rate": 1.0} and probes[0]["recipe_sha256"] == recipe.sha256()
