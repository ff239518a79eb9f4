"""Shutdown: draining refuses new requests, lets short ones finish, ends the rest in-band; the
console script does the same under a real SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import httpx
import pytest

from app.draining import drain
from app.engine.batched import BatchedLlamaBackend
from app.main import create_app
from tests import sse
from tests.support.clients import asgi_client
from tests.support.servers import ServerProcess, settings_for
from tests.support.waiting import until, wait_until


@pytest.mark.anyio
async def test_drain_refuses_new_requests_and_ends_the_unfinished_ones(
    batched_slow: BatchedLlamaBackend,
) -> None:
    """During the grace period a new request is a 503 and a short one still completes; when
    it is over, a running stream gets an error event and [DONE]."""
    app = create_app(settings_for(), backend=batched_slow)
    long_body = {"prompt": "Once", "max_tokens": 1500, "temperature": 0, "stream": True}
    short_body = {"prompt": "Twice", "max_tokens": 5, "temperature": 0}
    async with asgi_client(app) as client:
        admission = app.state.service.admission
        long_run = asyncio.create_task(client.post("/v1/completions", json=long_body))
        short_run = asyncio.create_task(client.post("/v1/completions", json=short_body))
        await until(lambda: admission.in_flight == 2)
        draining = asyncio.create_task(drain(app, grace_s=1.0))
        await until(lambda: admission.draining)
        refused = await client.post("/v1/completions", json=short_body)
        health = await client.get("/health")
        await draining
        long_response, short_response = await long_run, await short_run
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "shutting_down"
    assert (health.status_code, health.json()) == (503, {"status": "draining"})
    assert short_response.json()["usage"]["completion_tokens"] == 5
    stream = sse.read(long_response.text.splitlines())
    assert stream.payloads[-1] == "[DONE]"
    assert json.loads(stream.payloads[-2])["error"]["code"] == "shutting_down"
    assert len(stream.deltas()) > 0


@pytest.mark.slow
def test_sigterm_drains_a_real_server_process(slow_model_path: Path, tmp_path: Path) -> None:
    """The console script under a real SIGTERM: /health turns to draining, new requests get
    503, the running stream ends with an error event and [DONE], and the process exits."""
    args = ("--parallel", "2", "--n-ctx", "2048", "--n-threads", "1", "--shutdown-grace-s", "1")
    with ServerProcess(slow_model_path, *args, cache_dir=tmp_path) as server:
        assert server.process is not None
        with httpx.Client(base_url=server.url, timeout=60) as http:
            body = {"prompt": "Once", "max_tokens": 2000, "temperature": 0, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                next(lines)
                server.process.send_signal(signal.SIGTERM)
                with httpx.Client(base_url=server.url, timeout=60) as other:
                    wait_until(lambda: _health(other) == 503)
                    refused = other.post("/v1/completions", json={**body, "stream": False})
                stream = sse.read(lines)
        assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "shutting_down"
    assert stream.payloads[-1] == "[DONE]"
    assert json.loads(stream.payloads[-2])["error"]["code"] == "shutting_down"


def _health(http: httpx.Client) -> int:
    try:
        return http.get("/health").status_code
    except httpx.TransportError:
        return 0
