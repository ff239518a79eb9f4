"""A strict reader of the server's SSE framing, for tests (no client library in between)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Stream:
    """What a client saw: every ``data:`` payload in order, decoded where it is JSON."""

    payloads: list[str] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [json.loads(p) for p in self.payloads if p != "[DONE]"]

    def deltas(self) -> list[str]:
        """The text of every chunk that carries text (chat ``delta.content`` or ``text``)."""
        out = []
        for chunk in self.chunks:
            for choice in chunk.get("choices", []):
                text = choice["delta"].get("content") if "delta" in choice else choice["text"]
                if text:
                    out.append(text)
        return out

    def finish_reasons(self) -> list[str]:
        return [
            choice["finish_reason"]
            for chunk in self.chunks
            for choice in chunk.get("choices", [])
            if choice.get("finish_reason") is not None
        ]

    def usage(self) -> dict[str, Any] | None:
        found = [c["usage"] for c in self.chunks if c.get("usage")]
        assert len(found) <= 1, "usage must arrive in exactly one chunk"
        return found[0] if found else None


def events(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """``("data", payload)`` or ``("comment", text)`` per event; fails on foreign lines."""
    pending: list[str] = []
    for line in lines:
        if line == "":
            if pending:
                assert len(pending) == 1, f"one data line per event, got {pending!r}"
                yield "data", pending[0]
                pending = []
            continue
        if line.startswith(":"):
            yield "comment", line[1:].strip()
            continue
        assert line.startswith("data: "), f"unexpected SSE line {line!r}"
        pending.append(line[len("data: ") :])
    assert not pending, "stream ended inside an event"


def read(lines: Iterable[str]) -> Stream:
    stream = Stream()
    for kind, value in events(lines):
        (stream.payloads if kind == "data" else stream.comments).append(value)
    return stream


async def aread(lines: AsyncIterator[str]) -> Stream:
    return read([line async for line in lines])


COMMENT = ":comment"
"""The name ``named`` gives a comment (no event name can start with a colon)."""


def named(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """``(event name, data)`` per event of a stream whose every event is named (the
    Responses and Anthropic APIs), ``(COMMENT, text)`` per comment; fails on an unnamed event,
    on an event with more than one ``event:`` or ``data:`` line, and on foreign lines."""
    name: str | None = None
    data: str | None = None
    for line in lines:
        if line == "":
            if name is not None or data is not None:
                assert name is not None and data is not None, f"incomplete event {name!r}"
                yield name, data
                name = data = None
            continue
        if line.startswith(":"):
            assert name is None and data is None, "a comment inside an event"
            yield COMMENT, line[1:].strip()
        elif line.startswith("event: "):
            assert name is None and data is None, f"event line out of place: {line!r}"
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            assert name is not None, f"unnamed event {line!r}"
            assert data is None, "one data line per event"
            data = line[len("data: ") :]
        else:
            raise AssertionError(f"unexpected SSE line {line!r}")
    assert name is None and data is None, "stream ended inside an event"


def typed_events(lines: Iterable[str]) -> list[dict[str, Any]]:
    """Every named event's JSON, checked to carry its own name as ``type``."""
    events = []
    for name, data in named(lines):
        if name == COMMENT:
            continue
        event = json.loads(data)
        assert event["type"] == name, (name, event)
        events.append(event)
    return events
