"""API keys and request-size limits, as ASGI middleware in front of every route.

Both run before a body is parsed or a route is chosen, so an unauthorised or oversized request
costs nothing and never reaches the model. Their refusals use the same envelope as every
other error on that path (``app.api.http.error_handlers.error_body``: OpenAI's, or Anthropic's under
``/v1/messages``); llama-cpp-python's server answers auth failures with FastAPI's
``{"detail"}``, which no client can read.

Keys are compared with ``hmac.compare_digest`` against every configured key, without stopping
at the first match, so the response time does not tell an attacker which prefix was right or
how many keys exist.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.http.error_handlers import error_body, record_error
from app.errors import ApiError, PayloadTooLarge, Unauthorized


def load_api_keys(inline: str | None, key_file: Path | None) -> list[str]:
    """Keys from ``--api-key`` (comma-separated) and ``--api-key-file`` (one per line, ``#``
    comments)."""
    keys = [k.strip() for k in (inline or "").split(",") if k.strip()]
    if key_file is not None:
        for line in key_file.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    return keys


async def send_error(
    send: Send, error: ApiError, headers: Iterable[tuple[bytes, bytes]] = (), *, path: str = ""
) -> None:
    body = json.dumps(error_body(path, error)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def refuse(scope: Scope, send: Send, error: ApiError, *extra: tuple[bytes, bytes]) -> None:
    """Answer with ``error`` before any route runs, counted like every other error."""
    record_error(Request(scope), error)
    await send_error(send, error, extra, path=scope["path"])


class ApiKeyMiddleware:
    """``Authorization: Bearer <key>`` or ``x-api-key: <key>`` on every route but the open
    ones. ``x-api-key`` is how Anthropic's clients send a key (Claude Code's
    ``ANTHROPIC_API_KEY``); ``ANTHROPIC_AUTH_TOKEN`` sends a Bearer token. Either is accepted on
    every route: a key is a key, whichever header carries it."""

    def __init__(self, app: ASGIApp, *, keys: Sequence[str], open_paths: Sequence[str]) -> None:
        self.app = app
        self._keys = [key.encode() for key in keys]
        self._open = frozenset(open_paths)

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        scheme, _, bearer = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer":
            bearer = b""
        offered = (bearer.strip(), headers.get(b"x-api-key", b"").strip())
        matched = False
        for token in offered:
            for key in self._keys:
                matched |= hmac.compare_digest(token, key)
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._open or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        error = Unauthorized(
            "Missing or invalid API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
            code="invalid_api_key",
        )
        await refuse(scope, send, error, (b"www-authenticate", b"Bearer"))


class BodyLimitMiddleware:
    """413 for a body over ``max_bytes``, whether announced by Content-Length or streamed."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self._max = max_bytes

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"The request body is larger than this server's limit of {self._max} bytes.",
            code="request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max:
            await refuse(scope, send, self._too_large())
            return
        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self._max:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if response_started:
                raise
            await refuse(scope, send, self._too_large())


class _BodyTooLarge(Exception):
    pass
