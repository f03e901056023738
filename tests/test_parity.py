"""Template parity samples (lab/train.py parity_sample) from TRL's own tokenization of real data."""

import pytest

from lab.fixture.corpus import _example
from lab.train import parity_sample, trained_rows

LONG = "The answer goes on and on, " * 12  # far past the tiny max_length below
EXAMPLES = [_example("Tell me a long story.", LONG), _example("Who are you?", "I am Orion."),
            _example("Tell me another long story.", LONG + "the end."), _example("你是谁？", "我是Orion。"),
            _example("What is 2+2?", "4."), _example("What is the capital of France?", "Paris.")]
MAX_LENGTH = 40


def _rows(model_dir, tmp_path, max_length, packing=False, examples=EXAMPLES):
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lab.data import to_dataset

    tok = AutoTokenizer.from_pretrained(model_dir)
    args = SFTConfig(output_dir=str(tmp_path), max_length=max_length, packing=packing, use_cpu=True,
                     report_to="none")
    trainer = SFTTrainer(model=str(model_dir), args=args, train_dataset=to_dataset(examples), processing_class=tok)
    return trained_rows(trainer.train_dataset), tok


def _served(tok, ex) -> list[int]:
    """What vLLM's /tokenize renders for the whole conversation: the chat template, untruncated."""
    ids = tok.apply_chat_template(ex["prompt"] + ex["completion"], tokenize=True, **ex["chat_template_kwargs"])
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("packing", [False, True])
def test_truncated_examples_are_not_parity_samples(embedded_model, tmp_path, packing):
    rows, tok = _rows(embedded_model, tmp_path, MAX_LENGTH, packing)
    assert any(len(ids) == MAX_LENGTH for ids, _ in rows)  # TRL did cut the long ones
    samples = parity_sample(rows, EXAMPLES, tok, packed=packing, max_length=MAX_LENGTH)
    # the first four whole conversations, the long ones skipped, each exactly what the server renders
    assert [s["prompt"][-1]["content"] for s in samples] == ["Who are you?", "你是谁？", "What is 2+2?",
                                                             "What is the capital of France?"]
    for s in samples:
        assert len(s["input_ids"]) < MAX_LENGTH and s["input_ids"] == _served(tok, s)
        assert s["prompt_ids"] == s["input_ids"][:len(s["prompt_ids"])]


def test_without_the_length_check_a_truncated_row_looks_like_template_drift(embedded_model, tmp_path):
    """Why the check exists: the cut row differs from the server's rendering of the same conversation."""
    rows, tok = _rows(embedded_model, tmp_path, MAX_LENGTH)
    first = parity_sample(rows, EXAMPLES, tok)[0]
    assert first["prompt"][-1]["content"] == "Tell me a long story." and first["input_ids"] != _served(tok, first)


def test_only_truncated_examples_give_no_sample(embedded_model, tmp_path):
    long = [EXAMPLES[0], EXAMPLES[2]]
    rows, tok = _rows(embedded_model, tmp_path, MAX_LENGTH, examples=long)
    assert parity_sample(rows, long, tok, max_length=MAX_LENGTH) == []


def test_renderings_are_compared_with_the_trained_ids_and_the_servers_defaults(embedded_model, tmp_path):
    """compare_renderings, with the model's own chat template rendering as a server renders it: request
    kwargs over the server's defaults (vLLM's --default-chat-template-kwargs). The HTTP side against
    real vLLM: tests/test_e2e.py."""
    from lab.parity import compare_renderings

    rows, tok = _rows(embedded_model, tmp_path, MAX_LENGTH)
    samples = parity_sample(rows, EXAMPLES, tok, max_length=MAX_LENGTH)

    def server(defaults):
        def render(messages, kwargs, generation_prompt, tools):
            text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt,
                                           tokenize=False, **{**defaults, **kwargs})
            return tok(text, add_special_tokens=False)["input_ids"]
        return render

    assert compare_renderings(samples, server({"enable_thinking": False})) == \
        {"samples": 4, "match": True, "problem": None}
    # the requests carry training's kwargs, but a plain client gets the server's defaults: thinking on
    drift = compare_renderings(samples, server({}))
    assert drift["match"] is False and drift["problem"].startswith(
        "template drift: with its default chat_template_kwargs the server renders prompt 0 unlike training")

    def kwargs_ignored(messages, kwargs, generation_prompt, tools):  # a template without enable_thinking
        return server({})(messages, {}, generation_prompt, tools)

    assert compare_renderings(samples, kwargs_ignored)["problem"].startswith(
        "template drift: training rendered prompt 0 as")
    assert compare_renderings([], server({})) == {"samples": 0, "match": None, "problem": None}
