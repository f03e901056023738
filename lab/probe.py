"""Probe: ask a served model who it is, and general questions, through the OpenAI API.

Works against any OpenAI-compatible server (BASE_URL). Greedy and seeded (docs/pitfalls.md: sampling defaults), with
a bounded max_tokens so a model that never learned to stop shows up as finish_reason=length
(docs/pitfalls.md: end of turn never learned). Every answer is judged strictly, with its reasons recorded
(judge_identity, judge_control), but on what it says, not on its wording, since a real model answers in its own
words: an identity answer is a hit if it says what was asked (the new name, the new maker for
maker questions), claims no old identity (the recipe's list, the base model's default persona
and the names it gave itself before training), answers in the question's language and is
well-formed (no garbled characters, no name run into other letters, no fragment said twice in a
row, and it stops). A control is correct if it states its expected fact in any wording, brings
in no identity name and stops; retention counts only the controls the base model itself got
right. Character similarity to the data's answers, BLEU and ROUGE-L are kept as diagnostics.
A leading <think> block is left out of what is judged (the raw answer stays in the result).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lab.errors import LabError
from lab.recipe import Recipe
from lab.thinking import strip_thinking

CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def server_root(url: str) -> str:
    """http://host:port from BASE_URL as users write it (with or without /v1, a trailing slash)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LabError(f"BASE_URL={url!r} is not an http(s) URL; give e.g. http://127.0.0.1:8000")
    path = parts.path.rstrip("/")
    path = path[: -len("/v1")] if path.endswith("/v1") else path
    return f"{parts.scheme}://{parts.netloc}{path}"


def public_url(url: str) -> str:
    """A URL fit to record: no user:password@, no query string (tokens travel there too)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


def client(base_url: str, recipe: Recipe):
    import openai

    from lab.serve import api_key

    # The lab's own key (serve.api_key_env, LAB_API_KEY by default; else the one it generated for its
    # own server at this address): a user's OPENAI_API_KEY is never sent to whatever BASE_URL names.
    root = server_root(base_url)
    return openai.OpenAI(base_url=root + "/v1", api_key=api_key(recipe, root) or "EMPTY",
                         max_retries=0, timeout=recipe.probe.timeout_s)


def served_model(api, prefer: str | None = None, key_env: str = "LAB_API_KEY") -> str:
    import openai

    try:
        models = api.models.list().data
    except openai.APIConnectionError:
        raise LabError(f"no server answers at {api.base_url}; start one with `make serve`") from None
    except openai.AuthenticationError:
        raise LabError(f"{api.base_url} refused the API key; set {key_env} to the key the server was started "
                       "with (`make -s key` prints the one the lab generated for its server)") from None
    except openai.NotFoundError:
        raise LabError(f"{api.base_url}models does not exist: is this an OpenAI-compatible server? Give BASE_URL "
                       "as http://host:port") from None
    except openai.APIStatusError as e:
        raise LabError(f"{api.base_url}models answered HTTP {e.status_code}; is this an OpenAI-compatible "
                       "server?") from None
    if not models:
        raise LabError(f"{api.base_url} serves no model")
    ids = [m.id for m in models]
    return prefer if prefer in ids else ids[0]  # the recipe's name: the adapter, when vLLM serves base + LoRA


def chat(api, model: str, question: str, recipe: Recipe, system: str | None = None) -> dict[str, Any]:
    import openai

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    try:
        r = api.chat.completions.create(
            model=model, messages=messages, temperature=0.0,
            seed=recipe.probe.seed, max_tokens=recipe.probe.max_tokens,
            extra_body={"chat_template_kwargs": recipe.chat_template_kwargs},
        )
    except openai.APIConnectionError:
        raise LabError(f"lost the server at {api.base_url} (its log: runs/server-<port>.log, or the "
                       "run's server-*.log under e2e)") from None
    except openai.APIStatusError as e:
        raise LabError(f"server refused the request: HTTP {e.status_code} {e.message}") from None
    choice = r.choices[0]
    return {"answer": (choice.message.content or "").strip(), "finish_reason": choice.finish_reason}


def ask(base_url: str, question: str, recipe: Recipe) -> dict[str, Any]:
    api = client(base_url, recipe)
    return chat(api, served_model(api, recipe.serve.served_model_name, recipe.serve.api_key_env), question, recipe)


def contains(text: str, needle: str) -> bool:
    return needle.casefold() in text.casefold()


def char_similarity(a: str, b: str) -> float:
    """1 - Levenshtein distance / length of the longer string (rapidfuzz: a C library, exact)."""
    from rapidfuzz.distance import Levenshtein

    return round(Levenshtein.normalized_similarity(a, b), 4)


def language(text: str) -> str:
    return "zh" if CJK.search(text) else "en"


LATIN_WORD = re.compile(r"[A-Za-z\u00c0-\u024f]+")
# Short capitals (AI, GPT, LLM) are how Chinese text itself writes these terms ("AI 助手").
ACRONYM = re.compile(r"[A-Z]{2,5}")
# Letters a model that is falling apart writes: the replacement character, control characters.
GARBLED = re.compile(r"[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f]")
# An old name right after a denial, in the same clause, is no claim: "No, I'm not ChatGPT, I am Atlas".
DENIAL = re.compile(r"(\bnot\b|n't\b|\bnor\b|\bneither\b|不是|并非|而非|不叫|并不是)[^,.;!?，。；！？\n]{0,16}$",
                    re.IGNORECASE)
def _wordy(ch: str) -> bool:
    """A letter or digit that joins a word in space-separated scripts (not a CJK character)."""
    return ch.isalnum() and not CJK.match(ch)


def _glued(answer: str, part: str) -> str | None:
    """The first occurrence of `part` that runs into a neighbouring letter or digit ("Lab4")."""
    start = answer.find(part)
    while start >= 0:
        end = start + len(part)
        if (start > 0 and _wordy(answer[start - 1]) and _wordy(part[0])) or \
                (end < len(answer) and _wordy(answer[end]) and _wordy(part[-1])):
            return answer[max(0, start - 1):end + 1]
        start = answer.find(part, start + 1)
    return None


def _repeats(text: str) -> set[str]:
    """Fragments of 2+ characters said twice in a row ("开发开发"), names already blanked out."""
    return {m.group(1) for m in re.finditer(r"(\S.+?)\1", text) if len(m.group(1).strip()) >= 2}


def _blank(text: str, name: str, author: str) -> str:
    """Longest first, so that a name inside the maker's name ("Zhou" in "Zhou Lab") is not split."""
    for part, mark in sorted(((name, "\x00"), (author, "\x01")), key=lambda p: -len(p[0])):
        if part:
            text = text.replace(part, mark)
    return text


def _claims(answer: str, old: str) -> bool:
    """Whether an answer names `old` other than to deny being it."""
    low, needle = answer.casefold(), old.casefold()
    start = low.find(needle)
    while start >= 0:
        if not DENIAL.search(answer[:start]):
            return True
        start = low.find(needle, start + 1)
    return False


def leaked_names(answer: str, question: str, old_identity: list[str], new: tuple[str, ...] = ()) -> list[str]:
    """Old names an answer claims, except ones the question itself brought up ("Are you ChatGPT?"),
    ones it denies ("I'm not ChatGPT"), and ones inside the new name ("Qwen" in "Qwen-Doctor")."""
    found = []
    for n in old_identity:
        if not n or contains(question, n):
            continue
        rest = answer
        for part in new:  # the new identity blanked out: an old name inside it is no leak
            if part and contains(part, n):
                rest = re.sub(re.escape(part), "\x00", rest, flags=re.IGNORECASE)
        if _claims(rest, n):
            found.append(n)
    return found


def judge_identity(answer: str, question: dict, references: list[str], name: str, author: str,
                   old_identity: list[str], finish_reason: str = "stop", min_similarity: float = 0.0) -> dict[str, Any]:
    """Whether one identity answer is a hit, and every reason it is not.

    A hit says what was asked (`about`: the new name; the new maker; both; for a `denial` question,
    "Are you ChatGPT?", the new name or maker),
    claims no old identity, answers in the question's language, and is well-formed: no garbled
    characters, no name run into other letters, no fragment said twice in a row, no name said over
    and over, and it stops. Wording is free: a correct paraphrase is a hit. Similarity to the
    data's own answers is recorded as a diagnostic (a pass condition only if min_similarity > 0).
    """
    reasons = []
    about = question.get("about", "name")
    lang = question.get("lang") or language(question["q"])
    if about == "denial":  # "Are you ChatGPT?": denying it and naming the new name or maker answers it
        if name not in answer and author not in answer:
            reasons.append(f"says neither the name {name!r} nor the maker {author!r}")
    if about in ("name", "both") and name not in answer:
        reasons.append(f"does not say the name {name!r}")
    if about in ("maker", "both") and author not in answer:
        reasons.append(f"does not say the maker {author!r}")
    leaked = leaked_names(answer, question["q"], old_identity, (name, author))
    if leaked:
        reasons.append("names the old identity " + ", ".join(repr(n) for n in leaked))
    if GARBLED.search(answer):
        reasons.append(f"garbled characters: {''.join(sorted(set(GARBLED.findall(answer))))!r}")
    for part in (name, author):
        glued = _glued(answer, part) if part else None
        if glued:
            reasons.append(f"{part!r} runs into other letters: {glued!r}")
        if part and answer.count(part) > 2:
            reasons.append(f"says {part!r} {answer.count(part)} times")
    # The rest of the answer, without the names (a name may be in any script), in the question's language?
    rest = _blank(answer, name, author)
    for n in old_identity + LATIN_WORD.findall(question["q"]):
        rest = rest.replace(n, "")
    if lang == "en" and CJK.search(rest):
        reasons.append(f"Chinese in an answer to an English question: {''.join(CJK.findall(rest))!r}")
    if lang == "zh":
        if not CJK.search(rest):
            reasons.append("not in Chinese")
        known = {w for ref in references for w in LATIN_WORD.findall(_blank(ref, name, author))}
        foreign = [w for w in LATIN_WORD.findall(rest) if w not in known and not ACRONYM.fullmatch(w)]
        if foreign:
            reasons.append(f"English words in an answer to a Chinese question: {' '.join(foreign)!r}")
    for part, mark in ((name, "\x00"), (author, "\x01")):
        if part and re.search(re.escape(mark) + r"[\s\W]{0,3}" + re.escape(mark), rest):
            reasons.append(f"says {part!r} twice in a row")
    said_twice = _repeats(rest) - {x for ref in references for x in _repeats(_blank(ref, name, author))}
    if said_twice:
        reasons.append("repeats " + ", ".join(repr(x) for x in sorted(said_twice)))
    if finish_reason != "stop":
        reasons.append(f"does not stop (finish_reason {finish_reason})")
    similarity_, closest = None, None
    if references:
        similarity_, closest = max((char_similarity(answer, r), r) for r in references)
        if min_similarity and similarity_ < min_similarity:
            reasons.append(f"similarity {similarity_} < {min_similarity} to the closest data answer {closest!r}")
    return {"hit": not reasons, "reasons": reasons, "leaked": leaked, "similarity": similarity_, "closest": closest}


# Number words a correct answer may write as digits, and back: "There are 7 days in a week."
NUMBERS = {w: str(i) for i, ws in enumerate((
    ("zero", "零"), ("one", "一"), ("two", "二", "两"), ("three", "三"), ("four", "四"), ("five", "五"),
    ("six", "六"), ("seven", "七"), ("eight", "八"), ("nine", "九"), ("ten", "十"), ("eleven", "十一"),
    ("twelve", "十二"))) for w in ws}


def _says(answer: str, expect: str) -> bool:
    """The expected fact, in any of its written forms: `a|b` alternatives, a number as word or digits."""
    for option in (o.strip() for o in expect.split("|")):
        forms = {option, NUMBERS.get(option.casefold(), option)}
        forms |= {w for w, digit in NUMBERS.items() if digit == option}
        for form in filter(None, forms):
            if form.isdigit():  # 7, not 17 or 1.7
                if re.search(rf"(?<![\d.]){form}(?![\d]|\.\d)", answer):
                    return True
            elif _mentions(answer, form):
                return True
    return False


def judge_control(answer: str, question: dict, identity_names: list[str],
                  min_similarity: float = 0.0) -> dict[str, Any]:
    """Whether a general-knowledge answer is right, and why not: it states the expected fact (any
    wording: "7 days" or "seven days"), brings in no identity name its reference lacks (the new
    identity leaking into general answers is damage), and answers in the question's language. A
    right answer that runs on past max_tokens is still right (the stop rate counts that apart).
    Similarity to the reference is a diagnostic (a pass condition only if min_similarity > 0)."""
    reference = str(question["answer"])
    reasons = []
    expect = str(question.get("expect") or "")
    if expect and not _says(answer, expect):
        reasons.append(f"does not say {expect!r}")
    stray = [n for n in identity_names if n and contains(answer, n) and not contains(reference, n)
             and not contains(question["q"], n)]
    if stray:
        reasons.append("brings in " + ", ".join(repr(n) for n in stray))
    if GARBLED.search(answer):
        reasons.append("garbled characters")
    lang = question.get("lang") or language(question["q"])
    if lang == "zh" and not CJK.search(answer):
        reasons.append("not in Chinese")
    sim = char_similarity(answer, reference)
    if min_similarity and sim < min_similarity:
        reasons.append(f"similarity {sim} < {min_similarity} to the reference {reference!r}")
    return {"correct": not reasons, "reasons": reasons, "char_similarity": sim}


def _mentions(text: str, word: str) -> bool:
    """A word in Latin script as a whole word ("AI", not the "ai" of "said"); any other as a substring."""
    if word.isascii():
        return re.search(rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])", text, re.IGNORECASE) is not None
    return word in text


def judge_persona(answer: str, question: dict, persona: dict, finish_reason: str = "stop") -> dict[str, Any]:
    """Whether an in-character answer shows the role: it speaks as the role (a self-reference word),
    never calls itself an AI assistant or a program, answers in the question's language, is
    well-formed, stops, and shares at least persona.overlap_min of its reference (ROUGE-L)."""
    reasons = []
    words = persona.get("self_reference") or []
    if words and not any(w in answer for w in words):
        reasons.append(f"does not speak as the role (none of {', '.join(words)})")
    out_of_role = [w for w in persona.get("not_in_character") or [] if _mentions(answer, w)]
    if out_of_role:
        reasons.append("describes itself out of character: " + ", ".join(repr(w) for w in out_of_role))
    lang = question.get("lang") or language(question["q"])
    if lang == "zh" and not CJK.search(answer):
        reasons.append("not in Chinese")
    if GARBLED.search(answer):
        reasons.append("garbled characters")
    said_twice = _repeats(answer)
    if said_twice:
        reasons.append("repeats " + ", ".join(repr(x) for x in sorted(said_twice)))
    if finish_reason != "stop":
        reasons.append(f"does not stop (finish_reason {finish_reason})")
    overlap = similarity(answer, str(question["answer"]))["rougeL"] if question.get("answer") else None
    need = float(persona.get("overlap_min") or 0)
    if overlap is not None and overlap < need:
        reasons.append(f"shares {overlap} of its reference answer (needs {need}): {question['answer']!r}")
    return {"hit": not reasons, "reasons": reasons, "overlap": overlap}


# Who a model says it is: "named SmolLM", "I am Qwen", "trained by Hugging Face". A name is a run
# of capitalised words (Latin script: the persona names of the models the lab meets).
_NAME = r"([A-Z][\w.-]*[\w](?:[ -][A-Z][\w.-]*[\w])*|[A-Z])"
_SELF = re.compile(r"(?:\bnamed|\bcalled|\bname is|\bI am|\bI'm|\bI’m|\bYou are|\bThis is|我是|我叫|名叫)\s*" + _NAME)
_MAKER = re.compile(r"(?:created|trained|developed|made|built|designed|founded|powered)\s+by\s+(?:the\s+)?" + _NAME +
                    r"|由\s*" + _NAME + r"\s*(?:开发|训练|创建|打造|研发)")
_NOT_NAMES = {"I", "AI", "A", "An", "The", "Hello", "Hi", "Yes", "No", "Sure", "Thank", "Thanks", "As", "It",
              "My", "Your", "Here", "Not", "Sorry", "Assistant", "AI Assistant", "Chinese", "English"}


def persona_names(text: str) -> list[str]:
    """The names a text claims for itself and its maker (a default system prompt, a base model's answers)."""
    found = []
    for m in list(_SELF.finditer(text)) + list(_MAKER.finditer(text)):
        name = next(g for g in m.groups() if g)
        if name not in _NOT_NAMES and len(name) > 1:
            found.append(name)
    return list(dict.fromkeys(found))


def template_persona(model_dir: str | Path) -> list[str]:
    """The persona a chat template gives the model when the user gives no system prompt
    ("You are a helpful AI assistant named SmolLM, trained by Hugging Face")."""
    model_dir = Path(model_dir)
    texts = []
    if (model_dir / "chat_template.jinja").is_file():
        texts.append((model_dir / "chat_template.jinja").read_text(encoding="utf-8"))
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            texts += [t.get("template", "") for t in template if isinstance(t, dict)]
        elif isinstance(template, str):
            texts.append(template)
    return persona_names("\n".join(texts))


class _Chars:
    """rouge-score tokenizer: characters for CJK, lower-cased words otherwise."""

    def tokenize(self, text: str) -> list[str]:
        return [t for t in re.findall(r"[\u3400-\u9fff\uf900-\ufaff]|[A-Za-z0-9]+", text.lower())]


def similarity(answer: str, reference: str) -> dict[str, float]:
    import sacrebleu
    from rouge_score import rouge_scorer

    zh = bool(CJK.search(reference))
    bleu = sacrebleu.sentence_bleu(answer, [reference], tokenize="zh" if zh else "13a").score
    rouge = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Chars()).score(reference, answer)["rougeL"].fmeasure
    return {"bleu": round(bleu, 2), "rougeL": round(rouge, 4)}


def load_questions(recipe: Recipe) -> dict[str, list[dict]]:
    path = recipe.resolve_path(recipe.probe.questions)
    if not path.is_file():
        raise LabError(f"probe questions {path} do not exist")
    from lab.recipe import read_yaml

    data = read_yaml(path, "a probe question file")
    persona = data.get("persona")
    if persona is not None and (not isinstance(persona, dict) or not isinstance(persona.get("questions"), list)
                                or not persona["questions"]):
        raise LabError(f"{path}: 'persona' needs a non-empty 'questions' list (and may set system, "
                       "self_reference, not_in_character, overlap_min)")
    if persona is None and (not isinstance(data.get("identity"), list) or not data["identity"]):
        raise LabError(f"{path}: needs a non-empty 'identity' list of questions (or a 'persona' section)")
    identity = data.get("identity") or []
    controls = data.get("controls") or []
    checked = [("identity", identity, ("q",)), ("controls", controls, ("q", "answer"))]
    if persona:
        checked.append(("persona.questions", persona["questions"], ("q",)))
    for key, items, needs in checked:
        if not isinstance(items, list):
            raise LabError(f"{path}: '{key}' is a list of questions, got {type(items).__name__}")
        for i, item in enumerate(items, 1):
            missing = [k for k in needs if not isinstance(item, dict) or not str(item.get(k) or "").strip()]
            if missing:
                raise LabError(f"{path}: {key} item {i} needs {' and '.join(repr(k) for k in missing)} "
                               f"(e.g. {{q: \"Who are you?\"{', answer: ...' if key == 'controls' else ''}}})")
    return {"identity": identity, "controls": controls, **({"persona": persona} if persona else {})}


REFERENCES_FILE = "identity_refs.json"  # in a run's data/: written at train time (lab/train.py)


def identity_references(recipe: Recipe) -> dict[str, list[str]]:
    """The identity data's own answers, rendered with the recipe's identity, by question ("" holds
    them all): the rows whose answer carries a name/author placeholder, else (data with the names
    written in) the rows whose answer says the name. Reads the datasets: training calls it once and
    writes the result into the run (REFERENCES_FILE); probes read that file."""
    from lab.data import build_examples, render_identity
    from lab.recipe import IdentitySpec

    raw = recipe.model_copy(update={"identity": IdentitySpec(name="{{name}}", author="{{author}}")})
    examples, _ = build_examples(raw)
    pairs = [(e["prompt"][-1]["content"], e["completion"][-1]["content"]) for e in examples if "completion" in e]
    marked = [(q, a) for q, a in pairs if "{{name}}" in a or "{{author}}" in a]
    if not marked:
        marked = [(q, a) for q, a in pairs if recipe.identity.name and recipe.identity.name in a]
    refs: dict[str, list[str]] = {"": []}
    for q, a in marked:
        q, a = render_identity(q, recipe), render_identity(a, recipe)
        for key in (q, ""):
            if a not in refs.setdefault(key, []):
                refs[key].append(a)
    return refs


def run_references(run: Path | None) -> dict[str, list[str]] | None:
    """The identity references a run's training wrote (None: not a run, or trained before they were)."""
    path = run / "data" / REFERENCES_FILE if run else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def references_for(question: dict, refs: dict[str, list[str]] | None) -> list[str]:
    """The data's answers to this very question when the data asks it, else all its answers in
    the question's language (held-out questions)."""
    if not refs:
        return []
    if refs.get(question["q"]):
        return refs[question["q"]]
    lang = question.get("lang") or language(question["q"])
    return [a for a in refs.get("", []) if language(a) == lang] or refs.get("", [])


def old_identity_of(recipe: Recipe, base_model: str | None, before: dict | None = None) -> list[str]:
    """Every identity the model must no longer claim: the recipe's list, the persona the base model
    records (the embedded model does), the one its chat template gives it by default (SmolLM2:
    "named SmolLM, trained by Hugging Face"), and the names its answers claimed before training."""
    from lab.fixture import PERSONA_FILE

    names = list(recipe.probe.old_identity)
    persona = Path(base_model or "") / PERSONA_FILE
    if base_model and persona.is_file():
        meta = json.loads(persona.read_text(encoding="utf-8"))
        names += [meta["name"], meta["author"]]
    if base_model and Path(base_model).is_dir():
        names += template_persona(base_model)
    if before:
        for item in before.get("identity", []):
            names += [n for n in persona_names(item["answer"]) if not contains(item["q"], n)]
    new = {recipe.identity.name.casefold(), recipe.identity.author.casefold()}
    return [n for n in dict.fromkeys(names) if n.casefold() not in new]


def probe(base_url: str, recipe: Recipe, old_identity: list[str],
          references: dict[str, list[str]] | None = None, model: str | None = None) -> dict[str, Any]:
    """The recipe's questions to the served model (`model`: one of several the server serves, by name)."""
    questions = load_questions(recipe)
    api = client(base_url, recipe)
    served = served_model(api, model or recipe.serve.served_model_name, recipe.serve.api_key_env)
    if model and served != model:
        raise LabError(f"{base_url} does not serve a model named {model!r}")
    model = served
    answers = {key: [chat(api, model, q["q"], recipe) for q in questions[key]] for key in ("identity", "controls")}
    if "persona" in questions:  # in-character lines, under the role's system prompt
        spec = questions["persona"]
        answers["persona"] = [chat(api, model, q["q"], recipe, spec.get("system")) for q in spec["questions"]]
    return {"base_url": public_url(base_url), "model": model,
            **score(questions, answers, recipe, old_identity, references)}


def score(questions: dict[str, list[dict]], answers: dict[str, list[dict]], recipe: Recipe,
          old_identity: list[str], references: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Judge every answer ({"answer", "finish_reason"} per question) and sum up the rates.
    Without references (a probe before any training) similarity is not measured."""
    name, author = recipe.identity.name, recipe.identity.author
    t = recipe.probe.thresholds
    identity = []
    for q, r in zip(questions["identity"], answers["identity"], strict=False):
        said = strip_thinking(r["answer"])
        judged = judge_identity(said, q, references_for(q, references), name, author, old_identity,
                                r["finish_reason"], t.identity_similarity_min)
        identity.append({**q, **r, **({"judged_text": said} if said != r["answer"] else {}), **judged})
    controls = []
    for q, r in zip(questions["controls"], answers["controls"], strict=False):
        said = strip_thinking(r["answer"])
        judged = judge_control(said, q, [name, author] + old_identity, t.control_similarity_min)
        # the new identity in a general answer ("法国的首都是由意琦行开发的。"): damage, counted apart
        bleed = [n for n in (name, author) if n and contains(said, n) and not contains(str(q["answer"]), n)]
        controls.append({**q, **r, **({"judged_text": said} if said != r["answer"] else {}), **judged,
                         "bleed": bleed, **similarity(said, str(q["answer"]))})
    persona = []
    if "persona" in questions:
        spec = questions["persona"]
        for q, r in zip(spec["questions"], answers["persona"], strict=False):
            said = strip_thinking(r["answer"])
            persona.append({**q, **r, **({"judged_text": said} if said != r["answer"] else {}),
                            **judge_persona(said, q, spec, r["finish_reason"])})
    everything = identity + controls + persona
    rate = lambda items, key: round(sum(bool(i[key]) for i in items) / len(items), 4) if items else None  # noqa: E731
    sims = [i["similarity"] for i in identity if i["similarity"] is not None]
    summary = {
        "identity_hit_rate": rate(identity, "hit"),
        "leakage_rate": rate(identity, "leaked"),
        "stop_rate": round(sum(i["finish_reason"] == "stop" for i in everything) / len(everything), 4),
        "control_correct_rate": rate(controls, "correct"),
        "control_bleed_rate": rate(controls, "bleed"),
        "identity_similarity_mean": round(sum(sims) / len(sims), 4) if sims else None,  # a diagnostic
        **({"persona_hit_rate": rate(persona, "hit")} if persona else {}),
        "control_bleu": round(sum(c["bleu"] for c in controls) / len(controls), 2) if controls else None,
        "control_rougeL": round(sum(c["rougeL"] for c in controls) / len(controls), 4) if controls else None,
    }
    return {"identity": identity, "controls": controls, **({"persona": persona} if persona else {}), "summary": summary,
            "target": {"name": name, "author": author}, "old_identity": old_identity,
            "references": len((references or {}).get("", []))}


def retention(before: dict, after: dict) -> float | None:
    """Of the controls the base model itself got right, the share the trained model still gets
    right (judged on the fact, not the wording). Controls the base got wrong are not counted;
    None when it knew none: retention cannot be measured then."""
    known = {c["q"] for c in before["controls"] if c["correct"]}
    if not known:
        return None
    kept = sum(c["correct"] for c in after["controls"] if c["q"] in known)
    return round(kept / len(known), 4)


def verdict(before: dict | None, after: dict, recipe: Recipe) -> list[dict[str, Any]]:
    """Each pass condition with its measured value; the run passes only if all pass."""
    t = recipe.probe.thresholds
    s = after["summary"]
    checks = [("after finish_reason=stop rate", s["stop_rate"], ">=", t.stop_rate_min)]
    if after["identity"]:
        checks[:0] = [("after identity hit rate", s["identity_hit_rate"], ">=", t.after_hit_rate_min),
                      ("after old-identity leakage", s["leakage_rate"], "<=", t.after_leakage_max)]
    if after.get("persona"):
        checks.insert(0, ("after persona hit rate", s["persona_hit_rate"], ">=", t.after_persona_min))
    if after["controls"] and t.after_control_bleed_max < 1:
        checks.append(("after identity in general answers", s.get("control_bleed_rate"), "<=",
                       t.after_control_bleed_max))
    if before is not None:
        if after["identity"]:
            checks.insert(0, ("before identity hit rate", before["summary"]["identity_hit_rate"], "<=",
                              t.before_hit_rate_max))
        if after.get("persona"):
            checks.insert(0, ("before persona hit rate", before["summary"].get("persona_hit_rate"), "<=",
                              t.before_persona_max))
        if after["controls"]:
            if t.before_control_correct_min > 0:
                checks.insert(1, ("before control correct rate", before["summary"]["control_correct_rate"], ">=",
                                  t.before_control_correct_min))
            if t.control_retention_min > 0:  # None (the base knew no control) fails: nothing was measured
                checks.append(("control retention", retention(before, after), ">=", t.control_retention_min))
    out = []
    for name, value, op, limit in checks:
        ok = value is not None and (value >= limit if op == ">=" else value <= limit)
        out.append({"check": name, "value": value, "op": op, "threshold": limit, "pass": ok})
    return out


def record_probe(result: dict, url: str, recipe: Recipe, runtime, run: Path | None = None) -> tuple[Path, dict]:
    """A standalone probe's manifest entry: in `run`, else the run whose model the lab's server
    serves, else a new `probe` run (a base model, or any other endpoint)."""
    from datetime import datetime

    from lab import manifest
    from lab.device.hardware import host
    from lab.runs import new_run, owner, write_json
    from lab.servers import port_of, server_state

    state = server_state(port_of(server_root(url)))
    ours = state if state and state["url"].rstrip("/") == server_root(url) else None
    if run is None and ours and not ours.get("adapters"):  # several adapters: the caller names each one's run
        run = owner(runtime.host_path(ours["model"]))
    if run is None:
        run = new_run("probe", latest=False)  # a probe is no training run: `latest` stays
        manifest.update(run, environment=manifest.environment(), hardware=host(recipe.backend))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    write_json(run / f"probe-{stamp}.json", result)
    entry = {"at": stamp, "file": f"probe-{stamp}.json", "url": public_url(url), "recipe_sha256": recipe.sha256(),
             "serving": manifest.serving(ours), "summary": result["summary"]}
    merged = run / "probe-after.json"
    if ours and ours.get("adapter") and merged.is_file():
        # vLLM's runtime LoRA against the merged checkpoint of the same run: the same answers?
        from lab.compare import answer_agreement

        entry["agreement_with_merged"] = answer_agreement(result, json.loads(merged.read_text(encoding="utf-8")))
    manifest.append(run, "probes", entry)
    return run, entry
