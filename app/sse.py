"""The SSE response: events arrive already framed as bytes and leave with one ``send`` each.

Decision: our own small response class instead of sse-starlette's ``EventSourceResponse``.
A token's event is on the hot path of every stream, and sse-starlette spends more per event
than the rest of the route together: a ``ServerSentEvent`` object and its encoding, a debug
log call, and an anyio cancel scope around every ``send`` (for a per-send timeout we do not
use). Profiled on the tiny model, that was about a quarter of the event loop's time per
token. Here the route frames each event once (``frame``) and the response only sends it.

What is kept from sse-starlette, because clients and proxies rely on it: the headers
(``text/event-stream; charset=utf-8``, ``Connection: keep-alive`` and the route's own),
a ``: keep-alive`` comment on a stream that has been idle for ``keepalive_s`` (sse-starlette
pings on a fixed clock, busy or not; an event is as good a keep-alive as a comment), and a
client disconnect cancelling the event iterator, which is how a generation learns that its
client left. Server shutdown is the app's own business (``app.main`` drains streams on
SIGTERM before uvicorn stops), so there is no exit-signal watcher per stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Mapping

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

KEEPALIVE = b": keep-alive\n\n"


def frame(data: str) -> bytes:
    """One SSE ``data`` event (a multi-line payload becomes one ``data:`` line per line)."""
    if "\n" in data or "\r" in data:
        lines = data.splitlines() or [""]
        return "".join(f"data: {line}\n" for line in lines).encode() + b"\n"
    return b"data: " + data.encode() + b"\n\n"


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        *,
        keepalive_s: float,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.events = events
        self.keepalive_s = keepalive_s
        self.status_code = 200
        self.background = None
        self.init_headers({**(headers or {}), "Connection": "keep-alive"})
        self._last_sent = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        disconnected = False

        async def stream(cancel: anyio.CancelScope) -> None:
            try:
                async for event in self.events:
                    await send({"type": "http.response.body", "body": event, "more_body": True})
                    self._last_sent = time.monotonic()
            finally:
                # Cancelled while sending, the generator still waits at its ``yield``: close
                # it now, so that its cleanup (the generation's cancellation) runs at once.
                with anyio.CancelScope(shield=True):
                    await self.events.aclose()
            cancel.cancel()

        async def keep_alive() -> None:
            self._last_sent = time.monotonic()
            while True:
                idle = time.monotonic() - self._last_sent
                if idle < self.keepalive_s:
                    await anyio.sleep(self.keepalive_s - idle)
                    continue
                await send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})
                self._last_sent = time.monotonic()

        async def watch_disconnect(cancel: anyio.CancelScope) -> None:
            nonlocal disconnected
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected = True
            cancel.cancel()

        async with anyio.create_task_group() as group:
            group.start_soon(stream, group.cancel_scope)
            group.start_soon(keep_alive)
            group.start_soon(watch_disconnect, group.cancel_scope)
        if not disconnected:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
