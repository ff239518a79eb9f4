"""Enforcing a thinking budget while sampling: count the block's tokens, then force its end.

Both engines run one ``BudgetTracker`` per generation that has a ``ThinkingBudget``: before
each sample they ask ``forced()`` for a token to take instead of sampling one, and they
``observe()`` every token they hand out. The states are llama.cpp's reasoning-budget sampler's
(common/reasoning-budget.h): waiting for the opening tag, counting inside the block, waiting
for a character split across tokens to be complete, forcing the closing sequence token by
token, then done (a budget closes one block: Qwen3 thinks once, at the start).

Forced tokens are sampled tokens like any other (reported, counted, accepted by the sampler
chain and grammar, split by the text pipeline), so streamed and buffered answers stay one path
and the protocol carries nothing but the budget. Every grammar this server builds allows the
forced ``"\\n</think>"`` inside a thinking block once a character is complete
(``app.engine.grammar``'s think rule); the service gives a constrained request a budget only
when its output starts outside the block. The alternative rejected: the service injecting
tokens through ``on_token``'s return value, which would put a token queue in every backend's
hot loop for one feature.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from app.engine.protocol import ThinkingBudget

State = Literal["idle", "counting", "utf8", "forcing", "done"]


class BudgetTracker:
    def __init__(self, budget: ThinkingBudget, token_bytes: Callable[[int], bytes]) -> None:
        self._budget = budget
        self._token_bytes = token_bytes
        self.state: State = "counting" if budget.inside else "idle"
        self.thought = 0
        """Tokens sampled inside the block so far (forced ones not counted)."""
        self._recent: list[int] = []
        self._forced_at = 0
        self._utf8_missing = 0  # continuation bytes the text still waits for
        if self.state == "counting" and budget.tokens <= 0:
            self.state = "forcing"

    def forced(self) -> int | None:
        """The token to sample next regardless of the logits, if the budget is spent."""
        if self.state != "forcing":
            return None
        return self._budget.forced[self._forced_at]

    def observe(self, token: int) -> None:
        """A token the engine sampled (or forced) and handed out."""
        budget = self._budget
        if self.state == "done":
            return
        if self.state == "forcing":
            self._forced_at += 1
            if self._forced_at >= len(budget.forced):
                self.state = "done"
            return
        self._recent = [*self._recent, token][-max(len(budget.start), len(budget.end)) :]
        if self.state == "idle":
            if _ends_with(self._recent, budget.start):
                self.state = "counting"
                self._recent = []
                if budget.tokens <= 0:
                    self.state = "forcing"
            return
        if _ends_with(self._recent, budget.end):
            self.state = "done"  # the model closed the block itself
            return
        self.thought += 1
        self._utf8_missing = _utf8_missing(self._utf8_missing, self._token_bytes(token))
        if self.thought >= budget.tokens:
            self.state = "utf8"
        if self.state == "utf8" and self._utf8_missing == 0:
            self.state = "forcing"


def budget_tracker(
    budget: ThinkingBudget | None, token_bytes: Callable[[int], bytes]
) -> BudgetTracker | None:
    """A tracker for a generation's budget; None for a generation without one."""
    return None if budget is None else BudgetTracker(budget, token_bytes)


def _ends_with(tokens: list[int], tail: tuple[int, ...]) -> bool:
    return bool(tail) and tuple(tokens[-len(tail) :]) == tail


def _utf8_missing(missing: int, data: bytes) -> int:
    """Continuation bytes still due after ``data``, given ``missing`` due before it."""
    for byte in data:
        if missing and byte & 0xC0 == 0x80:
            missing -= 1
        elif byte >= 0xF0:
            missing = 3
        elif byte >= 0xE0:
            missing = 2
        elif byte >= 0xC0:
            missing = 1
        else:
            missing = 0
    return missing
