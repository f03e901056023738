"""Probe: ask a served model who it is, and general questions, through the OpenAI API.

Works against any OpenAI-compatible server (BASE_URL). Greedy and seeded (pitfall 5), with a
bounded max_tokens so a model that never learned to stop shows up as finish_reason=length
(pitfall 2). Identity: hit rate (new name and author both present) and leakage of old names;
controls: correct (the expected key is present), retention against the "before" answers, and
BLEU / ROUGE-L against the references (character level for Chinese).
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


def client(base_url: str, timeout: float):
    import openai

    # A local vLLM ignores the key; a remote endpoint reads it from the environment, never a file.
    return openai.OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"),
                         max_retries=0, timeout=timeout)


def served_model(api, prefer: str | None = None) -> str:
    import openai

    try:
        models = api.models.list().data
    except openai.APIConnectionError:
        raise LabError(f"no server answers at {api.base_url}; start one with `make serve`") from None
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
        raise LabError(f"lost the server at {api.base_url} (see runs/latest/server.log)") from None
    except openai.APIStatusError as e:
        raise LabError(f"server refused the request: HTTP {e.status_code} {e.message}") from None
    choice = r.choices[0]
    return {"answer": (choice.message.content or "").strip(), "finish_reason": choice.finish_reason}


def ask(base_url: str, question: str, recipe: Recipe) -> dict[str, Any]:
    api = client(base_url, recipe.probe.timeout_s)
    return chat(api, served_model(api, recipe.serve.served_model_name), question, recipe)


def contains(text: str, needle: str) -> bool:
    return needle.casefold() in text.casefold()


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
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not data.get("identity"):
        raise LabError(f"{path}: needs a non-empty 'identity' list of questions")
    return {"identity": data["identity"], "controls": data.get("controls") or []}


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
    api = client(base_url, recipe.probe.timeout_s)
    model = served_model(api, recipe.serve.served_model_name)
    name, author = recipe.identity.name, recipe.identity.author
    identity = []
    for q in questions["identity"]:
        r = chat(api, model, q["q"], recipe)
        identity.append({**q, **r, "hit": contains(r["answer"], name) and contains(r["answer"], author),
                         "leaked": leaked_names(r["answer"], q["q"], old_identity)})
    controls = []
    for q in questions["controls"]:
        r = chat(api, model, q["q"], recipe)
        controls.append({**q, **r, "correct": contains(r["answer"], str(q.get("expect", q["answer"]))),
                         **similarity(r["answer"], str(q["answer"]))})
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
    return {"base_url": base_url, "model": model, "identity": identity, "controls": controls, "summary": summary,
            "target": {"name": name, "author": author}, "old_identity": old_identity}


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
    from lab.serve import server_state

    state = server_state()
    ours = state if state and state["url"].rstrip("/") == url.rstrip("/") else None
    run = owner(runtime.host_path(ours["model"])) if ours else None
    if run is None:
        run = new_run("probe")
        manifest.update(run, environment=manifest.environment(), hardware=manifest.hardware(recipe.backend))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    write_json(run / f"probe-{stamp}.json", result)
    entry = {"at": stamp, "file": f"probe-{stamp}.json", "url": url, "recipe_sha256": recipe.sha256(),
             "serving": manifest.serving(ours), "summary": result["summary"]}
    merged = run / "probe-after.json"
    if ours and ours.get("adapter") and merged.is_file():
        # vLLM's runtime LoRA against the merged checkpoint of the same run: the same answers?
        from lab.compare import answer_agreement

        entry["agreement_with_merged"] = answer_agreement(result, json.loads(merged.read_text(encoding="utf-8")))
    manifest.append(run, "probes", entry)
    return run, entry
