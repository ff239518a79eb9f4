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
from starlette.types import Message, Send

KEEPALIVE_COMMENT = "keep-alive"


def frame(data: str) -> bytes:
    """One SSE ``data`` event (a multi-line payload becomes one ``data:`` line per line)."""
    if "\n" in data or "\r" in data:
        lines = data.splitlines() or [""]
        return "".join(f"data: {line}\n" for line in lines).encode() + b"\n"
    return b"data: " + data.encode() + b"\n\n"


class _EventStream(EventSourceResponse):
    """sse-starlette's response, but a send without a timeout (ours never set one) is awaited
    as it is: the cancel scope sse-starlette opens around every send cost ~5 % of the event
    loop's time per token at 64 streams (py-spy)."""

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is None:
            await send(message)
            return
        await super()._send_with_timeout(send, message)


def event_stream(
    events: AsyncIterator[bytes], *, keepalive_s: float, headers: Mapping[str, str]
) -> EventSourceResponse:
    """An SSE response for pre-framed events, with ``: keep-alive`` comments when idle."""
    return _EventStream(
        events,
        ping=keepalive_s,
        sep="\n",
        ping_message_factory=lambda: ServerSentEvent(comment=KEEPALIVE_COMMENT, sep="\n"),
        headers=dict(headers),
    )
