"""Datasets: every supported format becomes TRL conversational prompt/completion.

prompt = [system?, user, assistant, ..., user], completion = [assistant]. TRL then masks the
prompt, so the loss falls on the assistant's reply only. Formats: alpaca (instruction/input/
output, optional system and history), messages (OpenAI `messages`, ShareGPT `conversations`
with from/value) and prompt/completion; local JSON, JSONL and Parquet, or a hub dataset id.
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
                  "system": "system", "model": "assistant"}


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


def detect_format(row: dict[str, Any]) -> str:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    raise LabError(f"unknown format with fields {sorted(row)}; expected alpaca, messages, "
                   "sharegpt or prompt/completion, or map fields with `columns:`")


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


def _as_messages(turns: list, fmt: str) -> list[dict[str, str]]:
    field = "conversations" if fmt == "sharegpt" else "messages"
    if not isinstance(turns, list):
        raise LabError(f"{field!r} must be a list of turns, got {type(turns).__name__}")
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise LabError(f"each turn of {field!r} is a mapping with "
                           f"{'from/value' if fmt == 'sharegpt' else 'role/content'}, got {turn!r}"[:300])
        if fmt == "sharegpt":
            role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
            content = turn.get("value")
        else:
            role, content = turn.get("role"), turn.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise LabError(f"bad turn {turn!r}: needs a system/user/assistant role and text content")
        out.append({"role": role, "content": content})
    return out


def to_prompt_completion(row: dict[str, Any], fmt: str, system: str | None) -> dict[str, list]:
    if fmt == "alpaca":
        sys_prompt = row.get("system") or system
        prompt = [{"role": "system", "content": sys_prompt}] if sys_prompt else []
        for pair in row.get("history") or []:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise LabError(f"history entries are [user, assistant] pairs, got {pair!r}")
            prompt += [{"role": "user", "content": str(pair[0])}, {"role": "assistant", "content": str(pair[1])}]
        instruction, extra = str(_need(row, "instruction")), str(row.get("input") or "")
        prompt.append({"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction})
        return {"prompt": prompt, "completion": [{"role": "assistant", "content": str(_need(row, "output"))}]}
    if fmt in ("messages", "sharegpt"):
        turns = _as_messages(_need(row, "messages" if fmt == "messages" else "conversations"), fmt)
        if row.get("system") and not any(t["role"] == "system" for t in turns):
            turns.insert(0, {"role": "system", "content": row["system"]})
        elif system and not any(t["role"] == "system" for t in turns):
            turns.insert(0, {"role": "system", "content": system})
        if len(turns) < 2 or turns[-1]["role"] != "assistant":
            raise LabError("a conversation must end with an assistant turn to train on")
        return {"prompt": turns[:-1], "completion": turns[-1:]}
    if fmt == "prompt_completion":
        prompt, completion = _need(row, "prompt"), _need(row, "completion")
        if isinstance(prompt, str):
            prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        return {"prompt": _as_messages(prompt, "messages"), "completion": _as_messages(completion, "messages")}
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


def _render(example: dict[str, list], recipe: Recipe) -> dict[str, list]:
    for msgs in example.values():
        for m in msgs:
            left = [p for p in _LEFT_OVER.findall(m["content"]) if p not in PLACEHOLDERS]
            if left:  # a typo such as {{nmae}} would otherwise be trained as literal text
                raise LabError(f"unknown placeholder {left[0]} in {m['role']} text; the data may use "
                               f"{' and '.join(PLACEHOLDERS)}")
    return {key: [{**m, "content": render_identity(m["content"], recipe)} for m in msgs]
            for key, msgs in example.items()}


def build_examples(recipe: Recipe) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All datasets of a recipe as prompt/completion examples, plus per-source counts."""
    examples, sources = [], []
    for spec in recipe.datasets:
        rows, where = load_source(spec, recipe)
        converted = []
        for i, raw in enumerate(rows, 1):
            try:
                if not isinstance(raw, dict):
                    raise LabError(f"expected a record, got {type(raw).__name__}")
                row = apply_columns(raw, spec.columns)
                fmt = detect_format(row) if spec.format == "auto" else spec.format
                example = _render(to_prompt_completion(row, fmt, spec.system), recipe)
            except LabError as e:
                raise LabError(f"{where}: row {i}: {e}") from None
            example["chat_template_kwargs"] = dict(recipe.chat_template_kwargs)
            converted.append(example)
        examples += converted * spec.repeat
        sources.append({"path": where, "rows": len(rows), "examples": len(converted) * spec.repeat,
                        # the rows as read (after `limit`), independent of where the file lives
                        "rows_sha256": hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False,
                                                                 default=str).encode()).hexdigest()})
    return examples, sources


def write_examples(examples: list[dict[str, Any]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")


def to_dataset(examples: list[dict[str, Any]]):
    import datasets

    return datasets.Dataset.from_list(examples)
