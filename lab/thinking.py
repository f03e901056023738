"""Thinking models (Qwen3 style) may open a reply with a <think>...</think> block: reasoning, not
the answer. Whoever compares answers (the fixture's self-check, the probe) strips it first."""

from __future__ import annotations

import re

# Only a leading, closed block: an unclosed one (cut off at max_tokens) is left as it is, so the
# answer is judged as the model gave it.
THINK_BLOCK = re.compile(r"\A\s*<think>.*?</think>\s*", re.DOTALL)


def strip_thinking(text: str) -> str:
    """The answer after a leading <think>...</think> block (empty or not); the text as is without one."""
    return THINK_BLOCK.sub("", text, count=1)
