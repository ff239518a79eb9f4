"""Server-sent events: framing done once per event, sent by sse-starlette.

The route frames every event to bytes itself (``frame``) and hands sse-starlette bytes, which
it sends as they are: no ``ServerSentEvent`` object and no second encoding per token. That was
the part of sse-starlette's per-event cost the profile (``python -m bench.profile``) pinned on
the hot path; the rest — headers, keep-alive comments, disconnect handling, cleanup of the
event iterator — stays sse-starlette's, a maintained library instead of our own response class.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from sse_starlette import EventSourceResponse, ServerSentEvent

KEEPALIVE_COMMENT = "keep-alive"


def frame(data: str) -> bytes:
    """One SSE ``data`` event (a multi-line payload becomes one ``data:`` line per line)."""
    if "\n" in data or "\r" in data:
        lines = data.splitlines() or [""]
        return "".join(f"data: {line}\n" for line in lines).encode() + b"\n"
    return b"data: " + data.encode() + b"\n\n"


def event_stream(
    events: AsyncIterator[bytes], *, keepalive_s: float, headers: Mapping[str, str]
) -> EventSourceResponse:
    """An SSE response for pre-framed events, with ``: keep-alive`` comments when idle."""
    return EventSourceResponse(
        events,
        ping=keepalive_s,
        sep="\n",
        ping_message_factory=lambda: ServerSentEvent(comment=KEEPALIVE_COMMENT, sep="\n"),
        headers=dict(headers),
    )
