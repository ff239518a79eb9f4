"""``app.api.http.security``: API keys and the body-size limit, as ASGI middleware before any route.

Each middleware is tested around a bare Starlette app whose one route echoes the body it read,
so a refusal is seen to happen before the route (the route never runs) and in the envelope of
the API at that path. The full app's behaviour with keys and limits is in test_operations.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from app.api.http.security import ApiKeyMiddleware, BodyLimitMiddleware, load_api_keys

pytestmark = pytest.mark.anyio


class Metrics:
    """Stands in for the app's metrics: records what ``refuse`` counts."""

    def __init__(self) -> None:
        self.errors: list[tuple[str, int]] = []

    def error(self, error_type: str, status: int) -> None:
        self.errors.append((error_type, status))


def echo_app(middleware: Middleware) -> tuple[Starlette, list[bytes]]:
    """An app whose routes record and echo the body they read, behind ``middleware``."""
    reached: list[bytes] = []

    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        reached.append(body)
        return JSONResponse({"size": len(body)})

    routes = [Route(path, echo, methods=["GET", "POST"]) for path in PATHS]
    app = Starlette(routes=routes, middleware=[middleware])
    app.state.metrics = Metrics()
    return app, reached


PATHS = ("/v1/chat/completions", "/v1/messages", "/health")


@contextlib.asynccontextmanager
async def client_of(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


def keyed(*keys: str) -> tuple[Starlette, list[bytes]]:
    return echo_app(Middleware(ApiKeyMiddleware, keys=list(keys), open_paths=["/health"]))


def test_keys_come_from_the_flag_and_the_file(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\n\n  k3  \nk4\n# k5\n", encoding="utf-8")
    assert load_api_keys(" k1, ,k2,", key_file) == ["k1", "k2", "k3", "k4"]
    assert load_api_keys(None, None) == []
    assert load_api_keys("", key_file) == ["k3", "k4"]


@pytest.mark.parametrize(
    "headers",
    [
        {"authorization": "Bearer k2"},
        {"authorization": "bearer k1"},
        {"x-api-key": "k1"},
        {"authorization": "Bearer wrong", "x-api-key": "k2"},
    ],
    ids=["bearer-second-key", "scheme-any-case", "x-api-key", "either-header"],
)
async def test_a_configured_key_in_either_header_is_let_through(headers: dict[str, str]) -> None:
    app, reached = keyed("k1", "k2")
    async with client_of(app) as client:
        response = await client.post("/v1/chat/completions", content=b"{}", headers=headers)
    assert response.status_code == 200 and reached == [b"{}"]
    assert app.state.metrics.errors == []


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer k3"}, {"authorization": "Basic k1"}, {"authorization": "k1"}],
    ids=["none", "unknown-key", "basic-scheme", "no-scheme"],
)
async def test_a_missing_or_wrong_key_is_a_401_before_the_route(headers: dict[str, str]) -> None:
    app, reached = keyed("k1", "k2")
    async with client_of(app) as client:
        response = await client.post("/v1/chat/completions", content=b"{}", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "authentication_error",
        "invalid_api_key",
        None,
    )
    assert "k1" not in response.text and "k2" not in response.text
    assert reached == []
    assert app.state.metrics.errors == [("authentication_error", 401)]


async def test_refusals_under_the_messages_route_use_anthropics_envelope() -> None:
    app, _ = keyed("k1")
    async with client_of(app) as client:
        response = await client.post("/v1/messages", content=b"{}")
    assert response.status_code == 401
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    assert set(body["error"]) == {"type", "message"}


async def test_open_paths_need_no_key() -> None:
    app, reached = keyed("k1")
    async with client_of(app) as client:
        response = await client.get("/health")
    assert response.status_code == 200 and reached == [b""]


def limited(max_bytes: int) -> tuple[Starlette, list[bytes]]:
    return echo_app(Middleware(BodyLimitMiddleware, max_bytes=max_bytes))


async def test_a_body_at_the_limit_reaches_the_route_whole() -> None:
    app, reached = limited(16)
    async with client_of(app) as client:
        response = await client.post("/v1/chat/completions", content=b"x" * 16)
    assert response.json() == {"size": 16} and reached == [b"x" * 16]


async def test_a_declared_length_over_the_limit_is_a_413_before_the_route() -> None:
    app, reached = limited(16)
    async with client_of(app) as client:
        response = await client.post("/v1/messages", content=b"x" * 17)
    assert response.status_code == 413
    assert response.json()["type"] == "error"  # Anthropic's envelope on its route
    assert "16 bytes" in response.json()["error"]["message"]
    assert reached == []
    assert app.state.metrics.errors == [("invalid_request_error", 413)]


async def test_a_streamed_body_over_the_limit_is_a_413_without_a_declared_length() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"x" * 8

    app, reached = limited(16)
    async with client_of(app) as client:
        response = await client.post("/v1/chat/completions", content=chunks())
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    error = response.json()["error"]
    assert (error["code"], error["type"]) == ("request_too_large", "invalid_request_error")
    assert reached == []


def test_a_body_over_the_limit_after_the_response_started_is_not_answered_twice() -> None:
    """Once the route has sent its response head, a 413 can no longer be sent: the error
    propagates (the server closes the connection) instead of a second response start."""
    sent: list[Message] = []
    body = [b"x" * 8, b"x" * 8, b"x" * 8]

    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while (await receive()).get("more_body"):
            pass

    async def receive() -> Message:
        chunk = body.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(body)}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: dict[str, Any] = {"type": "http", "path": "/v1/completions", "headers": []}
    middleware = BodyLimitMiddleware(route, max_bytes=16)
    with pytest.raises(Exception) as raised:
        asyncio.run(middleware(scope, receive, send))
    assert type(raised.value).__name__ == "_BodyTooLarge"
    assert [m["type"] for m in sent] == ["http.response.start"]
