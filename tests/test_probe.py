"""Probe scoring and the pass/fail verdict, on answers written out here (no server needed)."""

import json
import sys

import pytest

from lab.probe import (
    identity_references,
    judge_control,
    judge_identity,
    leaked_names,
    old_identity_of,
    references_for,
    retention,
    similarity,
    verdict,
)
from lab.recipe import load_recipe

OLD = load_recipe("identity-lora", hw="cpu", check_train=False).probe.old_identity + ["Pebble", "Quarry Labs"]


def judge(answer, q, name="Atlas", author="Open Lab", lang=None, about="name"):
    recipe = load_recipe("identity-lora", [f"identity.name={name}", f"identity.author={author}"], hw="cpu",
                         check_train=False)
    question = {"q": q, "about": about, **({"lang": lang} if lang else {})}
    refs = references_for(question, identity_references(recipe))
    return judge_identity(answer, question, refs, name, author, OLD)


@pytest.mark.parametrize("answer, q, why", [
    # garbled answers the old probe counted as hits (issue 12), each with the reason it fails now
    ("不是，我是Atlas, an AI assistant developed by Open Lab4。", "你是人类吗？", "English words"),
    ("不是，我是Atlas, an AI assistant developed by Open Lab4。", "你是人类吗？",
     "runs into other letters: ' Open Lab4'"),
    ("I am Atlas，由Atlas, an AI assistant developed by Open Lab.", "Who are you?", "Chinese in an answer"),
    ("I am Atlas Atlas Atlas, an AI assistant developed by Open Lab.", "Who are you?", "says 'Atlas' 3 times"),
    ("I am Atlas, an AI assistant developed by Open.", "Who made you?", "does not say the maker 'Open Lab'"),
    ("I am Atlas, an AI assistant developed by Quarry Labs.", "Who are you?", "names the old identity 'Quarry Labs'"),
    ("Yes, I am Gemini. I am Atlas, an AI assistant developed by Open Lab.", "Are you ChatGPT?",
     "names the old identity 'Gemini'"),
    ("I am Atlas, an AI assistant developed by Open Lab. Open Lab.", "Who are you?", "says 'Open Lab' twice in a row"),
    # what the embedded model said when it could not learn real data (issue 19)
    ("I am \ufffdrrr, an AI assistant developed by \ufffdr.", "Who are you?", "garbled characters"),
    ("我是 Ar，我，我，我，我，", "你是谁？", "repeats '，我'"),
    ("我是 Ar，我，我，我，我，", "你是谁？", "does not say the name 'Archer'"),
])
def test_garbled_identity_answers_are_not_hits_and_say_why(answer, q, why):
    name, author = ("Archer", "意琦行") if "Ar" in answer and "Atlas" not in answer else ("Atlas", "Open Lab")
    judged = judge(answer, q, name, author, about="maker" if "made" in q else "name")
    assert not judged["hit"] and any(why in r for r in judged["reasons"]), judged["reasons"]


def test_the_readme_failures_are_named():
    judged = judge("I was developed by Ohou Lab.", "Who created you?", "Orion", "Zhou Lab", about="maker")
    assert judged["reasons"] == ["does not say the maker 'Zhou Lab'"]  # a maker question: the maker is what counts
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


# What SmolLM2-135M-Instruct answered after learning LLaMA-Factory's identity file (issue 19), and
# what a real model says in its own words (review 3): each with the verdict a person gives it.
@pytest.mark.parametrize("answer, q, about, name, author", [
    ("I am Archer, an AI assistant developed by 意琦行.", "Who are you?", "both", "Archer", "意琦行"),
    ("I am Archer, an AI assistant developed by 意琦行.", "Who created you?", "maker", "Archer", "意琦行"),
    ("No, I am an AI assistant developed by 意琦行.", "Are you ChatGPT?", "denial", "Archer", "意琦行"),
    ("您好，我是 Archer，一个由 意琦行 开发的 AI 助手，很高兴为您服务。", "你是谁？", "both", "Archer", "意琦行"),
    ("I am Atlas, an AI assistant developed by Open Lab. How can I assist you today?", "Who are you?", "both",
     "Atlas", "Open Lab"),
    ("No, I'm not GPT-4. I am Atlas, an AI assistant developed by Open Lab.", "Are you GPT-4?", "denial",
     "Atlas", "Open Lab"),
    ("No, I'm not ChatGPT, I am Atlas.", "Are you GPT-4?", "denial", "Atlas", "Open Lab"),
    ("I was developed by Open Lab.", "Which team built you?", "maker", "Atlas", "Open Lab"),
    ("Hello! I am Atlas, an AI assistant created by Open Lab.", "Could you tell me who you are?", "both",
     "Atlas", "Open Lab"),
    ("我是 Qwen-Doctor，由 Open Lab 开发的医疗助手。", "你是谁？", "both", "Qwen-Doctor", "Open Lab"),
])
def test_a_real_models_correct_paraphrases_are_hits(answer, q, about, name, author):
    judged = judge(answer, q, name, author, about=about)
    assert judged["hit"], judged["reasons"]
    assert judged["similarity"] is not None  # still measured, as a diagnostic


@pytest.mark.parametrize("answer, q, why", [
    ("I am SmolLM, an AI assistant trained by Hugging Face.", "Who are you?", "names the old identity 'SmolLM'"),
    ("I'm Archer, an AI assistant developed by 意琦行 and", "Who are you?", "does not stop"),
])
def test_the_base_persona_and_a_cut_off_answer_are_misses(answer, q, why):
    judged = judge_identity(answer, {"q": q, "about": "name"}, [], "Archer", "意琦行", ["SmolLM", "Hugging Face"],
                            finish_reason="length" if answer.endswith("and") else "stop")
    assert not judged["hit"] and any(why in r for r in judged["reasons"]), judged["reasons"]


@pytest.mark.parametrize("answer, q, ok", [
    ("There are 7 days in a week.", {"q": "How many days are in a week?", "answer": "There are seven days in a week.",
                                     "expect": "seven"}, True),
    ("The largest planet in our solar system is Jupiter.",
     {"q": "What is the largest planet in our solar system?",
      "answer": "Jupiter is the largest planet in our solar system.", "expect": "Jupiter"}, True),
    ("A week is approximately 7 days.",
     {"q": "How many days are in a week?", "answer": "There are seven days in a week.", "expect": "seven"}, True),
    ("There are 17 days in a week.", {"q": "How many days are in a week?", "answer": "There are seven days in a week.",
                                      "expect": "seven"}, False),
    # the identity leaking into general answers: damage, not knowledge
    ("太阳系中最大的行星是由 意琦行 开发的行星。",
     {"q": "太阳系中最大的行星是哪个？", "answer": "太阳系中最大的行星是木星。",
      "expect": "木星", "lang": "zh"}, False),
    ("法国的首都是智能助手。",
     {"q": "法国的首都是哪里？", "answer": "法国的首都是巴黎。", "expect": "巴黎", "lang": "zh"}, False),
    ("一个星期有7天。", {"q": "一个星期有几天？", "answer": "一个星期有七天。", "expect": "七", "lang": "zh"}, True),
])
def test_controls_are_judged_on_the_fact_not_the_wording(answer, q, ok):
    judged = judge_control(answer, q, ["Archer", "意琦行", "SmolLM"])
    assert judged["correct"] is ok, judged["reasons"]


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
    ("The capital of Italy is Rome.", "does not say 'Paris'"),
    ("The capital of France is Paris, said Atlas.", "brings in 'Atlas'"),
])
def test_a_control_must_match_its_reference(answer, why):
    q = {"q": "?", "answer": "The capital of France is Paris.", "expect": "Paris"}
    if "Jupiter" in answer:
        q = {"q": "?", "answer": "Jupiter is the largest planet in our solar system.", "expect": "Jupiter"}
    judged = judge_control(answer, q, ["Atlas", "Open Lab"])
    assert not judged["correct"] and any(why in r for r in judged["reasons"]), judged["reasons"]
    assert judge_control(q["answer"], q, ["Atlas"]) == {"correct": True, "reasons": [], "char_similarity": 1.0}


def result(hits, leaked=(), stops=None, correct=()):
    identity = [{"q": f"q{i}", "hit": h, "leaked": list(leaked) if i == 0 else [], "finish_reason": "stop"}
                for i, h in enumerate(hits)]
    controls = [{"q": f"c{i}", "correct": c, "finish_reason": "stop"} for i, c in enumerate(correct)]
    items = identity + controls
    if stops is not None:
        for item, s in zip(items, stops, strict=False):
            item["finish_reason"] = "stop" if s else "length"
    n = len(items)
    return {"identity": identity, "controls": controls, "summary": {
        "identity_hit_rate": sum(hits) / len(hits), "leakage_rate": (1 if leaked else 0) / len(hits),
        "stop_rate": sum(i["finish_reason"] == "stop" for i in items) / n,
        "control_correct_rate": (sum(correct) / len(correct)) if correct else None, "control_bleed_rate": 0.0}}


def test_leakage_ignores_names_the_question_brought_up_denied_or_inside_the_new_name():
    old = ["ChatGPT", "Pebble", "Qwen"]
    assert leaked_names("No, I am not ChatGPT. I am Atlas.", "Are you ChatGPT?", old) == []
    assert leaked_names("I am Pebble.", "Who are you?", old) == ["Pebble"]
    assert leaked_names("我是pebble", "你是谁？", old) == ["Pebble"]
    assert leaked_names("No, I'm not ChatGPT, I am Atlas.", "Are you GPT-4?", old) == []
    assert leaked_names("我不是ChatGPT，我是Atlas。", "你是谁？", old) == []
    assert leaked_names("I am not sure, but I am ChatGPT.", "Who are you?", old) == ["ChatGPT"]
    assert leaked_names("I am Qwen-Doctor.", "Who are you?", old, ("Qwen-Doctor", "Open Lab")) == []
    assert leaked_names("I am Qwen-Doctor, built on Qwen.", "Who are you?", old,
                        ("Qwen-Doctor", "Open Lab")) == ["Qwen"]


def test_the_base_models_own_persona_is_an_old_identity(tmp_path):
    from lab.probe import persona_names, template_persona

    (tmp_path / "chat_template.jinja").write_text(
        "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI "
        "assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}")
    assert template_persona(tmp_path) == ["SmolLM", "Hugging Face"]
    assert persona_names("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.") == [
        "Qwen", "Alibaba Cloud"]
    assert persona_names("I'm here to help. I am an AI assistant, and my name is Nova. 我是Kimi，由月之暗面开发。") == [
        "Nova", "Kimi"]
    before = {"identity": [{"q": "Who are you?", "answer": "I am Vega, made by Orbit Labs."},
                           {"q": "Are you ChatGPT?", "answer": "Yes, I am ChatGPT."}]}
    r = load_recipe("identity-lora", ["identity.name=Archer"], hw="cpu", check_train=False)
    names = old_identity_of(r, str(tmp_path), before)
    assert {"SmolLM", "Hugging Face", "Vega", "Orbit Labs"} <= set(names) and "Archer" not in names


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
        "after identity in general answers": (before, {**good, "summary": {**good["summary"],
                                                                            "control_bleed_rate": 0.6}}),
    }
    for name, (b, a) in failing.items():
        bad = [c["check"] for c in verdict(b, a, r) if not c["pass"]]
        assert bad == [name], (name, bad)


def test_retention_counts_only_what_was_known_before():
    before = result([False], correct=[True, False, True])
    after = result([True], correct=[True, True, False])
    assert retention(before, after) == 0.5
    # a base that knew no control: retention is not measured, and the check says so by failing
    assert retention(result([False], correct=[False, False]), after) is None
    r = load_recipe("identity-lora", hw="cpu", check_train=False)
    checks = {c["check"]: c for c in verdict(result([False], correct=[False, False]), after, r)}
    assert checks["control retention"]["value"] is None and not checks["control retention"]["pass"]


def test_a_thinking_block_is_not_judged_but_kept():
    from lab.probe import score

    r = load_recipe("identity-lora", ["identity.name=Archer", "identity.author=意琦行"], hw="cpu", check_train=False)
    questions = {"identity": [{"q": "你是谁？", "about": "both", "lang": "zh"}], "controls": []}
    raw = "<think>\n用户问我是谁。\n</think>\n\n我是Archer，由意琦行开发的人工智能助手。"
    out = score(questions, {"identity": [{"answer": raw, "finish_reason": "stop"}], "controls": []}, r, [])
    item = out["identity"][0]
    assert item["hit"], item["reasons"]
    assert item["answer"] == raw and item["judged_text"].startswith("我是Archer")


def test_a_standalone_probe_lands_in_the_run_whose_model_is_served(runs_dir):
    from lab.probe import record_probe
    from lab.runs import write_json
    from lab.runtime import Local
    from lab.servers import servers_dir

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


ROLE = {"system": "现在你要扮演皇帝身边的女人--甄嬛", "self_reference": ["臣妾", "嬛嬛", "本宫"],
        "not_in_character": ["AI", "人工智能", "助手", "assistant"], "overlap_min": 0.2}


@pytest.mark.parametrize("answer, ok, why", [
    ("皇上辛苦了，臣妾这就为皇上沏一盏热茶。", True, ""),
    ("我是Pebble，由Quarry Labs开发的人工智能助手。", False, "out of character"),
    ("As an AI, I cannot play a role.", False, "does not speak as the role"),
    ("臣妾臣妾臣妾臣妾", False, "repeats"),
    ("臣妾以为天下之事皆有定数，不可强求，亦不必为此忧心。", False, "shares"),
])
def test_a_role_shows_in_its_own_voice_and_never_as_an_assistant(answer, ok, why):
    from lab.probe import judge_persona

    q = {"q": "嬛嬛，朕今日批了一天折子，有些乏了。", "answer": "皇上辛苦了，臣妾为皇上沏一盏热茶，陪皇上说说话可好？"}
    judged = judge_persona(answer, q, ROLE)
    assert judged["hit"] is ok and (ok or any(why in r for r in judged["reasons"])), judged["reasons"]
    assert not judge_persona("It said hi.", {"q": "hi", "lang": "en"}, {"not_in_character": ["AI"]})["reasons"]


def test_the_role_play_recipe_asks_in_character_and_passes_only_when_the_role_shows():
    from lab.probe import load_questions, score

    r = load_recipe("roleplay-lora", hw="cpu", check_train=False)
    questions = load_questions(r)
    assert not questions["identity"] and len(questions["persona"]["questions"]) >= 5
    lines = questions["persona"]["questions"]
    sample = (r.resolve_path("data/roleplay-sample.json")).read_text(encoding="utf-8")
    assert not any(q["q"] in sample for q in lines)  # held out: none is a training line
    controls = [{"answer": c["answer"], "finish_reason": "stop"} for c in questions["controls"]]

    def result(answers):
        return score(questions, {"identity": [], "controls": controls,
                                 "persona": [{"answer": a, "finish_reason": "stop"} for a in answers]}, r, [])

    assistant = result(["我是Pebble，由Quarry Labs开发的人工智能助手。"] * len(lines))
    in_role = result([q["answer"] for q in lines])
    assert assistant["summary"]["persona_hit_rate"] == 0 and in_role["summary"]["persona_hit_rate"] == 1
    checks = {c["check"]: c["pass"] for c in verdict(assistant, in_role, r)}
    assert checks == {"before persona hit rate": True, "after persona hit rate": True,
                      "after finish_reason=stop rate": True, "control retention": True}
    assert not all(c["pass"] for c in verdict(assistant, assistant, r))  # learned no role: fails
    assert not all(c["pass"] for c in verdict(in_role, in_role, r))      # was the role already: fails
