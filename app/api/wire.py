"""How one API puts a generation on the wire: the frames of its stream, its buffered body.

Every generating route answers through a ``Wire``; ``app.api.generation`` drives it, the same
way for every API: a stream sends ``opening()``, ``event()`` per delta, then ``closing()`` (or
``failure()`` when the generation fails after the headers went out); a buffered response feeds
the same deltas to ``add()`` and answers ``body()``. A wire that needs state to close its
stream (open content blocks, output items) keeps it as the events pass, and its body is built
from that same state, so a stream and its buffered twin cannot disagree.

OpenAI's chat and text completions differ only in their chunk shapes (``app.api.formats``),
so one adapter, ``ChunkWire``, puts either on the wire: bare ``data:`` chunks, ``[DONE]``
last, errors as the OpenAI envelope. The Responses and Anthropic Messages wires are their own
(``app.api.responses_format``, ``app.api.anthropic_format``).
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from app.api.formats import Answer, Format, usage_of
from app.api.sse import Keepalive, frame
from app.core.results import Event, Finished
from app.errors import ApiError

DONE = frame("[DONE]")


class Wire(Protocol):
    def keepalive(self) -> Keepalive | None:
        """The event an idle stream sends to stay alive, at any point of it (sent beside the
        stream's own events, so it must not depend on their order); None: an SSE comment."""
        ...

    def waiting(self) -> bytes:
        """Frames the stream itself sends, in order with its other events, each time it has
        waited ``--sse-keepalive-s`` for the first token (a long prompt, a queue); may be
        empty."""
        ...

    def opening(self) -> bytes:
        """Frames sent as the stream starts, before the first token (may be empty)."""
        ...

    def event(self, event: Event) -> bytes:
        """The frames of one delta (the hot path: one call per token)."""
        ...

    def closing(self, finished: Finished) -> bytes:
        """The frames that end a stream that finished."""
        ...

    def failure(self, error: ApiError) -> bytes:
        """The frames that end a stream whose generation failed: the error, in-band."""
        ...

    def add(self, event: Event) -> None:
        """Take one delta for the buffered response."""
        ...

    def body(self, finished: Finished) -> dict[str, Any]:
        """The buffered response, as JSON-ready data."""
        ...


class ChunkWire:
    """An OpenAI chunk format on the wire: ``data:`` chunks, then ``[DONE]``."""

    def __init__(self, fmt: Format, *, include_usage: bool) -> None:
        self._fmt = fmt
        self._include_usage = include_usage
        self._answer = Answer()

    def keepalive(self) -> None:
        return None

    def waiting(self) -> bytes:
        return b""

    def opening(self) -> bytes:
        first = self._fmt.first_chunk()
        return b"" if first is None else frame(first.model_dump_json())

    def event(self, event: Event) -> bytes:
        return frame(self._fmt.event_json(event))

    def closing(self, finished: Finished) -> bytes:
        frames = frame(self._fmt.finish_chunk(finished).model_dump_json())
        if self._include_usage:
            frames += frame(self._fmt.usage_chunk(usage_of(finished)).model_dump_json())
        return frames + DONE

    def failure(self, error: ApiError) -> bytes:
        # Headers are gone: the error travels in-band, then the stream ends normally.
        return frame(json.dumps(error.envelope())) + DONE

    def add(self, event: Event) -> None:
        self._answer.add(event)

    def body(self, finished: Finished) -> dict[str, Any]:
        return self._fmt.response(self._answer, finished).model_dump()
