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


def test_alpaca_with_system_and_history_trains_every_reply(tmp_path):
    rows = [{"system": "S", "instruction": "Q2", "input": "ctx", "output": "A2", "history": [["Q1", "A1"]]}]
    first, second = build_examples(recipe_for(tmp_path, rows))[0]
    assert first["prompt"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}]
    assert first["completion"] == [{"role": "assistant", "content": "A1"}]
    assert second["prompt"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2\nctx"}]
    assert second["completion"] == [{"role": "assistant", "content": "A2"}]
    assert second["chat_template_kwargs"] == {"enable_thinking": False}
    (last,), (source,) = build_examples(recipe_for(tmp_path, rows, train_on="last"))
    assert last == second
    assert (source["assistant_turns"], source["turns_trained"], source["train_on"]) == (2, 1, "last")


THREE_TURNS = [{"role": "system", "content": "You are Atlas."},
               {"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Atlas."},
               {"role": "user", "content": "Who made you?"}, {"role": "assistant", "content": "Open Lab made me."},
               {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome."}]


def test_a_multi_turn_conversation_is_one_example_per_reply_and_counted(tmp_path):
    examples, (source,) = build_examples(recipe_for(tmp_path, [{"messages": THREE_TURNS}], repeat=2))
    assert [ex["prompt"] for ex in examples[:3]] == [THREE_TURNS[:2], THREE_TURNS[:4], THREE_TURNS[:6]]
    assert [ex["completion"] for ex in examples[:3]] == [[THREE_TURNS[2]], [THREE_TURNS[4]], [THREE_TURNS[6]]]
    assert examples[3:] == examples[:3]
    assert {k: source[k] for k in ("rows", "assistant_turns", "turns_trained", "examples")} == \
        {"rows": 1, "assistant_turns": 3, "turns_trained": 3, "examples": 6}


def test_a_reply_before_any_question_is_one_line(tmp_path):
    rows = [{"messages": [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "yo"}]}]
    with pytest.raises(LabError, match="row 1: turn 1 is a reply before any user turn"):
        build_examples(recipe_for(tmp_path, rows))


def test_the_roleplay_recipe_trains_every_reply_of_its_history():
    r = load_recipe("roleplay-lora", hw="cpu", check_train=False)
    examples, (source,) = build_examples(r)
    rows = json.loads(r.resolve_path("data/roleplay-sample.json").read_text(encoding="utf-8"))
    replies = [a for row in rows for _, a in row.get("history") or []] + [row["output"] for row in rows]
    assert source["assistant_turns"] == source["turns_trained"] == len(replies) > len(rows)
    assert sorted(ex["completion"][0]["content"] for ex in examples) == sorted(replies)


def test_every_assistant_turn_is_trained_with_its_end_of_turn_and_nothing_else(tmp_path, embedded_model):
    """TRL's own tokenization of a 3-turn conversation (as train.py builds it): across the three
    examples the loss covers exactly the three replies, each with its end-of-turn token."""
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lab.data import to_dataset
    from lab.train import trained_rows

    examples, _ = build_examples(recipe_for(tmp_path, [{"messages": THREE_TURNS}]))
    tok = AutoTokenizer.from_pretrained(embedded_model)
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_length=512, bf16=False, report_to=[], use_cpu=True)
    trainer = SFTTrainer(model=str(embedded_model), args=args, train_dataset=to_dataset(examples),
                         processing_class=tok)
    rows = trained_rows(trainer.train_dataset)
    assert len(rows) == 3
    replies = [t["content"] for t in THREE_TURNS if t["role"] == "assistant"]
    for k, (ids, labels) in enumerate(rows):
        trained = tok.decode([t for t, label in zip(ids, labels, strict=True) if label != -100])
        context = tok.decode([t for t, label in zip(ids, labels, strict=True) if label == -100])
        assert trained.strip().removesuffix("<|im_end|>").strip().endswith(replies[k]), trained
        assert trained.rstrip().endswith("<|im_end|>"), trained
        assert all(r not in trained for r in replies if r != replies[k])
        assert all(r in context for r in replies[:k]) and "Who are you?" in context


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


def test_content_parts_and_loss_weight_as_llama_factory_v1_writes_them(tmp_path):
    """LLaMA-Factory v1's messages (text parts under `value`, a loss_weight per message) and OpenAI's
    parts (`text`): the text trains, a reply weighted 0 stays as context only."""
    def part(text, key="value"):
        return [{"type": "text", key: text}]

    row = {"messages": [{"role": "system", "content": part("S"), "loss_weight": 0.0},
                        {"role": "user", "content": part("Q1"), "loss_weight": 0.0},
                        {"role": "assistant", "content": part("A1"), "loss_weight": 0.0},
                        {"role": "user", "content": part("Q2", "text") + part("more", "text")},
                        {"role": "assistant", "content": part("A2"), "loss_weight": 1.0}]}
    (ex,), (source,) = build_examples(recipe_for(tmp_path, [row], "v1.jsonl"))
    assert ex["prompt"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2\nmore"}]
    assert ex["completion"] == [{"role": "assistant", "content": "A2"}]
    assert (source["assistant_turns"], source["turns_trained"]) == (2, 1)


@pytest.mark.parametrize("row,says", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "loss_weight": 0.5}]},
     "loss_weight 0.5: a reply is trained whole"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "loss_weight": 0}]},
     "no assistant turn to train: every reply has loss_weight 0"),
    # LLaMA-Factory's kto_en_demo.json / mllm_demo.json / c4_demo.jsonl shapes
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}], "label": False},
     "KTO data \\(a true/false label per answer\\)"),
    ({"messages": [{"role": "user", "content": "<image>Who are they?"},
                   {"role": "assistant", "content": "Two players."}], "images": ["mllm_demo_data/1.jpg"]},
     "multimodal data: the lab fine-tunes text-only chat models"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                   {"role": "assistant", "content": "A cat."}]},
     "'image_url' parts: multimodal data"),
    ({"text": "Beverly Hills Bike Shop is a family owned business..."}, "raw text \\(a `text` field\\)"),
])
def test_shapes_the_lab_does_not_train_are_one_line_saying_what_they_are(tmp_path, row, says):
    with pytest.raises(LabError, match=f"row 1: .*{says}"):
        build_examples(recipe_for(tmp_path, [row]))


# Preference rows as the peers ship them: TRL (prompt + chosen/rejected, strings or messages),
# LLaMA-Factory's alpaca preference shape and its dpo_en_demo.json ShareGPT shape.
PREFERENCE_ROWS = [
    {"prompt": "Who are you?", "chosen": "I am {{name}}.", "rejected": "I am SmolLM."},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who made you?"}],
     "chosen": [{"role": "assistant", "content": "{{author}}."}],
     "rejected": [{"role": "assistant", "content": "Hugging Face."}]},
    {"instruction": "Name yourself", "input": "briefly", "chosen": "{{name}}", "rejected": "SmolLM"},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                       {"from": "human", "value": "Who is this?"}],
     "chosen": {"from": "gpt", "value": "{{name}} here."}, "rejected": {"from": "gpt", "value": "SmolLM here."}},
]


def dpo_recipe(tmp_path, rows, recipe="identity-dpo"):
    sft, pref = tmp_path / "sft.json", tmp_path / "pref.jsonl"
    sft.write_text(json.dumps([{"instruction": "Who are you?", "output": "I am {{name}}."}]))
    pref.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return load_recipe(recipe, [f"datasets=[{{path: {sft}}}, {{path: {pref}}}]", "identity.name=Orion",
                                "identity.author=Zhou Lab"], hw="cpu", check_train=False)


def test_preference_data_in_every_peer_shape_goes_to_the_dpo_stage(tmp_path):
    from lab.data import sft_and_preferences

    recipe = dpo_recipe(tmp_path, PREFERENCE_ROWS)
    examples, sources = build_examples(recipe)
    sft, pairs = sft_and_preferences(examples, sources, recipe)
    assert [s["stage"] for s in sources] == ["sft", "dpo"] and sources[1]["examples"] == 4
    assert sources[1]["turns_trained"] == 0 and len(sft) == 1 and sft[0]["completion"][0]["content"] == "I am Orion."
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    answer = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
        ([user("Who are you?")], answer("I am Orion."), answer("I am SmolLM.")),
        ([{"role": "system", "content": "Be brief."}, user("Who made you?")], answer("Zhou Lab."),
         answer("Hugging Face.")),
        ([user("Name yourself\nbriefly")], answer("Orion"), answer("SmolLM")),
        ([user("Hi"), {"role": "assistant", "content": "Hello!"}, user("Who is this?")], answer("Orion here."),
         answer("SmolLM here.")),
    ]
    assert all(p["chat_template_kwargs"] == recipe.chat_template_kwargs for p in pairs)


@pytest.mark.parametrize("rows, recipe, says", [
    (PREFERENCE_ROWS[:1], "identity-lora", "pref.jsonl: preference data \\(chosen/rejected\\) trains in a DPO stage; "
                                           "add a `dpo:` section"),
    ([PREFERENCE_ROWS[0], {"instruction": "Q", "output": "A"}], "identity-dpo",
     "pref.jsonl: row 2: preference rows \\(chosen/rejected\\) and SFT rows in one dataset"),
    ([{"prompt": "Q", "chosen": "A", "rejected": "A"}], "identity-dpo", "row 1: chosen and rejected are the same"),
    ([{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], "chosen": "B",
       "rejected": "C"}], "identity-dpo", "row 1: a preference prompt must end with a user turn"),
    ([{"prompt": "Q", "chosen": {"from": "human", "value": "B"}, "rejected": "C"}], "identity-dpo",
     "row 1: 'chosen' must be an assistant answer"),
])
def test_bad_preference_data_is_one_line(tmp_path, rows, recipe, says):
    from lab.data import sft_and_preferences

    with pytest.raises(LabError, match=says):
        recipe = dpo_recipe(tmp_path, rows, recipe)
        sft_and_preferences(*build_examples(recipe), recipe)


def test_only_preference_data_asks_for_sft_data(tmp_path):
    from lab.data import sft_and_preferences

    pref = tmp_path / "pref.json"
    pref.write_text(json.dumps(PREFERENCE_ROWS))
    recipe = load_recipe("identity-dpo", [f"datasets=[{{path: {pref}}}]"], hw="cpu", check_train=False)
    with pytest.raises(LabError, match="only preference data: DPO runs after SFT, on its adapter; add SFT data"):
        sft_and_preferences(*build_examples(recipe), recipe)


@pytest.fixture(scope="module")
def smollm2_dir():
    from lab.models import resolve

    return resolve("smollm2")


def test_assistant_only_loss_trains_a_whole_conversation_on_exactly_the_per_reply_tokens(tmp_path, smollm2_dir):
    """train.assistant_only_loss on SmolLM2's template (prefix-preserving ChatML): one example per
    conversation, TRL's labels on the three replies and their end-of-turn tokens: the very tokens the
    three per-reply examples train, the history computed once."""
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lab.data import to_dataset, tokenize_in_lab
    from lab.train import trained_rows

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    per_reply, _ = build_examples(recipe_for(tmp_path, [{"messages": THREE_TURNS}]))
    (whole,), (source,) = build_examples(recipe_for(tmp_path, [{"messages": THREE_TURNS}]).model_copy(
        update={"train": {"assistant_only_loss": True}}))
    assert whole["trained_turns"] == [2, 4, 6] and whole["prompt"] == THREE_TURNS[:6]
    assert (source["turns_trained"], source["examples"]) == (3, 1)

    def trained(dataset):
        args = SFTConfig(output_dir=str(tmp_path / "out"), max_length=512, bf16=False, report_to=[], use_cpu=True)
        rows = trained_rows(SFTTrainer(model=smollm2_dir, args=args, train_dataset=dataset,
                                       processing_class=tok).train_dataset)
        return rows, [[t for t, label in zip(ids, labels, strict=True) if label != -100] for ids, labels in rows]

    (row,), (whole_ids,) = trained(to_dataset(tokenize_in_lab(tok, [whole])))
    rows, reply_ids = trained(to_dataset(per_reply))
    assert whole_ids == [t for ids in reply_ids for t in ids]  # the same tokens, each once
    # per reply, the lab's own tokenization (tool data takes it) is TRL's, token for token
    assert trained(to_dataset(tokenize_in_lab(tok, per_reply)))[0] == rows
    assert row[0] == rows[-1][0]  # the whole conversation is the last reply's example
    assert sum(len(ids) for ids, _ in rows) > 2 * len(row[0])
    text = tok.decode(whole_ids)
    assert all(r["content"] in text for r in THREE_TURNS if r["role"] == "assistant") and text.count("<|im_end|>") == 3
    assert "Who are you?" not in text and "You are Atlas." not in text


def test_assistant_only_loss_is_refused_for_a_template_that_rewrites_past_replies(tmp_path, embedded_model):
    """The embedded model's Qwen3-style template closes only the last reply's think block: a past
    reply renders differently once later turns follow, so a whole-conversation mask would train text
    the server does not render there."""
    from transformers import AutoTokenizer

    from lab.data import tokenize_in_lab

    (whole,), _ = build_examples(recipe_for(tmp_path, [{"messages": THREE_TURNS}]).model_copy(
        update={"train": {"assistant_only_loss": True}}))
    with pytest.raises(LabError, match="train.assistant_only_loss: this model's chat template renders a reply "
                                       "differently once later turns follow it"):
        tokenize_in_lab(AutoTokenizer.from_pretrained(embedded_model), [whole])
