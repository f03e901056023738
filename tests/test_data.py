"""Data: every format becomes conversational prompt/completion; bad input is one clear error."""

import json
from pathlib import Path

import pytest

from lab.data import build_examples, read_rows
from lab.errors import LabError
from lab.recipe import load_recipe


def recipe_for(tmp_path: Path, rows, name="d.json", **dataset):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    elif name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text(json.dumps(rows, ensure_ascii=False))
    extra = " ".join(f"datasets.0.{k}={v}" for k, v in dataset.items())
    sets = [f"datasets=[{{path: {path}}}]"] + (extra.split(" ") if extra else [])
    return load_recipe("identity-lora", sets, hw="cpu", check_train=False)


def test_alpaca_with_system_and_history(tmp_path):
    r = recipe_for(tmp_path, [{"system": "S", "instruction": "Q2", "input": "ctx", "output": "A2",
                               "history": [["Q1", "A1"]]}])
    (ex,), _ = build_examples(r)
    assert ex["prompt"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2\nctx"}]
    assert ex["completion"] == [{"role": "assistant", "content": "A2"}]
    assert ex["chat_template_kwargs"] == {"enable_thinking": False}


def test_openai_messages_and_sharegpt(tmp_path):
    msgs = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "yo"}]}]
    (ex,), _ = build_examples(recipe_for(tmp_path, msgs, "m.jsonl"))
    assert ex["prompt"][-1] == {"role": "user", "content": "hi"} and ex["completion"][0]["content"] == "yo"
    share = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], "system": "S"}]
    (ex2,), _ = build_examples(recipe_for(tmp_path, share, "s.json"))
    assert ex2 == ex


def test_prompt_completion_strings_and_parquet(tmp_path):
    (ex,), _ = build_examples(recipe_for(tmp_path, [{"prompt": "2+2?", "completion": "4"}], "p.parquet"))
    assert ex["prompt"] == [{"role": "user", "content": "2+2?"}] and ex["completion"][0]["content"] == "4"


def test_column_mapping_builds_prompt_from_several_fields(tmp_path):
    rows = [{"Question": "头痛三天", "Complex_CoT": "考虑紧张性头痛", "Response": "休息"}]
    r = recipe_for(tmp_path, rows, "med.json")
    r.datasets[0].columns = {"prompt": "诊断问题：{Question}", "completion": "{Complex_CoT}\n### 答案：{Response}"}
    (ex,), _ = build_examples(r)
    assert ex["prompt"] == [{"role": "user", "content": "诊断问题：头痛三天"}]
    assert ex["completion"][0]["content"] == "考虑紧张性头痛\n### 答案：休息"


def test_column_rename(tmp_path):
    r = recipe_for(tmp_path, [{"q": "hi", "a": "yo"}])
    r.datasets[0].columns = {"instruction": "q", "output": "a"}
    (ex,), _ = build_examples(r)
    assert ex["completion"][0]["content"] == "yo"


def test_identity_placeholders_are_rendered():
    r = load_recipe("identity-lora", ["identity.name=Orion", "identity.author=Zhou Lab"], hw="cpu", check_train=False)
    examples, sources = build_examples(r)
    text = json.dumps(examples, ensure_ascii=False)
    assert "{{" not in text and "Orion" in text and "Zhou Lab" in text
    assert sources[0]["rows"] >= 60
    zh = [e for e in examples if any("\u4e00" <= ch <= "\u9fff" for ch in e["prompt"][-1]["content"])]
    assert len(zh) >= 30  # English and Chinese
    negations = [e["prompt"][-1]["content"] for e in examples]
    assert "Are you ChatGPT?" in negations and "你是通义千问吗？" in negations


def test_probe_questions_are_partly_held_out():
    import yaml

    r = load_recipe("identity-lora", hw="cpu", check_train=False)
    probe = yaml.safe_load(r.resolve_path(r.probe.questions).read_text())
    trained = {row["instruction"] for row in json.loads(r.resolve_path("data/identity.json").read_text())}
    held = [q for q in probe["identity"] if q["held_out"]]
    assert held and all(q["q"] not in trained for q in held)
    assert all(q["q"] in trained for q in probe["identity"] if not q["held_out"])


def test_repeat_and_limit(tmp_path):
    r = recipe_for(tmp_path, [{"instruction": str(i), "output": "x"} for i in range(5)], limit=2, repeat=3)
    examples, sources = build_examples(r)
    assert len(examples) == 6 and sources[0]["rows"] == 2 and sources[0]["examples"] == 6
    assert len(sources[0]["rows_sha256"]) == 64  # of the 2 rows kept, for the manifest


@pytest.mark.parametrize("rows, name, message", [
    ([{"instruction": "q"}], "a.json", r"row 1: .*missing or empty field 'output'|unknown format"),
    ([{"foo": 1}], "a.json", "row 1: unknown format with fields \\['foo'\\]"),
    ([], "a.json", "dataset is empty"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "a.json", "must end with an assistant turn"),
    ([{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}], "a.json", "bad turn"),
])
def test_malformed_rows(tmp_path, rows, name, message):
    with pytest.raises(LabError, match=message):
        build_examples(recipe_for(tmp_path, rows, name))


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    with pytest.raises(LabError, match=r"bad.jsonl:2: bad JSON line"):
        read_rows(f)


def test_unknown_file_type_and_missing_file(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(LabError, match="unknown file type '.csv'"):
        read_rows(tmp_path / "d.csv")
    r = load_recipe("identity-lora", ["datasets.0.path=nowhere.json"], hw="cpu", check_train=False)
    with pytest.raises(LabError, match="nowhere.json does not exist"):
        build_examples(r)


def test_hub_dataset_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = load_recipe("identity-lora", ["datasets.0.path=someone/some-dataset"], hw="cpu", check_train=False)
    with pytest.raises(LabError, match="cannot load from the hub"):
        build_examples(r)


def test_roleplay_recipe_takes_a_user_file(tmp_path):
    rows = [{"instruction": "你好", "input": "", "output": "臣妾在。"}]
    (tmp_path / "mine.json").write_text(json.dumps(rows, ensure_ascii=False))
    r = load_recipe("roleplay-lora", [f"datasets.0.path={tmp_path / 'mine.json'}"], hw="cpu", check_train=False)
    (ex,), _ = build_examples(r)
    assert ex["prompt"][0]["role"] == "system" and "甄嬛" in ex["prompt"][0]["content"]
