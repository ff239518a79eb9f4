"""Operations: /metrics, request ids and access logs, timings, API keys, limits, CORS."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.api.http.access_log import JsonFormatter
from app.engine.llama_backend import LlamaBackend
from app.main import create_app
from tests import sse
from tests.support.clients import asgi_client
from tests.support.servers import settings_for

pytestmark = pytest.mark.anyio

HELLO = [{"role": "user", "content": "Hello!"}]
PRIVATE = "my secret prompt text"


def scrape(text: str) -> dict[str, float]:
    """Every sample of an exposition as ``name{label=value,...}`` -> value."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


@contextlib.asynccontextmanager
async def _client(backend: LlamaBackend, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(create_app(settings_for(**settings), backend=backend)) as client:
        yield client


@pytest.fixture
async def ops(demo_backend: LlamaBackend) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(demo_backend) as client:
        yield client


async def test_metrics_after_real_requests(ops: httpx.AsyncClient) -> None:
    buffered = (await ops.post("/v1/chat/completions", json={"messages": HELLO})).json()
    async with ops.stream(
        "POST", "/v1/chat/completions", json={"messages": HELLO, "stream": True, "max_tokens": 7}
    ) as r:
        stream = await sse.aread(r.aiter_lines())
    assert (await ops.post("/v1/chat/completions", json={"messages": []})).status_code == 400

    response = await ops.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    m = scrape(response.text)
    p = "qwen3_moe_serve:"
    assert m[f"{p}time_to_first_token_seconds_count{{}}"] == 2
    assert m[f"{p}e2e_request_latency_seconds_count{{}}"] == 2
    assert m[f"{p}request_queue_time_seconds_count{{}}"] == 2
    # Inter-token gaps: one fewer than the deltas of each request.
    assert m[f"{p}inter_token_latency_seconds_count{{}}"] > 10
    usage = buffered["usage"]
    assert m[f"{p}prompt_tokens_total{{}}"] == 2 * usage["prompt_tokens"]
    assert m[f"{p}generation_tokens_total{{}}"] == usage["completion_tokens"] + 7
    assert m[f"{p}request_success_total{{finished_reason=stop}}"] == 1
    assert m[f"{p}request_success_total{{finished_reason=length}}"] == 1
    assert m[f"{p}request_errors_total{{status=400,type=invalid_request_error}}"] == 1
    assert m[f"{p}num_requests_running{{}}"] == 0
    assert m[f"{p}num_requests_waiting{{}}"] == 0
    assert stream.payloads[-1] == "[DONE]"


async def test_every_response_carries_a_request_id(ops: httpx.AsyncClient) -> None:
    mine = await ops.get("/health", headers={"x-request-id": "trace-42.a"})
    assert mine.headers["x-request-id"] == "trace-42.a"
    generated = await ops.get("/v1/models")
    assert len(generated.headers["x-request-id"]) == 32
    hostile = await ops.get("/health", headers={"x-request-id": "a b\x7f" + "x" * 300})
    assert hostile.headers["x-request-id"] != "a b\x7f" + "x" * 300


async def test_one_access_log_line_per_request_without_prompt_text(
    ops: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.access")
    body = {"messages": [{"role": "user", "content": PRIVATE}], "stream": True}
    async with ops.stream("POST", "/v1/chat/completions", json=body) as r:
        request_id = r.headers["x-request-id"]
        await r.aread()
    (record,) = [rec for rec in caplog.records if rec.name == "app.access"]
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == request_id
    assert (line["method"], line["path"], line["status"]) == ("POST", "/v1/chat/completions", 200)
    assert line["finish_reason"] == "stop" and line["completion_tokens"] > 0
    assert line["prompt_tokens"] > 0 and "cached_tokens" in line and line["duration_ms"] > 0
    assert PRIVATE not in json.dumps(line)


async def test_responses_carry_llama_server_style_timings(ops: httpx.AsyncClient) -> None:
    buffered = (await ops.post("/v1/chat/completions", json={"messages": HELLO})).json()
    timings = buffered["timings"]
    usage = buffered["usage"]
    assert timings["predicted_n"] == usage["completion_tokens"]
    assert timings["cache_n"] == usage["prompt_tokens_details"]["cached_tokens"]
    assert timings["prompt_n"] == usage["prompt_tokens"] - timings["cache_n"]
    assert timings["predicted_ms"] > 0 and timings["predicted_per_second"] > 0
    async with ops.stream(
        "POST", "/v1/chat/completions", json={"messages": HELLO, "stream": True}
    ) as r:
        stream = await sse.aread(r.aiter_lines())
    final = next(c for c in stream.chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert final["timings"]["predicted_n"] == timings["predicted_n"]


async def test_api_keys(demo_backend: LlamaBackend, tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nfile-key\n", encoding="utf-8")
    async with _client(demo_backend, api_key="k1,k2", api_key_file=key_file) as client:
        denied = await client.get("/v1/models")
        assert denied.status_code == 401
        assert denied.headers["www-authenticate"] == "Bearer"
        error = denied.json()["error"]
        assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
        wrong = await client.get("/v1/models", headers={"Authorization": "Bearer k3"})
        assert wrong.status_code == 401
        for key in ("k1", "k2", "file-key"):
            ok = await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200, key
        assert (await client.get("/health")).status_code == 200  # open by default
        assert (await client.get("/metrics")).status_code == 200
        chat = await client.post("/v1/chat/completions", json={"messages": HELLO})
        assert chat.status_code == 401
        scraped = scrape((await client.get("/metrics")).text)
        denials = "qwen3_moe_serve:request_errors_total{status=401,type=authentication_error}"
        assert scraped[denials] == 3


async def test_health_and_metrics_can_be_protected(demo_backend: LlamaBackend) -> None:
    async with _client(demo_backend, api_key="k", protect_health_metrics=True) as client:
        assert (await client.get("/health")).status_code == 401
        assert (await client.get("/metrics")).status_code == 401
        headers = {"Authorization": "Bearer k"}
        assert (await client.get("/health", headers=headers)).status_code == 200


async def test_oversized_body_is_413(demo_backend: LlamaBackend) -> None:
    async with _client(demo_backend, max_body_bytes=2048) as client:
        big = {"messages": [{"role": "user", "content": "x" * 5000}]}
        response = await client.post("/v1/chat/completions", json=big)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}]}'

        streamed = await client.post("/v1/chat/completions", content=chunks())
        assert streamed.status_code == 413
        small = await client.post("/v1/chat/completions", json={"messages": HELLO})
        assert small.status_code == 200


async def test_max_tokens_ceiling(demo_backend: LlamaBackend) -> None:
    async with _client(demo_backend, max_tokens_limit=5) as client:
        above = await client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 6})
        assert above.status_code == 400
        assert above.json()["error"]["code"] == "max_tokens_above_limit"
        unset = (await client.post("/v1/chat/completions", json={"messages": HELLO})).json()
        assert unset["usage"]["completion_tokens"] == 5
        assert unset["choices"][0]["finish_reason"] == "length"


async def test_cors_origins(demo_backend: LlamaBackend) -> None:
    async with _client(demo_backend, cors_origins="https://chat.example") as client:
        preflight = await client.options(
            "/v1/chat/completions",
            headers={
                "Origin": "https://chat.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://chat.example"
        other = await client.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
