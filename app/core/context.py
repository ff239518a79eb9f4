"""A prompt's tokens and the context: what fits, and how many tokens may follow it.

A prompt is refused by its size before it is tokenized when it cannot fit: over
``--max-prompt-bytes``, or longer than the context even if every token stood for the most
bytes one can. After tokenizing, the completion gets what the context leaves, held to the
request's ``max_tokens`` and the server's ``--max-tokens-limit``.
"""

from __future__ import annotations

from collections.abc import Sequence

from app.core.limits import Limits
from app.engine import PromptPart, Tokenizer
from app.errors import ContextLengthExceeded, InvalidRequest


class ContextFit:
    def __init__(
        self, tokenizer: Tokenizer, limits: Limits, *, n_ctx: int, max_tokens_limit: int | None
    ) -> None:
        self._tokenizer = tokenizer
        self._limits = limits
        self.n_ctx = n_ctx
        self._max_tokens_limit = max_tokens_limit

    def tokens(
        self, parts: Sequence[PromptPart], completion: int | None, *, param: str
    ) -> list[int]:
        """The prompt's token ids, unless its size refuses it first (with ``completion``, the
        tokens to generate after it; None: no context check)."""
        tokenizer = self._tokenizer
        per_token = tokenizer.max_token_bytes
        size = at_least = 0
        for part in parts:
            if isinstance(part, int):
                size += len(tokenizer.control_texts.get(part, "").encode("utf-8"))
                at_least += 1
            else:
                n = len(part.encode("utf-8"))
                size += n
                at_least += -(-n // per_token)
        self._limits.check_prompt_bytes(size, param=param)
        if completion is not None and at_least + completion > self.n_ctx:
            raise ContextLengthExceeded(
                n_ctx=self.n_ctx,
                prompt_tokens=at_least,
                max_tokens=completion,
                param=param,
                at_least=True,
            )
        return tokenizer.tokenize_parts(parts)

    def check_max_tokens(self, requested_max: int | None) -> None:
        limit = self._max_tokens_limit
        if limit is not None and requested_max is not None and requested_max > limit:
            raise InvalidRequest(
                f"max_tokens is {requested_max}, above this server's limit of {limit}.",
                param="max_tokens",
                code="max_tokens_above_limit",
            )

    def completion_room(
        self, prompt: Sequence[int], requested_max: int | None, *, param: str, fit: bool = False
    ) -> int:
        """The tokens the completion may generate after ``prompt``: ``requested_max``, or all
        the context leaves (held to ``--max-tokens-limit``). ``fit``: a ``requested_max``
        above what is left is lowered to it instead of refused."""
        if not prompt:
            raise InvalidRequest("The prompt is empty after tokenization.", param=param)
        limit = self._max_tokens_limit
        room = self.n_ctx - len(prompt)
        if fit and requested_max is not None and room >= 1:
            requested_max = min(requested_max, room, limit or room)
        self.check_max_tokens(requested_max)
        if room < 1 or (requested_max is not None and requested_max > room):
            raise ContextLengthExceeded(
                n_ctx=self.n_ctx,
                prompt_tokens=len(prompt),
                max_tokens=requested_max or 1,
                param=param,
            )
        return requested_max if requested_max is not None else min(room, limit or room)
