"""Template parity (docs/pitfalls.md: template drift): the ids training used must be the ids the server renders.

train.py saved, for a few training conversations, the exact token ids TRL trained on. Here
vLLM's own `/tokenize` renders the same messages with the same chat-template kwargs; any
difference (another template, an injected system prompt, thinking tags) fails loudly.
"""

from __future__ import annotations

import json
from pathlib import Path

from lab.errors import LabError
from lab.runs import read_json


def wire_messages(messages: list[dict]) -> list[dict]:
    """Messages as an OpenAI client sends them: a tool call's arguments are JSON text, which vLLM
    parses back into the object training rendered (key order kept)."""
    return [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.dumps(
        c["function"]["arguments"], ensure_ascii=False)}} for c in m["tool_calls"]]} if m.get("tool_calls") else m
        for m in messages]


def _render(url: str, model: str, messages: list[dict], kwargs: dict, generation_prompt: bool,
            headers: dict[str, str], tools: list[dict] | None = None) -> list[int]:
    import httpx

    body = {"model": model, "messages": wire_messages(messages), "add_generation_prompt": generation_prompt,
            "chat_template_kwargs": kwargs, "add_special_tokens": False, **({"tools": tools} if tools else {})}
    try:
        r = httpx.post(f"{url}/tokenize", json=body, headers=headers, timeout=30.0)
        tokens = r.json().get("tokens") if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError) as e:  # the server died, hung, or is not vLLM
        raise LabError(f"{url}/tokenize did not answer ({type(e).__name__}); see the server's log") from None
    if r.status_code != 200:
        raise LabError(f"{url}/tokenize refused the chat render: HTTP {r.status_code} {r.text[:200]}")
    if not isinstance(tokens, list):
        raise LabError(f"{url}/tokenize answered without token ids: is this a vLLM server?")
    return tokens


def parity_result(url: str, model: str, run: Path, headers: dict[str, str] | None = None) -> dict:
    """The server's rendering of the run's parity.json conversations against the ids training used:
    {"samples", "match", "problem"}; match is None when there is no sample to compare (each one
    reached train.max_length). A server that cannot render is a LabError."""
    samples = read_json(run / "parity.json", "make train")
    return compare_renderings(samples, lambda messages, kwargs, generation_prompt, tools=None: _render(
        url, model, messages, kwargs, generation_prompt, headers or {}, tools))


def compare_renderings(samples: list[dict], render) -> dict:
    """Each sample's prompt and whole conversation, rendered by `render(messages, kwargs,
    generation_prompt, tools)`, against the ids training used; then the prompt once more with no kwargs
    sent, as a client that sends none gets it (vLLM's --default-chat-template-kwargs apply). The
    first difference is the problem."""
    def drift(problem: str) -> dict:
        return {"samples": len(samples), "match": False, "problem": problem}

    for i, s in enumerate(samples):
        tools = s.get("tools")
        served_prompt = render(s["prompt"], s["chat_template_kwargs"], True, tools)
        if served_prompt != s["prompt_ids"]:
            return drift(f"template drift: training rendered prompt {i} as {len(s['prompt_ids'])} tokens, the server "
                         f"as {len(served_prompt)}; first difference at token "
                         f"{_first_diff(served_prompt, s['prompt_ids'])} (check chat_template_kwargs and the template)")
        served_full = render(s["prompt"] + s["completion"], s["chat_template_kwargs"], False, tools)
        if served_full != s["input_ids"]:
            return drift(f"template drift: conversation {i} differs from the trained ids at token "
                         f"{_first_diff(served_full, s['input_ids'])}")
        by_default = render(s["prompt"], {}, True, tools)
        if by_default != s["prompt_ids"]:
            return drift(f"template drift: with its default chat_template_kwargs the server renders prompt {i} "
                         f"unlike training (first difference at token {_first_diff(by_default, s['prompt_ids'])}): "
                         f"it was started with other defaults than training's {s['chat_template_kwargs']}")
    return {"samples": len(samples), "match": True if samples else None, "problem": None}


def check_parity(url: str, model: str, run: Path, headers: dict[str, str] | None = None) -> dict:
    """parity_result, with drift raised as a LabError (the e2e loop stops there)."""
    result = parity_result(url, model, run, headers)
    if result["match"] is False:
        raise LabError(result["problem"])
    return result


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
