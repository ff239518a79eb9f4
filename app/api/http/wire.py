"""How one API puts a generation on the wire: the frames of its stream, its buffered body.

Every generating route answers through a ``Wire``; ``app.api.http.generation`` drives it, the same
way for every API: a stream sends ``opening()``, ``event()`` per delta, then ``closing()`` (or
``failure()`` when the generation fails after the headers went out); a buffered response feeds
the same deltas to ``add()`` and answers ``body()``. A wire that needs state to close its
stream (open content blocks, output items) keeps it as the events pass, and its body is built
from that same state, so a stream and its buffered twin cannot disagree.

Each API's wire lives in its own package: ``app.api.openai.wire`` (chat and text
completions), ``app.api.responses.wire``, ``app.api.anthropic.wire``, ``app.api.infill.wire``.
"""

from __future__ import annotations

from typing import Any, Protocol

from app.api.http.sse import Keepalive
from app.core.results import Event, Finished
from app.errors import ApiError


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
