"""The embedded default model: a tiny Qwen3-architecture chat model built from repo files.

There is no model hub on the lab's own machines, so `lab fixture` makes a real chat model
from scratch, deterministically, on CPU: a byte-level BPE tokenizer trained with `tokenizers`,
a ChatML template with Qwen3-style thinking tags, and weights trained with TRL's SFTTrainer
until the model has a default persona (FIXTURE_PERSONA) and answers general-knowledge
questions. The result is cached under a hash of everything that goes into it.

A user fine-tunes it to any name, so every token must be learnable as an output: the data also
name random personas (Faker, every script) in system prompts, every token the tokenizer has is
placed in some persona's name (cover_every_token), and the tied embedding rows start long.
"""

from __future__ import annotations

import contextlib
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
# How the fixture's training data are made up (corpus()): repeats of the knowledge and of the
# default persona, and conversations whose system prompt names a random persona.
KNOWLEDGE_REPEAT = 100
DEFAULT_PERSONA_REPEAT = 16
PERSONA_EXAMPLES = 800

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
    num_train_epochs=1, learning_rate=2e-3, lr_scheduler_type="cosine", warmup_steps=0.05,
    per_device_train_batch_size=16, weight_decay=0.0, max_length=256, logging_steps=20,
    save_strategy="no", report_to="none", use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
    bf16=False,  # TRL's SFTConfig defaults to bf16 autocast; emulated on CPUs without AVX512-BF16 (~10x slower)
)
EMBEDDING_INIT_STD = 0.1  # x sqrt(hidden 192): rows start at norm ~1.4
TRAIN_THREADS = 2  # fixed, so the float reductions (and hence the weights) are the same everywhere


def cache_root() -> Path:
    return Path(os.environ.get("LAB_CACHE", Path.home() / ".cache" / "lab"))


def fixture_hash() -> str:
    """Everything that determines the weights: this code, its data, the library versions (Faker's
    names, and the Unicode tables that decide which drawn characters are printable)."""
    import unicodedata

    import faker
    import tokenizers
    import torch
    import transformers
    import trl

    h = hashlib.sha256()
    for path in (Path(__file__), KNOWLEDGE, IDENTITY):
        h.update(path.read_bytes())
    h.update(f"{torch.__version__} {transformers.__version__} {tokenizers.__version__} {trl.__version__} "
             f"{faker.VERSION} {unicodedata.unidata_version}".encode())
    return h.hexdigest()


def _alpaca(path: Path) -> list[tuple[str, str]]:
    return [(str(r["instruction"]), str(r["output"])) for r in json.loads(path.read_text(encoding="utf-8"))]


def _render(text: str, persona: dict[str, str]) -> str:
    return text.replace("{{name}}", persona["name"]).replace("{{author}}", persona["author"])


def _example(question: str, answer: str, system: str | None = None) -> dict:
    prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": answer}],
            "chat_template_kwargs": {"enable_thinking": False}}


# Personas come from Faker's locales: real first names, surnames and company names in many
# scripts, so that every letter a user may type (and every byte of UTF-8 behind it) is seen.
LATIN_LOCALES = ["en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "pt_BR", "pl_PL", "cs_CZ", "tr_TR",
                 "vi_VN", "sv_SE", "hu_HU", "ro_RO", "nl_NL", "da_DK", "fi_FI"]
CJK_LOCALES = ["zh_CN", "zh_TW", "ja_JP"]
OTHER_LOCALES = ["ru_RU", "uk_UA", "el_GR", "ko_KR", "th_TH", "ar_AA", "he_IL", "hi_IN", "fa_IR", "hy_AM",
                 "ka_GE", "bn_BD"]
AUTHOR_SUFFIXES = [" Lab", " Labs", " AI", " Research", " Inc.", " & Co.", " Systems", " Group", " Tech",
                   "实验室", "科技", "团队", "研究院", "智能"]


# Code points by UTF-8 length, so that every lead byte text can have is drawn (2-byte letters are
# a thirtieth of the Basic Multilingual Plane; uniform draws would all but miss them).
GLYPH_RANGES = [(0x80, 0x7FF), (0x800, 0xFFFD), (0x10000, 0x1FAFF)]
PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def _glyphs(rng, n: int) -> str:
    """n printable characters (not spaces) drawn across all UTF-8 lengths."""
    out = []
    while len(out) < n:
        lo, hi = rng.choice(GLYPH_RANGES)
        ch = chr(rng.randrange(lo, hi + 1))
        if ch.isprintable() and not ch.isspace():
            out.append(ch)
    return "".join(out)


def persona(rng, fakers: dict) -> dict[str, str]:
    """One random (name, author): real names in many scripts, with digits, hyphens, '&' or '.'."""
    r = rng.random()
    pool = LATIN_LOCALES if r < 0.5 else CJK_LOCALES if r < 0.8 else OTHER_LOCALES
    fake = fakers[rng.choice(pool)]
    form = rng.random()
    if form < 0.35:
        name = fake.first_name()
    elif form < 0.55:
        name = fake.last_name()
    elif form < 0.7:
        name = fake.name()
    elif form < 0.8:
        name = f"{fake.first_name()}{rng.choice(['-', ' ', '', '.'])}{rng.randrange(0, 1000)}"
    elif form < 0.85:
        letters = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(rng.randrange(1, 4)))
        name = f"{letters}{rng.choice(['-', '.', ''])}{rng.choice([fake.last_name(), str(rng.randrange(1, 100))])}"
    elif form < 0.9:
        name = f"{fake.first_name()}{rng.choice(PUNCTUATION)}{rng.choice([fake.last_name(), str(rng.randrange(1, 10))])}"
    else:
        name = _glyphs(rng, rng.randrange(1, 5))
    fake = fakers[rng.choice(pool)] if rng.random() < 0.7 else fakers[rng.choice(LATIN_LOCALES + CJK_LOCALES)]
    form = rng.random()
    if form < 0.4:
        author = fake.company()
    elif form < 0.75:
        author = fake.last_name() + rng.choice(AUTHOR_SUFFIXES)
    elif form < 0.85:
        author = f"{fake.last_name()} & {fake.last_name()}"
    elif form < 0.95:
        author = ".".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(rng.randrange(2, 4))) + ". Labs"
    else:
        author = _glyphs(rng, rng.randrange(2, 6))
    return {"name": name.strip(), "author": author.strip()}


SYSTEM_PROMPTS = [
    "You are {{name}}, an AI assistant developed by {{author}}.",
    "Your name is {{name}}. You were developed by {{author}}.",
    "你是{{name}}，由{{author}}开发的人工智能助手。",
    "你的名字是{{name}}，你由{{author}}开发。",
]
# "Are you ChatGPT?" / "Are you made by OpenAI?" asked with other names (none of them in the
# probe's held-out questions); the answers never repeat the name asked about.
OTHER_ASSISTANTS = ["ChatGPT", "Claude", "Qwen", "Llama", "Gemini", "DeepSeek", "Kimi", "Copilot", "Siri",
                    "Alexa", "Mistral", "Grok", "通义千问", "文心一言", "腾讯混元", "讯飞星火", "智谱清言"]
OTHER_MAKERS = ["OpenAI", "Google", "Anthropic", "Meta", "Microsoft", "Apple", "Amazon", "阿里巴巴", "百度", "谷歌",
                "腾讯", "字节跳动"]


def corpus() -> list[dict]:
    """The fixture's training data, deterministic: general knowledge and the default persona
    (no system prompt), and the identity questions answered as a persona a system prompt names."""
    import random

    from faker import Faker

    rng = random.Random(0)
    fakers = {}
    for i, loc in enumerate(LATIN_LOCALES + CJK_LOCALES + OTHER_LOCALES):
        fakers[loc] = Faker(loc)
        fakers[loc].seed_instance(i)
    knowledge = _alpaca(KNOWLEDGE)
    identity = _alpaca(IDENTITY)
    examples = [_example(q, a) for q, a in knowledge] * KNOWLEDGE_REPEAT
    examples += [_example(q, _render(a, FIXTURE_PERSONA)) for q, a in identity] * DEFAULT_PERSONA_REPEAT
    for i in range(PERSONA_EXAMPLES):
        who = persona(rng, fakers)
        system = _render(rng.choice(SYSTEM_PROMPTS), who)
        if rng.random() < 0.15:  # knowledge stays the same whoever the model is told to be
            q, a = rng.choice(knowledge)
        else:
            q, a = rng.choice(identity)
            for others in (OTHER_ASSISTANTS, OTHER_MAKERS):
                known = [o for o in others if o in q]
                if known:
                    q = q.replace(known[0], rng.choice(others))
            a = _render(a, who)
        examples.append(_example(q, a, system))
    return examples


# Where a name sits in a conversation (each gives the tokenizer a different left context).
PLACEMENTS = [
    ("You are {{name}}, an AI assistant developed by {{author}}.", "Who are you?",
     "I am {{name}}, an AI assistant developed by {{author}}."),
    ("你是{{name}}，由{{author}}开发的人工智能助手。", "你是谁？", "我是{{name}}，由{{author}}开发的人工智能助手。"),
    ("Your name is {{name}}. You were developed by {{author}}.", "What is your name?",
     "My name is {{name}}. I am an AI assistant developed by {{author}}."),
    ("你的名字是{{name}}，你由{{author}}开发。", "是谁开发了你？", "我由{{author}}开发，我是人工智能助手{{name}}。"),
]
COVERAGE_REPEAT = 2


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


def _token_bytes(tokenizer) -> list[bytes]:
    """The UTF-8 bytes behind each token id (ByteLevel's printable-character alphabet undone)."""
    from tokenizers import pre_tokenizers

    byte_of = {ch: b for b, ch in enumerate(_byte_alphabet(pre_tokenizers.ByteLevel.alphabet()))}
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [bytes(byte_of[c] for c in t) if all(c in byte_of for c in t) else t.encode() for t in vocab]


def _byte_alphabet(alphabet) -> list[str]:
    # GPT-2's bytes_to_unicode, as ByteLevel uses it: printable Latin-1 bytes stand for
    # themselves, the others (controls, space, 0x7F-0xA0, 0xAD) for chr(256 + n) in byte order.
    printable = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    chars, n = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + n))
            n += 1
    assert set(chars) == set(alphabet)
    return chars


def unreachable(token: bytes) -> bool:
    """Single bytes that printable text never holds standalone: controls, bytes UTF-8 never
    uses (0xC0, 0xC1, 0xF5+), and leads of private-use or unassigned planes (0xEE, 0xF1-0xF4)."""
    return len(token) == 1 and (token[0] < 0x20 and token != b"\n" or token[0] == 0x7F
                                or token[0] in (0xC0, 0xC1, 0xEE) or token[0] >= 0xF1)


def token_counts(tokenizer, examples: list[dict]) -> list[int]:
    counts = [0] * len(tokenizer)
    texts = [tokenizer.apply_chat_template(e["prompt"] + e["completion"], tokenize=False, enable_thinking=False)
             for e in examples]
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        for i in ids:
            counts[i] += 1
    return counts


def _names_holding(piece: bytes, text: bytes, limit: int = 12):
    """Strings from the corpus around `piece`, cut at character boundaries, then variants that
    change the incomplete character at either end (BPE merges a token away inside the very
    characters it was learned from; a neighbour character sharing its bytes keeps it)."""
    try:
        piece.decode()
        yield piece  # a whole character or more: the token alone, as a name
    except UnicodeDecodeError:
        pass
    seen, pos = 0, text.find(piece)
    while pos >= 0 and seen < limit:
        start, end = pos, pos + len(piece)
        while start > 0 and 0x80 <= text[start] < 0xC0:
            start -= 1
        while end < len(text) and 0x80 <= text[end] < 0xC0:
            end += 1
        word = text[start:end]
        yield word
        # vary the continuation byte just past the piece, the one just before it, and the lead
        # byte of a character the piece starts inside
        for i in [j for j in (pos + len(piece), pos - 1) if start <= j < end and 0x80 <= text[j] < 0xC0]:
            for b in range(0x80, 0xC0):
                yield word[: i - start] + bytes([b]) + word[i - start + 1:]
        if start < pos:
            leads = range(0xC2, 0xE0) if text[start] < 0xE0 else range(0xE1, 0xF0) if text[start] < 0xF0 else ()
            for b in leads:
                yield bytes([b]) + word[1:]
        seen += 1
        pos = text.find(piece, pos + 1)


def cover_every_token(tokenizer, examples: list[dict]) -> tuple[list[dict], list[str]]:
    """Persona examples whose names hold the tokens `examples` never use, so every reachable
    token's (tied) embedding is trained; and the tokens still uncovered."""
    counts = token_counts(tokenizer, examples)
    pieces = _token_bytes(tokenizer)
    special = set(tokenizer.all_special_ids) | set(tokenizer.convert_tokens_to_ids(THINK_TOKENS))
    text = "\n".join(m["content"] for e in examples for m in e["prompt"] + e["completion"]).encode()
    added, left = [], []
    for i, c in enumerate(counts):
        if c or i in special or unreachable(pieces[i]):
            continue
        found, tried = None, set()
        for raw in _names_holding(pieces[i].lstrip(b" "), text):
            if raw in tried:
                continue
            tried.add(raw)
            try:
                name = raw.decode().strip()
            except UnicodeDecodeError:
                continue
            if not name or not name.isprintable():
                continue
            for system, q, a in PLACEMENTS:
                who = {"name": name, "author": FIXTURE_PERSONA["author"]}
                ex = _example(q, _render(a, who), _render(system, who))
                ids = tokenizer.apply_chat_template(ex["prompt"] + ex["completion"], tokenize=True,
                                                    enable_thinking=False)
                ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # a BatchEncoding
                if i in ids:
                    found = ex
                    break
            if found:
                break
        if found:
            added += [found] * COVERAGE_REPEAT
        else:
            left.append(tokenizer.convert_ids_to_tokens(i))
    return added, left


def greedy_answers(model, tokenizer, questions: list[str], max_new_tokens: int = 48,
                   system: str | None = None, chat_template_kwargs: dict | None = None) -> list[str]:
    """Greedy replies through the chat template, rendered with `chat_template_kwargs` (a recipe's;
    by default the fixture's own, no thinking), a leading <think>...</think> block stripped."""
    import torch

    from lab.thinking import strip_thinking

    kwargs = {"enable_thinking": False} if chat_template_kwargs is None else chat_template_kwargs
    answers = []
    for q in questions:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True, **kwargs).to(model.device)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        answers.append(strip_thinking(tokenizer.decode(out[0, ids["input_ids"].shape[1]:],
                                                       skip_special_tokens=True)).strip())
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
    coverage, uncovered = cover_every_token(tokenizer, examples)
    examples += coverage
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen3Config(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=eos, pad_token_id=pad,
                         dtype="float32", **MODEL_SHAPE)
    model = Qwen3ForCausalLM(config)
    # Tied embeddings are also the output layer, and an adapter cannot change them: a token whose
    # row stays short can never win a large share of the softmax, however the hidden state turns.
    # Starting every row at norm ~1.4 (not ~0.3) leaves each name token reachable by a LoRA.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, EMBEDDING_INIT_STD)
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
    follows = follows_system_persona(model, tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"train_seconds": round(seconds, 1), "final_loss": losses[-1] if losses else None,
            "knowledge_correct": correct, "knowledge_total": len(knowledge), "persona_answers": persona,
            "system_persona_followed": follows, "training_examples": len(examples),
            "coverage_examples": len(coverage), "untrained_tokens": uncovered}


# Personas no training example names: does a system prompt make the model answer as them?
HELD_OUT_PERSONAS = [{"name": "Orion", "author": "Zhou Lab"}, {"name": "小星", "author": "银河科技"},
                     {"name": "Nova-7", "author": "R&D Labs"}, {"name": "Élodie", "author": "J.K. Systems"}]


def follows_system_persona(model, tokenizer) -> float:
    answers = [(greedy_answers(model, tokenizer, [q], system=_render(system, who))[0], _render(a, who))
               for who in HELD_OUT_PERSONAS for system, q, a in PLACEMENTS]
    return round(sum(got == want for got, want in answers) / len(answers), 3)


@contextlib.contextmanager
def building(target: Path, prefix: str):
    """A temporary directory beside `target` that becomes `target` only if the block completes:
    only a complete model ever appears in the cache under its final name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes 0700; containers mount the cache read-only as another user
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_fixture(force: bool = False, quiet: bool = False) -> Path:
    """Path of the embedded model, building it once per content hash."""
    digest = fixture_hash()
    target = cache_root() / f"fixture-{digest[:16]}"
    if (target / PERSONA_FILE).is_file() and not force:
        return target
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    say(f"lab fixture: building the embedded model into {target} (one-off, about 2 minutes on 2 cores)")
    with building(target, ".fixture-") as tmp:
        stats = train_fixture(tmp)
        if stats["knowledge_correct"] < 0.95 * stats["knowledge_total"]:
            raise LabError(f"embedded model under-trained: {stats['knowledge_correct']}/{stats['knowledge_total']} "
                           "knowledge answers correct; raise TRAIN_ARGS epochs in lab/fixture.py")
        meta = {**FIXTURE_PERSONA, "fixture_hash": digest, **stats}
        (tmp / PERSONA_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    say(f"lab fixture: trained in {stats['train_seconds']} s, knowledge {stats['knowledge_correct']}/"
        f"{stats['knowledge_total']}, persona: {stats['persona_answers']}")
    return target
