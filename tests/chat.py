"""Helpers for chat-completion tests: one request buffered and streamed, and the stream's
fields and tool calls rebuilt the way OpenAI clients rebuild them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

from app.engine import Backend
from app.main import create_app
from tests import sse
from tests.support.clients import HELLO, asgi_client
from tests.support.servers import settings_for


def script_text(script: Sequence[bytes]) -> str:
    """What a client sees of a script: every piece but the final end-of-turn token."""
    return b"".join(script[:-1]).decode()


@contextlib.asynccontextmanager
async def chat_client(backend: Backend, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client of an app with the Qwen3 semantics on (reasoning extracted)."""
    overrides = {"reasoning_format": "reasoning_content", **settings}
    async with asgi_client(create_app(settings_for(**overrides), backend=backend)) as client:
        yield client


async def both(client: httpx.AsyncClient, **body: Any) -> tuple[dict[str, Any], sse.Stream]:
    """The buffered response and the stream of the same greedy request."""
    body = {"messages": HELLO, "temperature": 0, **body}
    buffered = await client.post("/v1/chat/completions", json=body)
    assert buffered.status_code == 200, buffered.text
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        stream = await sse.aread(r.aiter_lines())
    return buffered.json(), stream


def delta_field(stream: sse.Stream, name: str) -> list[str]:
    return [
        c["choices"][0]["delta"][name]
        for c in stream.chunks
        if c.get("choices") and c["choices"][0]["delta"].get(name)
    ]


def tool_call_parts(stream: sse.Stream) -> list[dict[str, Any]]:
    """Every ``delta.tool_calls`` entry of the stream, in order."""
    return [
        part
        for chunk in stream.chunks
        if chunk.get("choices")
        for part in chunk["choices"][0]["delta"].get("tool_calls", [])
    ]


def streamed_calls(stream: sse.Stream) -> list[dict[str, Any]]:
    """Tool calls rebuilt from stream deltas the way OpenAI clients accumulate them."""
    calls: dict[int, dict[str, Any]] = {}
    for part in tool_call_parts(stream):
        call = calls.setdefault(part["index"], {"id": None, "name": None, "arguments": ""})
        if "id" in part:
            assert call["id"] is None, "id only on the first delta of a call"
            assert part["type"] == "function" and "name" in part["function"]
            call["id"], call["name"] = part["id"], part["function"]["name"]
        else:
            assert "name" not in part["function"], "name only on the first delta"
        call["arguments"] += part["function"].get("arguments", "")
    return [calls[i] for i in sorted(calls)]
