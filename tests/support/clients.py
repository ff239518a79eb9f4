"""Clients of the app: in-process (httpx on ASGI), over a real socket, through the ``openai`` SDK.

``asgi`` is httpx on the app in-process, ``socket`` a real uvicorn on a loopback port, ``sdk``
the official ``openai`` client over that socket; ``Client`` gives every test the same two
calls (buffered, streamed) over any of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from app.engine.llama_backend import LlamaBackend
from app.main import create_app
from tests import sse
from tests.support.servers import LiveServer, settings_for

HELLO = [{"role": "user", "content": "Hello!"}]


@contextlib.asynccontextmanager
async def asgi_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client with the app's lifespan running."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


@pytest.fixture
async def client(demo_backend: LlamaBackend) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client of the app around the one-slot demo engine."""
    async with asgi_client(create_app(settings_for(), backend=demo_backend)) as c:
        yield c


TRANSPORTS = ("asgi", "socket", "sdk")


class Client:
    """One test's view of the API, whatever carries it: a buffered call and a streamed one."""

    def __init__(self, http: httpx.AsyncClient, sdk: openai.AsyncOpenAI | None) -> None:
        self.http = http
        self.sdk = sdk

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.sdk is not None:
            return await _sdk_call(self.sdk, path, {**body, "stream": False})
        response = await self.http.post(path, json=body)
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data

    async def stream(self, path: str, body: dict[str, Any]) -> sse.Stream:
        if self.sdk is not None:
            return await _sdk_stream(self.sdk, path, body)
        async with self.http.stream("POST", path, json={**body, "stream": True}) as response:
            assert response.status_code == 200, await response.aread()
            return await sse.aread(response.aiter_lines())


def _sdk_args(body: dict[str, Any]) -> dict[str, Any]:
    known = {"model", "messages", "prompt", "max_tokens", "temperature", "stop", "stream"}
    known |= {"stream_options", "seed", "top_p", "max_completion_tokens", "logprobs"}
    args = {k: v for k, v in body.items() if k in known}
    extra = {k: v for k, v in body.items() if k not in known}
    args.setdefault("model", "qwen3-moe-demo")
    return {**args, "extra_body": extra} if extra else args


async def _sdk_call(sdk: openai.AsyncOpenAI, path: str, body: dict[str, Any]) -> dict[str, Any]:
    create: Callable[..., Awaitable[Any]] = (
        sdk.chat.completions.create if path == "/v1/chat/completions" else sdk.completions.create
    )
    result = await create(**_sdk_args(body))
    dumped: dict[str, Any] = result.model_dump(exclude_unset=True)
    return dumped


async def _sdk_stream(sdk: openai.AsyncOpenAI, path: str, body: dict[str, Any]) -> sse.Stream:
    """The SDK's typed chunks, as the payloads they were parsed from (each re-serialized)."""
    create: Callable[..., Awaitable[Any]] = (
        sdk.chat.completions.create if path == "/v1/chat/completions" else sdk.completions.create
    )
    stream = await create(**_sdk_args({**body, "stream": True}))
    seen = sse.Stream()
    async for chunk in stream:
        seen.payloads.append(chunk.model_dump_json(exclude_unset=True))
    seen.payloads.append("[DONE]")  # the SDK consumes it; it ends the iteration
    return seen


@contextlib.asynccontextmanager
async def connect(app: FastAPI, transport: str) -> AsyncIterator[Client]:
    """A ``Client`` for ``app`` over ``transport`` (the app's lifespan runs throughout)."""
    if transport == "asgi":
        async with asgi_client(app) as http:
            yield Client(http, None)
        return
    with LiveServer(app) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            sdk = None
            if transport == "sdk":
                sdk = openai.AsyncOpenAI(
                    base_url=f"{server.url}/v1", api_key="unused", max_retries=0
                )
            try:
                yield Client(http, sdk)
            finally:
                if sdk is not None:
                    await sdk.close()
