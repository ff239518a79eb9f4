"""Errors: every bad request is a 4xx in OpenAI's error envelope, an engine failure after the
headers is an in-band error, and the server keeps serving. (Hostile input against a real
server process: ``test_hostile_input``.)"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import openai
import pytest

from app.engine import Backend
from app.main import create_app
from tests import sse
from tests.support.clients import HELLO, asgi_client
from tests.support.injection import FailingBackend
from tests.support.servers import LiveServer, settings_for

pytestmark = pytest.mark.anyio


def assert_envelope(response: httpx.Response, status: int, **expected: Any) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"] and " at 0x" not in error["message"]
    for key, value in expected.items():
        assert error[key] == value, (key, error)
    return error


BAD_BODIES: list[tuple[str, dict[str, Any] | bytes, str | None]] = [
    ("not json", b"{not json", None),
    ("json array", b"[1, 2]", None),
    ("missing messages", {}, "messages"),
    ("empty messages", {"messages": []}, "messages"),
    ("messages not a list", {"messages": "hi"}, "messages"),
    ("unknown role", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ("user without content", {"messages": [{"role": "user"}]}, "messages.0"),
    ("content wrong type", {"messages": [{"role": "user", "content": 5}]}, None),
    ("temperature too high", {"messages": HELLO, "temperature": 7}, "temperature"),
    ("top_p zero", {"messages": HELLO, "top_p": 0}, "top_p"),
    ("negative max_tokens", {"messages": HELLO, "max_tokens": -1}, "max_tokens"),
    ("max_tokens string", {"messages": HELLO, "max_tokens": "many"}, "max_tokens"),
    ("n above one", {"messages": HELLO, "n": 2}, "n"),
    ("stop wrong type", {"messages": HELLO, "stop": 3}, None),
    ("top_logprobs without logprobs", {"messages": HELLO, "top_logprobs": 2}, None),
    ("top_logprobs above 20", {"messages": HELLO, "logprobs": True, "top_logprobs": 21}, None),
    ("tool without function", {"messages": HELLO, "tools": [{"type": "function"}]}, None),
    ("tool_choice without tools", {"messages": HELLO, "tool_choice": "required"}, None),
    (
        "tool_choice names an unknown tool",
        {
            "messages": HELLO,
            "tools": [{"type": "function", "function": {"name": "a"}}],
            "tool_choice": {"type": "function", "function": {"name": "b"}},
        },
        None,
    ),
    (
        "json_schema without schema",
        {"messages": HELLO, "response_format": {"type": "json_schema"}},
        None,
    ),
    ("unknown response_format", {"messages": HELLO, "response_format": {"type": "xml"}}, None),
    ("stream_options without stream", {"messages": HELLO, "stream_options": {}}, None),
]


@pytest.mark.parametrize(("case", "body", "param"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
@pytest.mark.falsifies("QWEN3_MOE_OPENAI_WIRE_V1_004")
async def test_invalid_chat_bodies_are_400_envelopes(
    client: httpx.AsyncClient, case: str, body: dict[str, Any] | bytes, param: str | None
) -> None:
    content = body if isinstance(body, bytes) else None
    payload = None if isinstance(body, bytes) else body
    response = await client.post("/v1/chat/completions", content=content, json=payload)
    error = assert_envelope(response, 400, type="invalid_request_error")
    if param is not None:
        assert error["param"] == param
    assert (await client.get("/health")).status_code == 200


@pytest.mark.falsifies("QWEN3_MOE_OPENAI_WIRE_V1_004")
async def test_invalid_completion_bodies_are_400_envelopes(client: httpx.AsyncClient) -> None:
    for body in ({}, {"prompt": ""}, {"prompt": "x", "echo": True}, {"prompt": [10**9]}):
        assert_envelope(await client.post("/v1/completions", json=body), 400)


@pytest.mark.falsifies("QWEN3_MOE_OPENAI_WIRE_V1_004")
async def test_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/chat/completions", json={"model": "gpt-4o", "messages": HELLO}
    )
    assert_envelope(response, 404, param="model", code="model_not_found")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.falsifies("QWEN3_MOE_OPENAI_WIRE_V1_005")
async def test_context_length_exceeded_is_decided_before_the_stream(
    client: httpx.AsyncClient, stream: bool
) -> None:
    response = await client.post(
        "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 10**6, "stream": stream}
    )
    error = assert_envelope(response, 400, code="context_length_exceeded", param="messages")
    assert "2048" in error["message"]  # the context size is stated
    assert response.headers["content-type"].startswith("application/json")


@pytest.mark.falsifies("QWEN3_MOE_OPENAI_WIRE_V1_005")
async def test_prompt_longer_than_the_context_is_rejected(client: httpx.AsyncClient) -> None:
    long = [{"role": "user", "content": "word " * 5000}]
    response = await client.post("/v1/chat/completions", json={"messages": long})
    assert_envelope(response, 400, code="context_length_exceeded")


@pytest.mark.falsifies("QWEN3_MOE_OPENAI_WIRE_V1_004")
async def test_unknown_route_and_wrong_method_use_the_envelope(client: httpx.AsyncClient) -> None:
    assert_envelope(await client.get("/v1/nothing"), 404)
    assert_envelope(await client.get("/v1/chat/completions"), 405)


@pytest.mark.falsifies("QWEN3_MOE_OPENAI_WIRE_V1_006")
async def test_engine_failure_mid_stream_is_an_in_band_error(demo_engine: Backend) -> None:
    app = create_app(settings_for(), backend=FailingBackend(demo_engine, after=8))
    async with asgi_client(app) as client:
        body = {"messages": HELLO, "temperature": 0, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            stream = await sse.aread(r.aiter_lines())
        assert stream.payloads[-1] == "[DONE]"
        error = stream.chunks[-1]["error"]
        assert error["type"] == "server_error"
        assert "0xdeadbeef" not in error["message"] and "llama_decode" not in error["message"]
        assert stream.deltas()  # some text was sent before the failure

        buffered = await client.post("/v1/chat/completions", json={"messages": HELLO})
        assert_envelope(buffered, 500, type="server_error")


@pytest.mark.falsifies("QWEN3_MOE_OPENAI_WIRE_V1_004")
async def test_health_is_503_while_the_model_loads(
    demo_model_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.engine
    import app.lifespan

    release = threading.Event()
    real_load = app.engine.load_backend  # what app.lifespan calls, replaced there below

    def slow_load(*args: Any) -> Any:
        assert release.wait(timeout=30)
        return real_load(*args)

    monkeypatch.setattr(app.lifespan, "load_backend", slow_load)
    application = create_app(settings_for(model=demo_model_path))
    async with asgi_client(application) as client:
        health = await client.get("/health")
        assert (health.status_code, health.json()) == (503, {"status": "loading"})
        early = await client.post("/v1/chat/completions", json={"messages": HELLO})
        assert_envelope(early, 503, code="model_loading")
        release.set()
        for _ in range(600):
            if (await client.get("/health")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert (await client.get("/health")).json() == {"status": "ok"}
        ready = await client.post("/v1/chat/completions", json={"messages": HELLO})
        assert ready.status_code == 200


@pytest.mark.falsifies(
    "QWEN3_MOE_OPENAI_WIRE_V1_002",
    "QWEN3_MOE_OPENAI_WIRE_V1_004",
    "QWEN3_MOE_OPENAI_WIRE_V1_005",
)
def test_the_openai_sdk_sees_typed_errors(live_server: LiveServer) -> None:
    sdk = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(model="nope", messages=HELLO)  # type: ignore[arg-type]
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        sdk.chat.completions.create(
            model="qwen3-moe-demo",
            messages=HELLO,  # type: ignore[arg-type]
            max_tokens=10**6,
        )
    assert too_long.value.code == "context_length_exceeded"
    assert [m.id for m in sdk.models.list().data] == ["qwen3-moe-demo"]
