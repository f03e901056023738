"""Datasets: every supported format becomes TRL conversational prompt/completion.

prompt = [system?, user, assistant, ..., user], completion = [assistant]. TRL then masks the
prompt, so the loss falls on the assistant's reply only. A conversation with several assistant
turns becomes one example per turn (`train_on: all`, the default, as LLaMA-Factory trains every
turn), each prompt holding the turns before it: the template renders that history exactly as the
serving engine renders it for the same context (reasoning stripped from past turns where the
template does so), so every example keeps train/serve token parity. `train_on: last` trains only
the final reply (LLaMA-Factory's mask_history). Formats: alpaca (instruction/input/output,
optional system and history), messages (OpenAI `messages`, ShareGPT `conversations` with
from/value) and prompt/completion (trained as written); local JSON, JSONL and Parquet, or a hub
dataset id.

Tool calling: a row's `tools` (OpenAI's list, or LLaMA-Factory's JSON string of function
signatures) goes with each of its examples; an assistant turn with `tool_calls` (OpenAI) or a
ShareGPT `function_call` turn is a reply like any other (the model learns to make the call), a
`tool`/`observation` turn is context. Messages are kept as the server hands them to the template
(vLLM parses each call's JSON `arguments` into an object, so do we), and such data is tokenized
here (tokenize_in_lab) with the model's own template's tool support, refused where the template
drops the tools or the calls.

Preference data (`chosen`/`rejected`, in TRL's, LLaMA-Factory's alpaca or ShareGPT shape) becomes
prompt/chosen/rejected pairs for the recipe's DPO stage (lab/dpo.py), never SFT examples.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from lab.errors import LabError
from lab.recipe import DatasetSpec, Recipe

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "model": "assistant",
                  # LLaMA-Factory's tool turns: the model's call, and the tool's answer
                  "function_call": "assistant", "observation": "tool"}


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a local file; malformed input names the file (and line, for JSONL)."""
    try:
        return _read_rows(path)
    except UnicodeDecodeError as e:  # GBK exports of Chinese data are common
        raise LabError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); convert it, "
                       f"e.g. `iconv -f GBK -t UTF-8 {path.name}`") from None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LabError(f"{path}:{lineno}: bad JSON line ({e.msg})") from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LabError(f"{path}:{e.lineno}: bad JSON ({e.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise LabError(f"{path}: expected a JSON list of records")
        return data
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise LabError(f"{path}: not a readable Parquet file ({e})") from None
    raise LabError(f"{path}: unknown file type {suffix!r}; use .json, .jsonl or .parquet")


def load_source(spec: DatasetSpec, recipe: Recipe) -> tuple[list[dict[str, Any]], str]:
    """(rows, where) for a dataset spec: a local file, else a hub dataset id."""
    local = recipe.resolve_path(spec.path)
    if local.exists():
        rows, where = read_rows(local), str(local)
    elif "/" in spec.path and not spec.path.startswith((".", "/", "~")) and local.suffix == "":
        try:
            import datasets

            rows = list(datasets.load_dataset(spec.path, split=spec.split))
        except Exception as e:  # offline, missing, gated: all the same to the user
            raise LabError(f"dataset {spec.path!r}: cannot load from the hub ({str(e).splitlines()[0]})") from None
        where = f"hub:{spec.path}"
    else:
        raise LabError(f"dataset file {local} does not exist (path is relative to {recipe.source})")
    if spec.limit:
        rows = rows[: spec.limit]
    if not rows:
        raise LabError(f"{where}: dataset is empty")
    return rows, where


MEDIA_FIELDS = ("images", "videos", "audios", "image", "video", "audio")
MEDIA_PARTS = {"image", "image_url", "video", "video_url", "audio", "input_audio", "audio_url"}
MEDIA_TAGS = re.compile(r"<(image|video|audio)>")
MULTIMODAL = ("multimodal data: the lab fine-tunes text-only chat models and would train the text without "
              "the media; drop the media fields and <image>-style tags to train the text alone")


def refuse_other_shapes(row: dict[str, Any]) -> None:
    """Shapes the peers ship that SFT would train wrongly or silently half: one line each, saying
    what the data is and what to do instead."""
    if "kto_tag" in row or isinstance(row.get("label"), bool):
        raise LabError("KTO data (a true/false label per answer): SFT would train the undesirable answers too; "
                       "keep only the rows labelled true, without the label field")
    if any(row.get(f) for f in MEDIA_FIELDS) or MEDIA_TAGS.search(json.dumps(row, ensure_ascii=False, default=str)):
        raise LabError(MULTIMODAL)
    if "text" in row and not ({"messages", "conversations", "prompt", "instruction"} & set(row)):
        raise LabError("raw text (a `text` field): that is pretraining data, and the lab trains chat replies; "
                       "make question/answer rows, or build them from your fields with `columns:`")


def detect_format(row: dict[str, Any]) -> str:
    if "chosen" in row and "rejected" in row:
        return "preference"
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    raise LabError(f"unknown format with fields {sorted(row)}; expected alpaca, messages, "
                   "sharegpt, prompt/completion or chosen/rejected, or map fields with `columns:`")


def apply_columns(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Rename fields, or build one from a template over several fields."""
    if not columns:
        return row
    out = dict(row)
    for ours, theirs in columns.items():
        if "{" in theirs:
            try:
                out[ours] = theirs.format(**row)
            except KeyError as e:
                raise LabError(f"column template for {ours!r} needs field {e.args[0]!r}, "
                               f"row has {sorted(row)}") from None
            except (ValueError, IndexError) as e:  # a stray brace, or a positional {0}
                raise LabError(f"column template {theirs!r} for {ours!r} is not a valid template ({e}); name "
                               "fields as {Field}, and write a literal brace as {{ or }}") from None
        else:
            if theirs not in row:
                raise LabError(f"column mapping {ours}: {theirs!r} names a missing field; row has {sorted(row)}")
            out[ours] = row[theirs]
    return out


def _need(row: dict, field: str) -> Any:
    value = row.get(field)
    if value is None or (isinstance(value, str) and not value.strip() and field != "input"):
        raise LabError(f"missing or empty field {field!r}")
    return value


def _text(content: Any) -> str | None:
    """A turn's text: a string, or a list of text parts (OpenAI's {"type": "text", "text"}, LLaMA-
    Factory v1's {"type": "text", "value"}) joined by newlines, as vLLM joins them for a template
    that takes strings. None when it is neither."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        return None
    kinds = {p.get("type", "text") for p in content} - {"text"}
    if kinds:
        raise LabError(f"a turn holds {sorted(kinds)[0]!r} parts: " + (
            MULTIMODAL if kinds & MEDIA_PARTS else "only text parts are trained"))
    texts = [p.get("text", p.get("value")) for p in content]
    return "\n".join(texts) if all(isinstance(t, str) for t in texts) else None


def _as_messages(turns: list, fmt: str) -> list[dict[str, Any]]:
    """Turns as {role, content} (+ tool_calls on a call, tool_call_id/name on a tool's answer); an
    assistant turn keeps its `loss_weight` (0: context only)."""
    field = "conversations" if fmt == "sharegpt" else "messages"
    if not isinstance(turns, list):
        raise LabError(f"{field!r} must be a list of turns, got {type(turns).__name__}")
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise LabError(f"each turn of {field!r} is a mapping with "
                           f"{'from/value' if fmt == 'sharegpt' else 'role/content'}, got {turn!r}"[:300])
        calls = None
        if fmt == "sharegpt":
            kind = str(turn.get("from", "")).lower()
            role = SHAREGPT_ROLES.get(kind)
            if kind == "function_call":  # its value is the call: {"name", "arguments"}, or a list of them
                calls, content = _sharegpt_calls(turn.get("value")), ""
            else:
                content = _text(turn.get("value"))
        else:
            role, content = turn.get("role"), turn.get("content")
            if role == "assistant" and turn.get("tool_calls"):
                calls, content = _openai_calls(turn["tool_calls"]), "" if content is None else content
            content = _text(content)
        if role not in ("system", "user", "assistant", "tool") or content is None:
            raise LabError(f"bad turn {turn!r}"[:300] + ": needs a system/user/assistant/tool role and text content")
        message = {"role": role, "content": content}
        if calls:
            message["tool_calls"] = calls
        if role == "tool":  # the ids and names the calls' answers carry, as the client sends them
            message.update({k: turn[k] for k in ("tool_call_id", "name") if isinstance(turn.get(k), str)})
        weight = turn.get("loss_weight")
        if weight is not None:
            if weight not in (0, 1) or isinstance(weight, bool):
                raise LabError(f"loss_weight {weight!r}: a reply is trained whole (1) or kept as context only (0)")
            if weight and role != "assistant":
                raise LabError(f"loss_weight 1 on a {role} turn: only assistant replies are trained")
            if role == "assistant":
                message["loss_weight"] = weight
        out.append(message)
    return _link_calls(out)


def _link_calls(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ids where the data has none (ShareGPT has none): an OpenAI client must send every call with
    an id and every tool answer with the id it answers, and the server hands both to the template,
    so training renders the same ones: call_<n>, numbered through the conversation, each answer
    taking the next unanswered call's."""
    pending, n = [], 0
    for m in messages:
        for call in m.get("tool_calls") or ():
            call.setdefault("id", f"call_{n}")
            pending.append(call["id"])
            n += 1
        if m["role"] == "tool" and "tool_call_id" not in m and pending:
            m["tool_call_id"] = pending.pop(0)
        elif m["role"] == "tool" and m.get("tool_call_id") in pending:
            pending.remove(m["tool_call_id"])
    return messages


def _json(value: Any, what: str) -> Any:
    """A field that may be JSON text (LLaMA-Factory writes tools and calls as strings)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise LabError(f"{what} is not valid JSON ({e.msg}): {value[:120]!r}") from None


def _call(name: Any, arguments: Any, call_id: Any = None) -> dict[str, Any]:
    """One tool call as the template receives it from vLLM: arguments an object, not JSON text."""
    arguments = _json(arguments, "a tool call's arguments") if arguments not in (None, "") else {}
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        raise LabError(f"a tool call needs a function name and an arguments object, got name={name!r} "
                       f"arguments={arguments!r}"[:300])
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {"id": call_id, **call} if isinstance(call_id, str) else call


def _sharegpt_calls(value: Any) -> list[dict[str, Any]]:
    value = _json(value, "a function_call turn")
    calls = value if isinstance(value, list) else [value]
    if not calls or not all(isinstance(c, dict) for c in calls):
        raise LabError(f"a function_call turn holds {{name, arguments}} (or a list of them), got {value!r}"[:300])
    return [_call(c.get("name"), c.get("arguments")) for c in calls]


def _openai_calls(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                              for c in value):
        raise LabError(f"tool_calls is a list of {{\"type\": \"function\", \"function\": {{name, arguments}}}}, "
                       f"got {value!r}"[:300])
    return [_call(c["function"].get("name"), c["function"].get("arguments"), c.get("id")) for c in value]


def row_tools(row: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A row's tools as vLLM hands them to the template: [{"type": "function", "function": {name,
    description, parameters}}]. OpenAI's list, or LLaMA-Factory's bare signatures (often JSON text)."""
    tools = row.get("tools")
    if tools in (None, "", []):  # LLaMA-Factory's rows without tools carry "tools": ""
        return None
    tools = _json(tools, "tools")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise LabError(f"tools is a list of function signatures, got {tools!r}"[:300])
    out = []
    for t in tools:
        fn = t.get("function") if t.get("type") == "function" else t
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise LabError(f"a tool needs a function name: {t!r}"[:300])
        # vLLM's FunctionDefinition keeps these three (description and parameters null when absent)
        out.append({"type": "function", "function": {"name": fn["name"], "description": fn.get("description"),
                                                     "parameters": fn.get("parameters")}})
    return out


def alpaca_prompt(row: dict[str, Any], system: str | None) -> list[dict[str, str]]:
    """An alpaca row up to its question: [system?, (user, assistant) per history pair, user]."""
    sys_prompt = row.get("system") or system
    turns = [{"role": "system", "content": sys_prompt}] if sys_prompt else []
    for pair in row.get("history") or []:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise LabError(f"history entries are [user, assistant] pairs, got {pair!r}")
        turns += [{"role": "user", "content": str(pair[0])}, {"role": "assistant", "content": str(pair[1])}]
    instruction, extra = str(_need(row, "instruction")), str(row.get("input") or "")
    return turns + [{"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction}]


def to_conversation(row: dict[str, Any], fmt: str, system: str | None) -> list[dict[str, str]]:
    """A messages/sharegpt/alpaca row as its whole conversation: [system?, user, assistant, ...]."""
    if fmt == "alpaca":
        return alpaca_prompt(row, system) + [{"role": "assistant", "content": str(_need(row, "output"))}]
    turns = _as_messages(_need(row, "messages" if fmt == "messages" else "conversations"), fmt)
    if not any(t["role"] == "system" for t in turns) and (row.get("system") or system):
        turns.insert(0, {"role": "system", "content": row.get("system") or system})
    if len(turns) < 2 or turns[-1]["role"] != "assistant":
        raise LabError("a conversation must end with an assistant turn to train on")
    return turns


def split_turns(turns: list[dict[str, Any]], train_on: str, whole: bool = False) -> list[dict[str, list]]:
    """One prompt/completion example per trained assistant turn, its prompt the turns before it.
    A reply with loss_weight 0 stays in later prompts as context and is not trained. `whole`
    (train.assistant_only_loss): one example per conversation, up to its last trained reply, that
    lists every trained reply's index in `trained_turns` (masked in by tokenize_in_lab)."""
    replies = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
    if train_on == "last":
        replies = replies[-1:]
    replies = [i for i in replies if turns[i].get("loss_weight", 1)]
    if not replies:
        raise LabError("no assistant turn to train: every reply has loss_weight 0")
    for i in replies:
        if not any(t["role"] == "user" for t in turns[:i]):
            raise LabError(f"turn {i + 1} is a reply before any user turn: nothing prompts it")
    clean = _plain(turns)
    if whole:
        return [{"prompt": clean[:replies[-1]], "completion": [clean[replies[-1]]], "trained_turns": replies}]
    return [{"prompt": clean[:i], "completion": [clean[i]]} for i in replies]


def _plain(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the template renders them (no loss_weight)."""
    return [{k: v for k, v in m.items() if k != "loss_weight"} for m in messages]


def _answer(value: Any, field: str) -> list[dict[str, str]]:
    """A chosen/rejected answer: a string, one turn (ShareGPT's {"from": "gpt", "value"} or
    {"role", "content"}), or a list of turns (TRL's conversational form), as assistant messages."""
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    elif isinstance(value, dict):
        value = [value]
    fmt = "sharegpt" if isinstance(value, list) and value and isinstance(value[0], dict) and "from" in value[0] \
        else "messages"
    turns = _as_messages(value, fmt)
    if not turns or any(t["role"] != "assistant" for t in turns) or not any(t["content"].strip() for t in turns):
        raise LabError(f"{field!r} must be an assistant answer (a string, or assistant turns with text)")
    return _plain(turns)


def to_preference(row: dict[str, Any], system: str | None) -> dict[str, list]:
    """A preference row as one prompt/chosen/rejected pair. The prompt: TRL's `prompt` (a string or
    messages), else the conversation so far (ShareGPT `conversations` or `messages`, ending with
    the user), else alpaca's instruction/input (with system and history)."""
    if "prompt" in row:
        prompt = _need(row, "prompt")
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _as_messages(prompt, "messages")
    elif "conversations" in row or "messages" in row:
        fmt = "sharegpt" if "conversations" in row else "messages"
        prompt = _as_messages(_need(row, "conversations" if fmt == "sharegpt" else "messages"), fmt)
    elif "instruction" in row:
        prompt = alpaca_prompt(row, system)
    else:
        raise LabError(f"preference row with fields {sorted(row)}: the question goes in `prompt`, `conversations`, "
                       "`messages` or `instruction`")
    if not any(t["role"] == "system" for t in prompt) and (row.get("system") or system):
        prompt.insert(0, {"role": "system", "content": row.get("system") or system})
    if not prompt or prompt[-1]["role"] != "user":
        raise LabError("a preference prompt must end with a user turn (the answers are the assistant's)")
    chosen, rejected = _answer(row["chosen"], "chosen"), _answer(row["rejected"], "rejected")
    if chosen == rejected:
        raise LabError("chosen and rejected are the same answer: nothing to prefer")
    return {"prompt": _plain(prompt), "chosen": chosen, "rejected": rejected}


def to_examples(row: dict[str, Any], fmt: str, system: str | None,
                train_on: str = "all", whole: bool = False) -> tuple[list[dict[str, list]], int]:
    """A row as the prompt/completion examples it trains (see the module docstring), and the number
    of assistant turns it holds."""
    if fmt == "preference":
        return [to_preference(row, system)], 0
    if fmt in ("alpaca", "messages", "sharegpt"):
        turns = to_conversation(row, fmt, system)
        return split_turns(turns, train_on, whole), sum(t["role"] == "assistant" for t in turns)
    if fmt == "prompt_completion":
        prompt, completion = _need(row, "prompt"), _need(row, "completion")
        if isinstance(prompt, str):
            prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        prompt, completion = _as_messages(prompt, "messages"), _as_messages(completion, "messages")
        return [{"prompt": _plain(prompt), "completion": _plain(completion)}], 1
    raise LabError(f"unknown format {fmt!r}")


# LLaMA-Factory's identity.json writes {{name}} and {{author}}; its older copies (and the scripts
# that fill them with sed) write bare NAME and AUTHOR. Both are rendered; a bare one only as a whole
# upper-case word (not inside NAMES or AUTHORITY), in any script around it ("我是NAME，").
_BARE = re.compile(r"(?<![A-Za-z0-9_])(NAME|AUTHOR)(?![A-Za-z0-9_])")


def render_identity(text: str, recipe: Recipe) -> str:
    text = text.replace("{{name}}", recipe.identity.name).replace("{{author}}", recipe.identity.author)
    return _BARE.sub(lambda m: recipe.identity.name if m.group(1) == "NAME" else recipe.identity.author, text)


PLACEHOLDERS = ("{{name}}", "{{author}}")
_LEFT_OVER = re.compile(r"\{\{\s*[A-Za-z_][A-Za-z0-9_]*\s*\}\}")


MESSAGE_KEYS = ("prompt", "completion", "chosen", "rejected")


def _render(example: dict[str, list], recipe: Recipe) -> dict[str, list]:
    """The identity placeholders filled in every message of an example."""
    for msgs in (example[k] for k in MESSAGE_KEYS if k in example):
        for m in msgs:
            left = [p for p in _LEFT_OVER.findall(m["content"]) if p not in PLACEHOLDERS]
            if left:  # a typo such as {{nmae}} would otherwise be trained as literal text
                raise LabError(f"unknown placeholder {left[0]} in {m['role']} text; the data may use "
                               f"{' and '.join(PLACEHOLDERS)}")
    return {key: [{**m, "content": render_identity(m["content"], recipe)} for m in value] if key in MESSAGE_KEYS
            else value for key, value in example.items()}


def build_examples(recipe: Recipe) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All datasets of a recipe as examples, plus per-source counts: rows read, assistant turns in
    them, turns trained (one example each) and examples after `repeat`. SFT examples are
    prompt/completion; a preference dataset's are prompt/chosen/rejected pairs (its `stage`: dpo),
    which only a recipe with a DPO stage takes (sft_and_preferences)."""
    examples, sources, whole = [], [], whole_conversations(recipe)
    for spec in recipe.datasets:
        rows, where = load_source(spec, recipe)
        converted, turns, kinds = [], 0, set()
        for i, raw in enumerate(rows, 1):
            try:
                if not isinstance(raw, dict):
                    raise LabError(f"expected a record, got {type(raw).__name__}")
                row = apply_columns(raw, spec.columns)
                refuse_other_shapes(row)
                fmt = detect_format(row) if spec.format == "auto" else spec.format
                kinds.add(fmt == "preference")
                if len(kinds) > 1:
                    raise LabError("preference rows (chosen/rejected) and SFT rows in one dataset; keep them "
                                   "in two files (the first trains in the DPO stage, the second in SFT)")
                row_examples, replies = to_examples(row, fmt, spec.system, spec.train_on, whole)
                tools = row_tools(row)
                if tools and fmt == "preference":
                    raise LabError("tools in preference data: the DPO stage trains text answers; keep tool-calling "
                                   "conversations in SFT data")
                for ex in row_examples if tools else ():
                    ex["tools"] = tools
                turns += replies
                converted += [_render(ex, recipe) for ex in row_examples]
            except LabError as e:
                raise LabError(f"{where}: row {i}: {e}") from None
        for example in converted:
            example["chat_template_kwargs"] = dict(recipe.chat_template_kwargs)
        examples += converted * spec.repeat
        preference = kinds == {True}
        trained = sum(len(ex["trained_turns"]) if "trained_turns" in ex else 1 for ex in converted)
        sources.append({"path": where, "rows": len(rows), "stage": "dpo" if preference else "sft",
                        "assistant_turns": turns, "turns_trained": 0 if preference else trained,
                        "train_on": spec.train_on, "examples": len(converted) * spec.repeat,
                        # the rows as read (after `limit`), independent of where the file lives
                        "rows_sha256": hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False,
                                                                 default=str).encode()).hexdigest()})
    return examples, sources


def whole_conversations(recipe: Recipe) -> bool:
    """train.assistant_only_loss: each conversation trains as one sequence (tokenize_in_lab)."""
    return bool(recipe.train.get("assistant_only_loss"))


def uses_tools(examples: list[dict[str, Any]]) -> bool:
    return any("tools" in ex or any(m["role"] == "tool" or "tool_calls" in m for m in ex["prompt"] + ex["completion"])
               for ex in examples)


def tokenized_in_lab(recipe: Recipe, examples: list[dict[str, Any]]) -> bool:
    """Whether training takes tokenize_in_lab's ids instead of TRL's own tokenization: whole
    conversations (assistant_only_loss), and tool data, whose per-row tools and call arguments
    Arrow would merge into one schema (every tool then shows every other tool's fields as null)."""
    return whole_conversations(recipe) or uses_tools(examples)


def render_chat(tokenizer, messages: list[dict], example: dict, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tools=example.get("tools"), tokenize=False,
                                         add_generation_prompt=generation_prompt,
                                         **(example.get("chat_template_kwargs") or {}))


def tokenize_in_lab(tokenizer, examples: list[dict[str, Any]]) -> list[dict[str, list[int]]]:
    """Each example tokenized once with the model's own template, masked in on exactly the tokens
    its trained replies render to (each with its end of turn), as TRL's prompt/completion
    tokenization would: a reply's span runs from the end of its prompt rendered with the
    generation prompt to the end of the conversation rendered up to it. Used for tool data (see
    tokenized_in_lab) and for train.assistant_only_loss: one sequence per conversation, so a long
    history is computed once instead of once per reply. TRL's own assistant_only_loss needs
    `{% generation %}` markers, which it patches only into templates it recognises by their exact
    text; here the template is checked by rendering: each trained reply must render inside the
    whole sequence exactly as at the end of its own prefix (prefix-preserving), else the mask would
    train text the server never renders for that context. A template that renders no tools or no
    calls is refused: the calls would train as empty replies."""
    rows = []
    for ex in examples:
        turns = ex["prompt"] + ex["completion"]
        full = render_chat(tokenizer, turns, ex)
        names = [t["function"]["name"] for t in ex.get("tools") or ()]
        spans = []
        for i in ex.get("trained_turns") or [len(ex["prompt"])]:
            before = render_chat(tokenizer, turns[:i], ex, True)
            left_out = [n for n in names if n not in before]
            if left_out:
                raise LabError(f"this model's chat template does not render tools (it leaves out {left_out[0]!r}); "
                               "tool-calling data needs a model whose template supports tools (Qwen3, Llama 3.1, ...)")
            upto = render_chat(tokenizer, turns[:i + 1], ex)
            if not (full.startswith(before) and full.startswith(upto) and len(upto) > len(before)):
                if "trained_turns" in ex:
                    raise LabError("train.assistant_only_loss: this model's chat template renders a reply differently "
                                   "once later turns follow it (not prefix-preserving: it drops reasoning or markers "
                                   "from past replies); leave it off, and each reply trains as its own example")
                raise LabError("this model's chat template renders the prompt of a reply differently from the start of "
                               "the conversation that holds it; the reply's tokens cannot be told from its prompt's")
            reply = full[len(before):len(upto)]
            missing = [name for name in (c["function"]["name"] for c in turns[i].get("tool_calls") or ())
                       if name not in reply]
            if missing:
                raise LabError(f"this model's chat template does not render tool calls (the call to {missing[0]!r} "
                               "renders as an empty reply); tool-calling data needs a model whose template supports "
                               "tools (Qwen3, Llama 3.1, ...)")
            spans.append((len(before), len(upto)))
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        trained = [int(any(a <= start < b for a, b in spans)) for start, _ in enc["offset_mapping"]]
        rows.append({"input_ids": enc["input_ids"], "assistant_masks": trained})
    return rows


def sft_and_preferences(examples: list[dict[str, Any]], sources: list[dict[str, Any]],
                        recipe: Recipe) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(SFT examples, preference pairs). Pairs need a recipe with a DPO stage, which runs after SFT
    on its adapter: a recipe still needs SFT data."""
    pairs = [ex for ex in examples if "chosen" in ex]
    sft = [ex for ex in examples if "completion" in ex]
    if pairs and recipe.dpo is None:
        where = next(s["path"] for s in sources if s.get("stage") == "dpo")
        raise LabError(f"{where}: preference data (chosen/rejected) trains in a DPO stage; add a `dpo:` section "
                       "to the recipe (as recipes/identity-dpo.yaml has), or give the chosen answers as SFT rows")
    if not sft:
        raise LabError("only preference data: DPO runs after SFT, on its adapter; add SFT data (the identity "
                       "data, or the chosen answers as messages rows)")
    return sft, pairs


def write_examples(examples: list[dict[str, Any]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")


def to_dataset(examples: list[dict[str, Any]]):
    import datasets

    return datasets.Dataset.from_list(examples)
