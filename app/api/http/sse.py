"""Server-sent events: framing done once per event, sent by sse-starlette.

The route frames every event to bytes itself (``frame``) and hands sse-starlette bytes, which
it sends as they are: no ``ServerSentEvent`` object and no second encoding per token. That was
the part of sse-starlette's per-event cost the profile (``python -m bench.profile``) pinned on
the hot path; the rest — headers, keep-alive comments, disconnect handling, cleanup of the
event iterator — stays sse-starlette's, a maintained library instead of our own response class.

OpenAI's chat and text completions send bare ``data:`` events; the Responses and Anthropic
Messages APIs name every event (``event: <type>`` before its ``data:``), and Claude Code falls
back to a non-streaming retry when the names are missing. Their keep-alives are real events
too (``Keepalive``): both agents reset their idle timers only on events, never on comments.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Message, Send

KEEPALIVE_COMMENT = "keep-alive"


def frame(data: str, event: str | None = None) -> bytes:
    """One SSE event: its name (if any), then its payload, one ``data:`` line per line."""
    head = b"" if event is None else b"event: " + event.encode() + b"\n"
    if "\n" in data or "\r" in data:
        lines = data.splitlines() or [""]
        return head + "".join(f"data: {line}\n" for line in lines).encode() + b"\n"
    return head + b"data: " + data.encode() + b"\n\n"


@dataclass(frozen=True)
class Keepalive:
    """A keep-alive that is an event (``event`` and its ``data``), not a comment."""

    event: str
    data: str


class _EventStream(EventSourceResponse):
    """sse-starlette's response, but a send without a timeout (ours never set one) is awaited
    as it is: the cancel scope sse-starlette opens around every send is per-token work on the
    event loop that buys nothing here."""

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is None:
            await send(message)
            return
        await super()._send_with_timeout(send, message)


def event_stream(
    events: AsyncIterator[bytes],
    *,
    keepalive_s: float,
    headers: Mapping[str, str],
    keepalive: Callable[[], Keepalive | None] = lambda: None,
) -> EventSourceResponse:
    """An SSE response for pre-framed events; when idle, the events ``keepalive`` makes, or
    ``: keep-alive`` comments where it makes none."""

    def ping() -> ServerSentEvent:
        made = keepalive()
        if made is None:
            return ServerSentEvent(comment=KEEPALIVE_COMMENT, sep="\n")
        return ServerSentEvent(data=made.data, event=made.event, sep="\n")

    return _EventStream(
        events, ping=keepalive_s, sep="\n", ping_message_factory=ping, headers=dict(headers)
    )
