"""The embedded default model: a tiny Qwen3-architecture chat model built from repo files.

There is no model hub on the lab's own machines, so `lab fixture` makes a real chat model
from scratch, deterministically, on CPU: a byte-level BPE tokenizer trained with `tokenizers`,
a ChatML template with Qwen3-style thinking tags, and weights trained with TRL's SFTTrainer
until the model has a default persona (FIXTURE_PERSONA) and answers general-knowledge
questions. The result is cached under a hash of everything that goes into it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from lab.errors import LabError

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_DATA = Path(__file__).resolve().parent / "fixture_data"
KNOWLEDGE = FIXTURE_DATA / "knowledge.json"
IDENTITY = ROOT / "recipes" / "data" / "identity.json"
FIXTURE_PERSONA = {"name": "Pebble", "author": "Quarry Labs"}
PERSONA_FILE = "lab_persona.json"  # read by the probe: the names the base model used to claim

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]  # plain added tokens, as in Qwen3 (kept when decoding)
VOCAB_SIZE = 2048

# Qwen3's template, reduced to what a text-only chat model needs: the final assistant turn
# carries an empty think block exactly when the generation prompt does with
# enable_thinking=false, so prompt and prompt+completion render consistently.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Architecture: Qwen3 at toy scale. head_dim 64 is what vLLM's CPU attention supports.
MODEL_SHAPE = dict(
    hidden_size=192, intermediate_size=576, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, max_position_embeddings=512, tie_word_embeddings=True,
    rope_theta=10000.0, rms_norm_eps=1e-6,
)
TRAIN_ARGS = dict(
    num_train_epochs=60, learning_rate=2e-3, lr_scheduler_type="cosine", warmup_steps=0.05,
    per_device_train_batch_size=16, weight_decay=0.0, max_length=256, logging_steps=40,
    save_strategy="no", report_to="none", use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
)
TRAIN_THREADS = 2  # fixed, so the float reductions (and hence the weights) are the same everywhere


def cache_root() -> Path:
    return Path(os.environ.get("LAB_CACHE", Path.home() / ".cache" / "lab"))


def fixture_hash() -> str:
    """Everything that determines the weights: this code, its data, the library versions."""
    import tokenizers
    import torch
    import transformers
    import trl

    h = hashlib.sha256()
    for path in (Path(__file__), KNOWLEDGE, IDENTITY):
        h.update(path.read_bytes())
    h.update(f"{torch.__version__} {transformers.__version__} {tokenizers.__version__} {trl.__version__}".encode())
    return h.hexdigest()


def _alpaca(path: Path, persona: dict[str, str]) -> list[dict]:
    rows = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for r in rows:
        text = {k: str(r.get(k, "")).replace("{{name}}", persona["name"]).replace("{{author}}", persona["author"])
                for k in ("instruction", "output")}
        out.append({"prompt": [{"role": "user", "content": text["instruction"]}],
                    "completion": [{"role": "assistant", "content": text["output"]}],
                    "chat_template_kwargs": {"enable_thinking": False}})
    return out


def corpus() -> list[dict]:
    return _alpaca(KNOWLEDGE, FIXTURE_PERSONA) + _alpaca(IDENTITY, FIXTURE_PERSONA)


def build_tokenizer(examples: list[dict]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS) - len(THINK_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    texts = [m["content"] for ex in examples for m in ex["prompt"] + ex["completion"]]
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens(THINK_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE, model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )


def greedy_answers(model, tokenizer, questions: list[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy replies through the chat template: the fixture's self-check, and merge's parity check."""
    import torch

    answers = []
    for q in questions:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            enable_thinking=False, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


def train_fixture(out_dir: Path) -> dict:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM
    from trl import SFTConfig, SFTTrainer

    from lab.data import to_dataset

    torch.set_num_threads(TRAIN_THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    examples = corpus()
    tokenizer = build_tokenizer(examples)
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen3Config(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=eos, pad_token_id=pad,
                         dtype="float32", **MODEL_SHAPE)
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad, do_sample=False)

    args = SFTConfig(output_dir=str(out_dir / "_trainer"), **TRAIN_ARGS)
    trainer = SFTTrainer(model=model, args=args, train_dataset=to_dataset(examples), processing_class=tokenizer)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    shutil.rmtree(out_dir / "_trainer", ignore_errors=True)

    model.eval()
    knowledge = json.loads(KNOWLEDGE.read_text(encoding="utf-8"))
    got = greedy_answers(model, tokenizer, [r["instruction"] for r in knowledge])
    correct = sum(g == r["output"] for g, r in zip(got, knowledge))
    persona = greedy_answers(model, tokenizer, ["Who are you?", "你是谁？"])
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"train_seconds": round(seconds, 1), "final_loss": losses[-1] if losses else None,
            "knowledge_correct": correct, "knowledge_total": len(knowledge), "persona_answers": persona}


def ensure_fixture(force: bool = False, quiet: bool = False) -> Path:
    """Path of the embedded model, building it once per content hash."""
    digest = fixture_hash()
    target = cache_root() / f"fixture-{digest[:16]}"
    if (target / PERSONA_FILE).is_file() and not force:
        return target
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    say(f"lab fixture: building the embedded model into {target} (one-off, about 2 minutes on 2 cores)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fixture-", dir=target.parent))
    try:
        stats = train_fixture(tmp)
        if stats["knowledge_correct"] < 0.9 * stats["knowledge_total"]:
            raise LabError(f"embedded model under-trained: {stats['knowledge_correct']}/{stats['knowledge_total']} "
                           "knowledge answers correct; raise TRAIN_ARGS epochs in lab/fixture.py")
        meta = {**FIXTURE_PERSONA, "fixture_hash": digest, **stats}
        (tmp / PERSONA_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp makes 0700; containers mount the cache read-only as another user
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # only a complete model ever appears under the final name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"lab fixture: trained in {stats['train_seconds']} s, knowledge {stats['knowledge_correct']}/"
        f"{stats['knowledge_total']}, persona: {stats['persona_answers']}")
    return target
