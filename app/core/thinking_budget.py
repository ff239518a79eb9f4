"""A chat request's thinking budget: from ``thinking_budget``, ``reasoning_effort`` or the
server's ``--reasoning-budget``, in the model's own token ids, kept below ``max_tokens``.

The engine enforces it (``app.engine.thinking_limit``); this module decides it. A budget
applies only to a request that thinks (Qwen3's thinking on, not ``/no_think``), and is capped
so that the forced closing tag and a share of ``max_tokens`` are left for the answer: a budget
can never let thinking use up the whole completion. Without any budget nothing is capped.
"""

from __future__ import annotations

from collections.abc import Mapping

from app.engine import ThinkingBudget, Tokenizer
from app.text.reasoning import CLOSE, OPEN

EFFORT_BUDGETS: Mapping[str, int | None] = {
    "none": 0,
    "minimal": 256,
    "low": 1024,
    "medium": 4096,
    "high": 16384,
    "xhigh": 32768,
    "max": None,
}
"""OpenAI's ``reasoning_effort`` values as thinking budgets in tokens (``None``: unlimited)."""

ANSWER_SHARE = 4
"""Under a budget, at least ``max_tokens // ANSWER_SHARE`` tokens stay for the answer."""

FORCED_CLOSE = "\n" + CLOSE
"""What the engine writes when a budget is spent: Qwen's way of ending thinking early (the model
itself writes the blank line after the tag, as it does after a block it closed)."""


def requested_budget(
    thinking_budget: int | None, reasoning_effort: str | None, default: int
) -> int | None:
    """Tokens of thinking allowed (``None``: unlimited). ``thinking_budget`` wins over
    ``reasoning_effort``, which wins over the server default; -1 means unlimited."""
    if thinking_budget is not None:
        return None if thinking_budget < 0 else thinking_budget
    if reasoning_effort is not None:
        return EFFORT_BUDGETS[reasoning_effort]
    return None if default < 0 else default


class ThinkingTags:
    """The model's token ids of the thinking tags, tokenized once."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        lead = tokenizer.tokenize("")  # a BOS the tokenizer adds to everything, if any

        def ids(text: str) -> tuple[int, ...]:
            tokens = tokenizer.tokenize(text)
            return tuple(tokens[len(lead) :] if tokens[: len(lead)] == lead else tokens)

        self.start = ids(OPEN)
        self.end = ids(CLOSE)
        self.forced = ids(FORCED_CLOSE)

    def budget(self, tokens: int, *, max_tokens: int, inside: bool) -> ThinkingBudget:
        """``tokens`` of thinking, at most what ``max_tokens`` leaves after the closing tag
        and the answer's share."""
        room = max_tokens - len(self.forced) - max_tokens // ANSWER_SHARE
        return ThinkingBudget(
            tokens=max(min(tokens, room), 0),
            start=self.start,
            end=self.end,
            forced=self.forced,
            inside=inside,
        )


def prompt_opens_thinking(prompt: str) -> bool:
    """The rendered prompt ends inside an open block (templates that open it for the model)."""
    return prompt.rstrip().endswith(OPEN)
