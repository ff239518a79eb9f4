"""Connections that never finish their request are closed: a header and a body timeout.

uvicorn arms a timer only between two requests of a connection (keep-alive). A connection
that opens and sends nothing, sends half its headers, or trickles its body is held for as long
as the client likes: 250 such connections were held for 30 s, 100 for 120 s, none closed, each
a file descriptor and a parser the server keeps. This is uvicorn's own httptools protocol with
two timers more: a request's head must be complete within ``header_timeout_s`` of its first
byte (or of the connection's opening), and its body within ``body_timeout_s`` of the head. A
connection past either is closed and logged at info level. Once a request is complete nothing
here touches its connection again: a stream may run as long as it needs.

The alternative rejected: leaving it to a reverse proxy (nginx's ``client_header_timeout``).
The server is reachable without one (``make serve``, ``docker compose up``) and must be safe
on its own.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)


def timed_http_protocol(
    *, header_timeout_s: float, body_timeout_s: float
) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol that closes a connection whose request is not complete in
    time (pass it as uvicorn's ``http``)."""

    class TimedHttpProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._expire_in(header_timeout_s, "its request head")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._deadline is None:  # a later request of a kept-alive connection
                self._expire_in(header_timeout_s, "its request head")

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self._expire_in(body_timeout_s, "its request body")

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _expire_in(self, seconds: float, what: str) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expired, seconds, what)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self, seconds: float, what: str) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                logger.info(
                    "closing a connection from %s that did not send %s within %g s",
                    f"{self.client[0]}:{self.client[1]}" if self.client else "an unknown peer",
                    what,
                    seconds,
                )
                self.transport.close()

    return TimedHttpProtocol
