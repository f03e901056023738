"""Probe: ask a served model who it is, and general questions, through the OpenAI API.

Works against any OpenAI-compatible server (BASE_URL). Greedy and seeded (pitfall 5), with a
bounded max_tokens so a model that never learned to stop shows up as finish_reason=length
(pitfall 2). Every answer is judged strictly, with its reasons recorded (judge_identity,
judge_control): an identity answer is a hit only if it names the new name (and the new maker
when the question is about the maker), names no old identity, speaks the question's language,
and is well-formed: close, by character-level similarity, to one of the identity data's own
answers rendered with the identity, with no name run into other letters, no repeated fragment
and no words of the other language. A control is correct only if it is close to its reference
and carries no identity name the reference lacks. BLEU / ROUGE-L are kept as extra measures.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from lab.errors import LabError
from lab.recipe import Recipe

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

    # The lab's own key (serve.api_key_env, LAB_API_KEY by default), from the environment: a user's
    # OPENAI_API_KEY is never sent to whatever BASE_URL names.
    return openai.OpenAI(base_url=server_root(base_url) + "/v1", api_key=api_key(recipe) or "EMPTY",
                         max_retries=0, timeout=recipe.probe.timeout_s)


def served_model(api, prefer: str | None = None, key_env: str = "LAB_API_KEY") -> str:
    import openai

    try:
        models = api.models.list().data
    except openai.APIConnectionError:
        raise LabError(f"no server answers at {api.base_url}; start one with `make serve`") from None
    except openai.AuthenticationError:
        raise LabError(f"{api.base_url} refused the API key; set {key_env} to the key the server was started "
                       "with") from None
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


def chat(api, model: str, question: str, recipe: Recipe) -> dict[str, Any]:
    import openai

    try:
        r = api.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], temperature=0.0,
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


def judge_identity(answer: str, question: dict, references: list[str], name: str, author: str,
                   old_identity: list[str], min_similarity: float) -> dict[str, Any]:
    """Whether one identity answer is a hit, and every reason it is not."""
    reasons = []
    lang = question.get("lang") or language(question["q"])
    if name not in answer:
        reasons.append(f"does not say the name {name!r}")
    if question.get("about", "name") in ("maker", "both") and author not in answer:
        reasons.append(f"does not say the maker {author!r}")
    leaked = leaked_names(answer, question["q"], old_identity)
    if leaked:
        reasons.append("names the old identity " + ", ".join(repr(n) for n in leaked))
    for part in (name, author):
        glued = _glued(answer, part) if part else None
        if glued:
            reasons.append(f"{part!r} runs into other letters: {glued!r}")
    # The rest of the answer, without the names (a name may be in any script), in the question's language?
    rest = _blank(answer, name, author)
    for n in old_identity + [w for w in LATIN_WORD.findall(question["q"])]:
        rest = rest.replace(n, "")
    if lang == "en" and CJK.search(rest):
        reasons.append(f"Chinese in an answer to an English question: {''.join(CJK.findall(rest))!r}")
    if lang == "zh":
        if not CJK.search(rest):
            reasons.append("not in Chinese")
        known = {w for ref in references for w in LATIN_WORD.findall(_blank(ref, name, author))}
        foreign = [w for w in LATIN_WORD.findall(rest) if w not in known]
        if foreign:
            reasons.append(f"English words in an answer to a Chinese question: {' '.join(foreign)!r}")
    similarity_, closest = None, None
    if references:
        similarity_, closest = max((char_similarity(answer, r), r) for r in references)
        if similarity_ < min_similarity:
            reasons.append(f"similarity {similarity_} < {min_similarity} to the closest data answer {closest!r}")
        extra = _repeats(rest) - _repeats(_blank(closest, name, author))
        if extra:
            reasons.append("repeats " + ", ".join(repr(x) for x in sorted(extra)))
        for part in (name, author):
            if part and answer.count(part) > closest.count(part):
                reasons.append(f"says {part!r} {answer.count(part)} times (the data answer: {closest.count(part)})")
    return {"hit": not reasons, "reasons": reasons, "leaked": leaked, "similarity": similarity_, "closest": closest}


def judge_control(answer: str, question: dict, identity_names: list[str], min_similarity: float) -> dict[str, Any]:
    """Whether a general-knowledge answer matches its reference, and why not."""
    reference = str(question["answer"])
    reasons = []
    sim = char_similarity(answer, reference)
    if sim < min_similarity:
        reasons.append(f"similarity {sim} < {min_similarity} to the reference {reference!r}")
    expect = str(question.get("expect", ""))
    if expect and expect not in answer:
        reasons.append(f"does not contain {expect!r}")
    stray = [n for n in identity_names if n and contains(answer, n) and not contains(reference, n)]
    if stray:
        reasons.append("brings in " + ", ".join(repr(n) for n in stray))
    return {"correct": not reasons, "reasons": reasons, "char_similarity": sim}


def identity_references(recipe: Recipe) -> dict[str, list[str]]:
    """The identity data's own answers, rendered with the recipe's identity, by question ("" holds
    them all): the rows whose answer carries a {{name}} or {{author}} placeholder, else (data with
    the names written in) the rows whose answer says the name."""
    from lab.data import build_examples, render_identity
    from lab.recipe import IdentitySpec

    raw = recipe.model_copy(update={"identity": IdentitySpec(name="{{name}}", author="{{author}}")})
    examples, _ = build_examples(raw)
    pairs = [(e["prompt"][-1]["content"], e["completion"][-1]["content"]) for e in examples]
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


def references_for(question: dict, refs: dict[str, list[str]]) -> list[str]:
    """The data's answers to this very question when the data asks it, else all its answers in
    the question's language (held-out questions)."""
    if refs.get(question["q"]):
        return refs[question["q"]]
    lang = question.get("lang") or language(question["q"])
    return [a for a in refs.get("", []) if language(a) == lang] or refs.get("", [])


def leaked_names(answer: str, question: str, old_identity: list[str]) -> list[str]:
    """Old names in an answer, except ones the question itself brought up ("Are you ChatGPT?")."""
    return [n for n in old_identity if contains(answer, n) and not contains(question, n)]


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
    if not isinstance(data.get("identity"), list) or not data["identity"]:
        raise LabError(f"{path}: needs a non-empty 'identity' list of questions")
    controls = data.get("controls") or []
    for key, items, needs in (("identity", data["identity"], ("q",)), ("controls", controls, ("q", "answer"))):
        if not isinstance(items, list):
            raise LabError(f"{path}: '{key}' is a list of questions, got {type(items).__name__}")
        for i, item in enumerate(items, 1):
            missing = [k for k in needs if not isinstance(item, dict) or not str(item.get(k) or "").strip()]
            if missing:
                raise LabError(f"{path}: {key} item {i} needs {' and '.join(repr(k) for k in missing)} "
                               f"(e.g. {{q: \"Who are you?\"{', answer: ...' if key == 'controls' else ''}}})")
    return {"identity": data["identity"], "controls": controls}


def old_identity_of(recipe: Recipe, base_model: str | None) -> list[str]:
    """The recipe's list plus the persona the base model records (the embedded model does)."""
    from lab.fixture import PERSONA_FILE

    names = list(recipe.probe.old_identity)
    persona = Path(base_model or "") / PERSONA_FILE
    if base_model and persona.is_file():
        meta = json.loads(persona.read_text(encoding="utf-8"))
        names += [meta["name"], meta["author"]]
    new = {recipe.identity.name.casefold(), recipe.identity.author.casefold()}
    return [n for n in dict.fromkeys(names) if n.casefold() not in new]


def probe(base_url: str, recipe: Recipe, old_identity: list[str]) -> dict[str, Any]:
    questions = load_questions(recipe)
    api = client(base_url, recipe)
    model = served_model(api, recipe.serve.served_model_name, recipe.serve.api_key_env)
    answers = {key: [chat(api, model, q["q"], recipe) for q in questions[key]] for key in ("identity", "controls")}
    return {"base_url": public_url(base_url), "model": model, **score(questions, answers, recipe, old_identity)}


def score(questions: dict[str, list[dict]], answers: dict[str, list[dict]], recipe: Recipe,
          old_identity: list[str]) -> dict[str, Any]:
    """Judge every answer ({"answer", "finish_reason"} per question) and sum up the rates."""
    name, author = recipe.identity.name, recipe.identity.author
    t = recipe.probe.thresholds
    refs = identity_references(recipe)
    identity = []
    for q, r in zip(questions["identity"], answers["identity"]):
        judged = judge_identity(r["answer"], q, references_for(q, refs), name, author, old_identity,
                                t.identity_similarity_min)
        identity.append({**q, **r, **judged})
    controls = []
    for q, r in zip(questions["controls"], answers["controls"]):
        judged = judge_control(r["answer"], q, [name, author] + old_identity, t.control_similarity_min)
        controls.append({**q, **r, **judged, **similarity(r["answer"], str(q["answer"]))})
    everything = identity + controls
    rate = lambda items, key: round(sum(bool(i[key]) for i in items) / len(items), 4) if items else None  # noqa: E731
    summary = {
        "identity_hit_rate": rate(identity, "hit"),
        "leakage_rate": rate(identity, "leaked"),
        "stop_rate": round(sum(i["finish_reason"] == "stop" for i in everything) / len(everything), 4),
        "control_correct_rate": rate(controls, "correct"),
        "control_bleu": round(sum(c["bleu"] for c in controls) / len(controls), 2) if controls else None,
        "control_rougeL": round(sum(c["rougeL"] for c in controls) / len(controls), 4) if controls else None,
    }
    return {"identity": identity, "controls": controls, "summary": summary,
            "target": {"name": name, "author": author}, "old_identity": old_identity,
            "references": len(refs[""])}


def retention(before: dict, after: dict) -> float | None:
    """Of the controls the model got right before training, the share it still gets right."""
    known = {c["q"] for c in before["controls"] if c["correct"]}
    if not known:
        return after["summary"]["control_correct_rate"]
    kept = sum(c["correct"] for c in after["controls"] if c["q"] in known)
    return round(kept / len(known), 4)


def verdict(before: dict | None, after: dict, recipe: Recipe) -> list[dict[str, Any]]:
    """Each pass condition with its measured value; the run passes only if all pass."""
    t = recipe.probe.thresholds
    s = after["summary"]
    checks = [
        ("after identity hit rate", s["identity_hit_rate"], ">=", t.after_hit_rate_min),
        ("after old-identity leakage", s["leakage_rate"], "<=", t.after_leakage_max),
        ("after finish_reason=stop rate", s["stop_rate"], ">=", t.stop_rate_min),
    ]
    if before is not None:
        checks.insert(0, ("before identity hit rate", before["summary"]["identity_hit_rate"], "<=", t.before_hit_rate_max))
        if after["controls"]:
            if t.before_control_correct_min > 0:
                checks.insert(1, ("before control correct rate", before["summary"]["control_correct_rate"], ">=",
                                  t.before_control_correct_min))
            checks.append(("control retention", retention(before, after), ">=", t.control_retention_min))
    out = []
    for name, value, op, limit in checks:
        ok = value is not None and (value >= limit if op == ">=" else value <= limit)
        out.append({"check": name, "value": value, "op": op, "threshold": limit, "pass": ok})
    return out


def record_probe(result: dict, url: str, recipe: Recipe, runtime) -> tuple[Path, dict]:
    """A standalone probe's manifest entry: in the run whose model the lab's server serves, else
    in a new `probe` run (a base model, or any other endpoint)."""
    from datetime import datetime

    from lab import manifest
    from lab.runs import new_run, owner, write_json
    from lab.serve import port_of, server_state

    state = server_state(port_of(server_root(url)))
    ours = state if state and state["url"].rstrip("/") == server_root(url) else None
    run = owner(runtime.host_path(ours["model"])) if ours else None
    if run is None:
        run = new_run("probe", latest=False)  # a probe is no training run: `latest` stays
        manifest.update(run, environment=manifest.environment(), hardware=manifest.hardware(recipe.backend))
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
