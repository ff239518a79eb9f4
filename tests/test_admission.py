"""Admission on the real engine: the waiting places in front of the slots, 429 when they are
full, a queued client that leaves, the per-request timeout; and ``Admission``'s tickets.

Over real sockets to a real uvicorn; the engine is observed through a thin wrapper
(``InjectedBackend``) and never replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import pytest

from app.core.admission import Admission
from app.engine.batched import BatchedLlamaBackend
from app.errors import Overloaded, Unavailable
from app.main import create_app
from tests import sse
from tests.support.injection import InjectedBackend
from tests.support.servers import LiveServer, settings_for
from tests.support.waiting import wait_until


def test_a_full_queue_answers_429_and_a_queued_client_that_leaves_is_dropped(
    batched_slow: BatchedLlamaBackend,
) -> None:
    """Two slots and one waiting place: the fourth request is a 429 in OpenAI's envelope with
    Retry-After; the waiting one, abandoned, is never decoded and frees its place."""
    observed = InjectedBackend(batched_slow)
    app = create_app(settings_for(max_queue=1), backend=observed)
    long_body = {"prompt": "Once", "max_tokens": 1500, "temperature": 0, "stream": True}
    with LiveServer(app) as server, contextlib.ExitStack() as streams:
        admission = app.state.service.admission
        readers = []  # dropping a line iterator would close its connection
        for _ in range(2):
            http = streams.enter_context(httpx.Client(base_url=server.url, timeout=60))
            running = streams.enter_context(http.stream("POST", "/v1/completions", json=long_body))
            assert running.status_code == 200
            readers.append(running.iter_lines())
            next(readers[-1])  # a token: this one is decoding
        with (
            httpx.Client(base_url=server.url, timeout=60) as waiting_client,
            waiting_client.stream("POST", "/v1/completions", json=long_body) as waiting,
        ):
            assert waiting.status_code == 200  # admitted, waiting for a slot
            with httpx.Client(base_url=server.url, timeout=60) as http:
                refused = http.post("/v1/completions", json=long_body)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert refused.json()["error"]["code"] == "overloaded"
        wait_until(lambda: admission.in_flight == 2)
        abandoned = observed.seen[2]
        wait_until(lambda: abandoned.ended)
        assert abandoned.tokens == [] and abandoned.finish == "cancelled"
        with httpx.Client(base_url=server.url, timeout=60) as http:
            admitted = http.stream("POST", "/v1/completions", json=long_body)
            with admitted as response:
                assert response.status_code == 200
    wait_until(lambda: all(s.ended for s in observed.seen))
    assert {s.finish for s in observed.seen} == {"cancelled"}


def test_a_request_past_its_timeout_ends_with_an_error(batched_slow: BatchedLlamaBackend) -> None:
    """The per-request limit ends a stream in-band (then [DONE]) and a buffered request with
    an error response; the engine lets go of both."""
    observed = InjectedBackend(batched_slow)
    app = create_app(settings_for(request_timeout_s=0.3), backend=observed)
    body = {"prompt": "Once", "max_tokens": 1500, "temperature": 0}
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            stream = sse.read(response.iter_lines())
        buffered = http.post("/v1/completions", json=body)
        wait_until(lambda: len(observed.seen) == 2 and all(s.ended for s in observed.seen))
    assert stream.payloads[-1] == "[DONE]"
    assert json.loads(stream.payloads[-2])["error"]["code"] == "timeout"
    assert stream.finish_reasons() == []
    assert buffered.status_code == 503
    assert buffered.json()["error"]["code"] == "timeout"
    assert [s.finish for s in observed.seen] == ["cancelled", "cancelled"]
    assert all(len(s.tokens) < 1500 for s in observed.seen)


def test_admission_counts_running_and_waiting_places_and_refuses_when_draining() -> None:
    async def scenario() -> None:
        admission = Admission(2, max_queue=1)
        tickets = [admission.admit() for _ in range(3)]
        with pytest.raises(Overloaded):
            admission.admit()
        tickets[0].release()
        tickets[0].release()  # idempotent
        assert admission.in_flight == 2
        spare = admission.admit()
        aborted: list[str] = []
        spare.start(lambda error: aborted.append(error.code or ""))
        await admission.drain(grace_s=0.0)
        assert aborted == ["shutting_down"]
        with pytest.raises(Unavailable):
            admission.admit()

    asyncio.run(scenario())


def test_a_ticket_dropped_unstarted_gives_its_place_back() -> None:
    """A request admitted whose response never started (its client left before the first
    byte) frees its place when nothing holds its ticket any more."""
    admission = Admission(1, max_queue=0)
    ticket = admission.admit()
    with pytest.raises(Overloaded):
        admission.admit()
    del ticket
    admission.admit()
