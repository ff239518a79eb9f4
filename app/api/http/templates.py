"""Per-request JSON templates for the events sent once per token.

A token's event is on the hot path of every stream, and building and serializing a pydantic
object per token was the largest piece of our own per-token cost. So the common events (one
piece of text) are rendered from a ``JsonTemplate``: the event serialized once per request (or
per output block) by pydantic with markers in its holes, split around them; per token only the
text is encoded (and, for the Responses API, the event's ``sequence_number`` written).

pydantic and ``json.dumps(ensure_ascii=False)`` escape strings identically (quote, backslash,
control characters); tests/test_streaming.py holds every template byte-equal to pydantic for
every character.
"""

from __future__ import annotations

import json
from collections.abc import Callable

TEXT_MARK = "<<qwen3-moe-serve text>>"
NUMBER_MARK = 86753092718281
"""An integer no field of a real event holds; it marks the one integer hole."""

Render = Callable[[str, int], str]
"""The event's JSON for a text and a number, as pydantic writes it."""


class JsonTemplate:
    """An event's JSON with one string hole and at most one integer hole."""

    def __init__(self, pieces: tuple[str, str, str], order: str) -> None:
        self._head, self._middle, self._tail = pieces
        self._order = order
        """``text``, ``text number`` or ``number text``: the holes, in order."""

    @classmethod
    def around(cls, render: Render) -> JsonTemplate | None:
        """The template of ``render``; None when a marker is not found exactly once, or the
        number marker is not a whole JSON value (a model id that contains a marker, say): such
        a request keeps the pydantic path."""
        sample = render(TEXT_MARK, NUMBER_MARK)
        text, number = json.dumps(TEXT_MARK), str(NUMBER_MARK)
        if sample.count(text) != 1 or sample.count(number) > 1:
            return None
        at_text = sample.index(text)
        at_number = sample.find(number)
        if at_number < 0:
            head, _, tail = sample.partition(text)
            return cls((head, tail, ""), "text")
        before, after = sample[at_number - 1 : at_number], sample[at_number + len(number) :][:1]
        if before != ":" or after not in (",", "}"):
            return None
        first, second = sorted([(at_text, len(text)), (at_number, len(number))])
        head = sample[: first[0]]
        middle = sample[first[0] + first[1] : second[0]]
        tail = sample[second[0] + second[1] :]
        return cls((head, middle, tail), "number text" if at_number < at_text else "text number")

    def fill(self, text: str, number: int = 0) -> str:
        encoded = json.dumps(text, ensure_ascii=False)
        if self._order == "text":
            return self._head + encoded + self._middle
        if self._order == "text number":
            return self._head + encoded + self._middle + str(number) + self._tail
        return self._head + str(number) + self._middle + encoded + self._tail
