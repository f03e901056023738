"""Probe scoring and the pass/fail verdict, on answers written out here (no server needed)."""

import json
import sys

from lab.probe import leaked_names, old_identity_of, retention, similarity, verdict
from lab.recipe import load_recipe


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
    from lab.serve import state_file

    recipe = load_recipe("identity-lora", hw="cpu", check_train=False)
    (runs_dir / "r1" / "merged").mkdir(parents=True)
    write_json(state_file(), {"url": "http://127.0.0.1:8011", "log": "x", "pid": 1,
                              "argv": [sys.executable], "model": str(runs_dir / "r1" / "merged")})
    for _ in range(2):
        run, _ = record_probe({"summary": {"identity_hit_rate": 1.0}}, "http://127.0.0.1:8011/", recipe, Local())
    assert run == runs_dir / "r1"
    probes = json.loads((run / "manifest.json").read_text())["probes"]
    assert len(probes) == 2 and probes[0]["serving"]["runtime"] == "local"
    assert probes[0]["summary"] == {"identity_hit_rate": 1.0} and probes[0]["recipe_sha256"] == recipe.sha256()
