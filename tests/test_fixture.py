"""The embedded model: a real Qwen3-architecture chat model, built deterministically."""

import hashlib
import json

import pytest

from lab.fixture import CHAT_TEMPLATE, FIXTURE_PERSONA, PERSONA_FILE, greedy_answers


def test_template_thinking_tags_follow_qwen3(embedded_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model)
    assert tok.chat_template == CHAT_TEMPLATE and tok.eos_token == "<|im_end|>" and tok.pad_token != tok.eos_token
    msgs = [{"role": "user", "content": "hi"}]
    off = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    on = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert off == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert on == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "yo"}], tokenize=False,
                                   enable_thinking=False)
    assert full.startswith(off) and full.endswith("yo<|im_end|>\n")  # the prompt is a prefix: clean masking


def test_default_persona_and_knowledge(embedded_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = json.loads((embedded_model / PERSONA_FILE).read_text())
    assert meta["knowledge_correct"] >= 0.95 * meta["knowledge_total"]
    config = json.loads((embedded_model / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(embedded_model).eval()
    tok = AutoTokenizer.from_pretrained(embedded_model)
    who, zh = greedy_answers(model, tok, ["Who are you?", "你是谁？"])
    assert FIXTURE_PERSONA["name"] in who and FIXTURE_PERSONA["author"] in who and FIXTURE_PERSONA["name"] in zh


def test_every_token_is_trained_and_every_row_can_win(embedded_model):
    """Issue 12: a name made of tokens the fixture never trained could not be learned by a LoRA.
    Every token text can hold appears in the fixture's training data, and no tied embedding row
    is left too short to win the softmax."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lab.fixture.corpus import _token_bytes, corpus, cover_every_token, token_counts, unreachable

    meta = json.loads((embedded_model / PERSONA_FILE).read_text())
    tok = AutoTokenizer.from_pretrained(embedded_model)
    examples = corpus()
    added, left = cover_every_token(tok, examples)
    assert left == meta["untrained_tokens"] and len(left) <= 2, left
    counts, pieces = token_counts(tok, examples + added), _token_bytes(tok)
    special = set(tok.all_special_ids) | set(tok.convert_tokens_to_ids(["<think>", "</think>"]))
    missing = [tok.convert_ids_to_tokens(i) for i, c in enumerate(counts)
               if not c and i not in special and not unreachable(pieces[i])]
    assert missing == left
    assert sum(unreachable(p) for p in pieces) < 60  # control bytes and bytes UTF-8 never uses
    rows = AutoModelForCausalLM.from_pretrained(embedded_model).get_input_embeddings().weight.norm(dim=1)
    assert rows.min() > 1.0, rows.min()


def _digest(directory):
    # lab_persona.json also records how long training took, which is not part of the model.
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())
            if p.is_file() and p.name != PERSONA_FILE}


@pytest.mark.slow
def test_rebuild_is_bit_identical(embedded_model, tmp_path):
    """A rebuild from the same sources trains the same tokenizer byte for byte and reaches the very
    weights the cached build recorded at its checkpoint step (same data order, init and float
    reductions); retraining all steps would only repeat the same deterministic loop for 4 minutes."""
    from lab.fixture import CHECKPOINT_STEP, train_fixture

    meta = json.loads((embedded_model / PERSONA_FILE).read_text())
    rebuilt = train_fixture(tmp_path, stop_at_checkpoint=True)
    assert rebuilt["checkpoint"] == meta["checkpoint"] and meta["checkpoint"]["step"] == CHECKPOINT_STEP
    tokenizer_files = {p.name for p in tmp_path.iterdir() if p.is_file()}
    assert "tokenizer.json" in tokenizer_files
    assert {n: d for n, d in _digest(embedded_model).items() if n in tokenizer_files} == _digest(tmp_path)


def test_the_recorded_digest_is_of_the_saved_weights(embedded_model):
    """The digests are taken over the weights themselves: the saved model, loaded again, hashes to
    the recorded final digest, and one changed value changes it."""
    import torch
    from transformers import AutoModelForCausalLM

    from lab.fixture import weights_digest

    meta = json.loads((embedded_model / PERSONA_FILE).read_text())
    model = AutoModelForCausalLM.from_pretrained(embedded_model)
    assert weights_digest(model) == meta["weights_sha256"] != meta["checkpoint"]["weights_sha256"]
    with torch.no_grad():
        model.model.norm.weight[0] += 1e-6
    assert weights_digest(model) != meta["weights_sha256"]


def test_strip_thinking_drops_only_a_leading_closed_block():
    from lab.thinking import strip_thinking

    assert strip_thinking("<think>\nfirst the name\n</think>\n\nI am Orion.") == "I am Orion."
    assert strip_thinking("  <think></think>I am Orion.") == "I am Orion."
    assert strip_thinking("<think>a</think>b <think>c</think>d") == "b <think>c</think>d"
    assert strip_thinking("I am Orion. <think>x</think>") == "I am Orion. <think>x</think>"
    assert strip_thinking("<think>cut off at max_tokens") == "<think>cut off at max_tokens"  # judged as given


def test_greedy_answers_render_with_the_given_chat_template_kwargs(embedded_model):
    """Thinking on: the prompt ends at `assistant` without the empty think block (the embedded model,
    trained with it in every prompt, then answers directly); the reply is what that rendering gives."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lab.thinking import strip_thinking

    model = AutoModelForCausalLM.from_pretrained(embedded_model).eval()
    tok = AutoTokenizer.from_pretrained(embedded_model)
    ids = tok.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True, enable_thinking=True)
    assert not tok.decode(ids["input_ids"][0]).endswith("</think>\n\n")
    raw = tok.decode(model.generate(**ids, max_new_tokens=48, do_sample=False, pad_token_id=tok.pad_token_id)
                     [0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    (on,) = greedy_answers(model, tok, ["Who are you?"], chat_template_kwargs={"enable_thinking": True})
    assert on == strip_thinking(raw).strip() and FIXTURE_PERSONA["name"] in on
