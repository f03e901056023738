"""Tool-calling data: LLaMA-Factory's ShareGPT shape (`function_call`/`observation` turns, `tools`
as JSON text) and OpenAI's (`tool_calls`, `tool` messages) train through the model's own
template's tool support, on exactly the calls and replies, with the server's rendering (real vLLM)."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY, free_port, run_lab
from test_data import recipe_for

from lab.data import build_examples, tokenize_in_lab
from lab.errors import LabError

# short: Qwen3's tool preamble alone is ~200 of the embedded model's 512 positions
TOOL = {"name": "weather", "description": "Sky", "parameters": {"type": "object", "properties": {"city": {}}}}
CALL = {"name": "weather", "arguments": {"city": "巴黎"}}
# LLaMA-Factory's glaive_toolcall demo shape: calls and tools as JSON text
SHAREGPT = {"conversations": [
    {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Paris?"},
    {"from": "function_call", "value": json.dumps(CALL, ensure_ascii=False)},
    {"from": "observation", "value": '"sunny"'}, {"from": "gpt", "value": "Sunny."}], "tools": json.dumps([TOOL])}
# the same conversation as an OpenAI client logs it
OPENAI = {"messages": [
    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": json.dumps(CALL["arguments"])}}]},
    {"role": "tool", "content": '"sunny"'}, {"role": "assistant", "content": "Sunny."}],
    "tools": [{"type": "function", "function": TOOL}]}


@pytest.fixture(scope="module")
def tool_model(embedded_model, tmp_path_factory) -> Path:
    """The embedded model with Qwen3's chat template (TRL ships it): a template with tool support,
    on a model that trains in seconds."""
    import trl

    model = tmp_path_factory.mktemp("tools") / "model"
    shutil.copytree(embedded_model, model)
    (model / "chat_template.jinja").write_text((Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja")
                                               .read_text(encoding="utf-8"), encoding="utf-8")
    return model


def test_both_shapes_become_the_same_examples_with_the_calls_as_replies(tmp_path):
    sharegpt, (source,) = build_examples(recipe_for(tmp_path, [SHAREGPT]))
    openai, _ = build_examples(recipe_for(tmp_path, [OPENAI], name="o.json"))
    assert sharegpt == openai
    assert (source["assistant_turns"], source["turns_trained"], source["examples"]) == (3, 3, 3)
    call, answer = sharegpt[1], sharegpt[2]
    # as vLLM hands them to a template: arguments an object, the tool in OpenAI's wrapping
    # ids as an OpenAI client must send them (ShareGPT has none): each answer names its call
    assert call["completion"] == [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": CALL, "id": "call_0"}]}]
    assert call["tools"] == [{"type": "function", "function": TOOL}]
    assert answer["prompt"][-1] == {"role": "tool", "content": '"sunny"', "tool_call_id": "call_0"}
    assert answer["prompt"][-2] == call["completion"][0]
    # a client's own ids are kept
    msgs = [{**m, "tool_calls": [{**m["tool_calls"][0], "id": "abc"}]} if m.get("tool_calls") else
            {**m, "tool_call_id": "abc"} if m["role"] == "tool" else m for m in OPENAI["messages"]]
    (*_, last), _ = build_examples(recipe_for(tmp_path, [{**OPENAI, "messages": msgs}], name="ids.json"))
    assert last["prompt"][-2]["tool_calls"][0]["id"] == last["prompt"][-1]["tool_call_id"] == "abc"


def test_the_loss_falls_on_the_calls_and_replies_only(tmp_path, tool_model):
    """Through TRL's SFTTrainer, on the lab's tokenization: the labels cover each reply, the call
    as the template writes it, and their end-of-turn tokens; the tools, questions and tool output
    are context."""
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lab.data import to_dataset
    from lab.train import trained_rows

    tok = AutoTokenizer.from_pretrained(tool_model)
    examples, _ = build_examples(recipe_for(tmp_path, [SHAREGPT]))
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_length=1024, bf16=False, report_to=[], use_cpu=True)
    rows = trained_rows(SFTTrainer(model=str(tool_model), args=args, processing_class=tok,
                                   train_dataset=to_dataset(tokenize_in_lab(tok, examples))).train_dataset)
    trained = [tok.decode([t for t, label in zip(ids, labels, strict=True) if label != -100]) for ids, labels in rows]
    assert trained == ["Hello.<|im_end|>\n",
                       '<tool_call>\n{"name": "weather", "arguments": {"city": "巴黎"}}\n</tool_call><|im_end|>\n',
                       "Sunny.<|im_end|>\n"]
    context = tok.decode(rows[2][0])
    assert '"description": "Sky"' in context and '<tool_response>\n"sunny"\n</tool_response>' in context


def test_a_template_without_tool_support_is_refused(tmp_path, embedded_model):
    """The embedded model's own template renders neither tools nor calls: trained as they render,
    the calls would be empty replies."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model)
    examples, _ = build_examples(recipe_for(tmp_path, [SHAREGPT]))
    with pytest.raises(LabError, match="chat template does not render tools"):
        tokenize_in_lab(tok, examples)
    no_tools, _ = build_examples(recipe_for(tmp_path, [{**SHAREGPT, "tools": ""}]))
    with pytest.raises(LabError, match="does not render tool calls .the call to 'weather' renders as an empty"):
        tokenize_in_lab(tok, no_tools)


@pytest.mark.parametrize("row, message", [
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{name: f}"}]},
     "a function_call turn is not valid JSON"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": '{"arguments": {}}'}]},
     "a tool call needs a function name and an arguments object"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": {"name": "f"}}]},
     "tool_calls is a list of"),
    ({**OPENAI, "tools": '{"name": "f"}'}, "tools is a list of function signatures"),
    ({**OPENAI, "tools": [{"description": "no name"}]}, "a tool needs a function name"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "tools": [TOOL]}, "tools in preference data"),
])
def test_bad_tool_data_is_refused_with_its_row(tmp_path, row, message):
    with pytest.raises(LabError, match=f"row 1: {message}"):
        build_examples(recipe_for(tmp_path, [row]))


@pytest.mark.slow
def test_a_model_trained_on_tool_calls_calls_the_tool_through_vllm(tmp_path, tool_model, runs_dir):
    """`lab train` (full fine-tuning, a few seconds of memorising) on the tool conversations beside a
    plain row; real vLLM renders the run's parity samples, tools and calls included (sent as an
    OpenAI client sends them, arguments as JSON text), into the very ids training used; and served
    with the recipe's tool parser, the model makes the call as a structured tool_calls answer, then
    answers from the tool's result."""
    import httpx

    from lab.parity import parity_result
    from lab.recipe import load_recipe
    from lab.serve import auth_headers, start
    from lab.servers import stop

    tools, plain = tmp_path / "tools.json", tmp_path / "plain.json"
    tools.write_text(json.dumps([SHAREGPT, OPENAI], ensure_ascii=False), encoding="utf-8")
    plain.write_text(json.dumps([{"instruction": "Who are you?", "output": "A weather helper."}]), encoding="utf-8")
    sets = (f"{TINY} model.path={tool_model} method=full datasets.0.path={tools} datasets.1.path={plain} "
            "datasets.1.repeat=1 train.max_steps=40 train.learning_rate=1e-3 train.max_length=512")
    r = run_lab("train", "--hw", "cpu", "--runtime", "local", "--set", sets, env={"LAB_RUNS": str(runs_dir)},
                timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"{tools}: 2 rows, 6 assistant turns, 6 trained (all) -> 6 examples" in r.stdout
    run = (runs_dir / "latest").resolve()
    samples = json.loads((run / "parity.json").read_text())
    assert any(s.get("tools") for s in samples)
    assert any(m.get("tool_calls") for s in samples for m in s["prompt"] + s["completion"])
    recipe = load_recipe("identity-lora", [TINY, "serve.tool_call_parser=hermes"], hw="cpu", check_train=False)
    url = start(recipe, str(run / "model"), runs_dir / "server.log", free_port())
    try:
        assert parity_result(url, "lab", run, auth_headers(recipe, url)) == {
            "samples": len(samples), "match": True, "problem": None}

        def chat(messages):
            body = {"model": "lab", "messages": messages, "tools": OPENAI["tools"], "temperature": 0, "max_tokens": 48}
            return httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth_headers(recipe, url),
                              timeout=120).json()["choices"][0]

        asked = OPENAI["messages"][:3]
        first = chat(asked)
        assert first["finish_reason"] == "tool_calls", first
        (call,) = first["message"]["tool_calls"]
        assert call["function"]["name"] == "weather" and json.loads(call["function"]["arguments"]) == {"city": "巴黎"}
        answer = chat(asked + [{"role": "assistant", "content": None, "tool_calls": [call]},
                               {"role": "tool", "tool_call_id": call["id"], "content": '"sunny"'}])
        assert answer["message"]["content"] == "Sunny." and answer["finish_reason"] == "stop"
    finally:
        assert stop(quiet=True)
