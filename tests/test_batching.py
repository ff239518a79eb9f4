"""Continuous batching (``BatchedLlamaBackend``) and admission, on the real engine.

Exactness is tested on the scripted demo model, whose greedy output is known token by token:
a prompt that ends partway through the script continues from there, so every concurrent
stream sits at its own position of the script and a sequence that received another's logits
or KV cells would say the wrong next word. (On random weights, a different batch composition
may legitimately change a near-tie: llama.cpp's matrix kernels round differently by batch
shape, so random-weight tests compare only what must be identical.)

Cancellation, backpressure and shutdown run over real sockets to a real uvicorn; the engine
is observed through a thin wrapper and never replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.backends import GenerationResult, OnLogprobs, OnToken, SamplingParams
from app.backends.batched import HANDOFF_TOKENS, BatchedLlamaBackend, SchedulerError
from app.backends.llama import LlamaBackend
from app.main import create_app, drain, load_backend
from app.settings import Settings
from tests import sse
from tests.conftest import LiveServer, _free_port, asgi_client, settings_for

GREEDY = SamplingParams(temperature=0.0)
HELLO = [{"role": "user", "content": "Hello!"}]


def batched(path: Path, *, parallel: int = 4, n_ctx: int = 1024, n_batch: int = 64) -> Any:
    return BatchedLlamaBackend(
        path,
        parallel=parallel,
        n_ctx=n_ctx,
        n_gpu_layers=0,
        n_threads=1,
        n_batch=n_batch,
        flash_attn="off",
    )


@pytest.fixture
def batched_demo(demo_model_path: Path) -> Iterator[BatchedLlamaBackend]:
    backend = batched(demo_model_path)
    yield backend
    backend.close()


@pytest.fixture
def batched_slow(slow_model_path: Path) -> Iterator[BatchedLlamaBackend]:
    """Two slots of 2048 tokens; small prompt chunks, so a long prompt takes many steps."""
    backend = batched(slow_model_path, parallel=2, n_ctx=2048, n_batch=64)
    yield backend
    backend.close()


class Observed:
    """A batching backend with every request's callbacks observed, and optionally held.

    ``hold(request_index, token_index)`` runs inside ``on_token`` on the request's own thread,
    as the service's callback does when a client reads slowly.
    """

    def __init__(self, inner: BatchedLlamaBackend) -> None:
        self.info = inner.info
        self.tokenizer = inner.tokenizer
        self.max_concurrency = inner.max_concurrency
        self.inner = inner
        self.check_grammar = inner.check_grammar
        self.results: list[GenerationResult] = []
        self.calls_after_false: list[int] = []
        self.hold: Callable[[int, int], None] | None = None
        self.started = 0
        self._lock = threading.Lock()

    def generate(
        self,
        prompt: Sequence[int],
        sampling: SamplingParams,
        max_tokens: int,
        on_token: OnToken,
        on_logprobs: OnLogprobs | None = None,
        *,
        cancelled: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        with self._lock:
            index = self.started
            self.started += 1
        seen = 0
        said_false = False

        def observed(token_id: int) -> bool:
            nonlocal seen, said_false
            if said_false:
                self.calls_after_false.append(token_id)
            if self.hold is not None:
                self.hold(index, seen)
            seen += 1
            keep = on_token(token_id)
            said_false = said_false or not keep
            return keep

        result = self.inner.generate(
            prompt, sampling, max_tokens, observed, on_logprobs, cancelled=cancelled
        )
        with self._lock:
            self.results.append(result)
        return result

    def close(self) -> None:
        raise AssertionError("an injected backend is never closed by the app")


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def script_ids(backend: Any) -> tuple[list[int], list[int]]:
    """A short prompt and the demo script's token ids that greedy decoding answers it with."""
    prompt = backend.tokenizer.tokenize("Hello")
    script: list[int] = []
    backend.generate(prompt, GREEDY, 200, lambda t: script.append(t) or True)
    return prompt, script


def outcome_at(url: str, path: str, body: dict[str, Any]) -> tuple[str, str, int]:
    with httpx.Client(base_url=url, timeout=60) as http:
        return outcome(http, path, body)


def outcome(http: httpx.Client, path: str, body: dict[str, Any]) -> tuple[str, str, int]:
    """(text, finish_reason, completion_tokens) of one request, streamed or buffered."""
    if not body.get("stream"):
        response = http.post(path, json=body)
        assert response.status_code == 200, response.text
        data = response.json()
        (choice,) = data["choices"]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        return text, choice["finish_reason"], data["usage"]["completion_tokens"]
    body = {**body, "stream_options": {"include_usage": True}}
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        stream = sse.read(response.iter_lines())
    assert stream.payloads[-1] == "[DONE]"
    (finish,) = stream.finish_reasons()
    usage = stream.usage()
    assert usage is not None
    return "".join(stream.deltas()), finish, usage["completion_tokens"]


# -- exactness ---------------------------------------------------------------------------


def test_greedy_output_is_the_same_alone_and_beside_other_streams(
    demo_backend: LlamaBackend, batched_demo: BatchedLlamaBackend
) -> None:
    """Seven requests, four slots: every answer equals the one-slot engine's answer alone."""
    prompt, script = script_ids(batched_demo)
    assert len(script) > 35 and script == script_ids(demo_backend)[1]
    requests: list[tuple[str, dict[str, Any]]] = [
        ("/v1/completions", {"prompt": prompt, "max_tokens": 60, "stream": True}),
        ("/v1/completions", {"prompt": prompt + script[:5], "max_tokens": 7, "stream": True}),
        ("/v1/completions", {"prompt": prompt + script[:11], "stop": ["demo"]}),
        (
            "/v1/completions",
            {"prompt": prompt + script[:20], "max_tokens": 12, "stop": [" llama"], "stream": True},
        ),
        ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 30, "stream": True}),
        ("/v1/chat/completions", {"messages": HELLO, "stop": ["😀"]}),
        ("/v1/completions", {"prompt": prompt + script[:30], "max_tokens": 3}),
    ]
    requests = [(path, {**body, "temperature": 0}) for path, body in requests]

    with (
        LiveServer(create_app(settings_for(), backend=demo_backend)) as one_slot,
        httpx.Client(base_url=one_slot.url, timeout=60) as http,
    ):
        alone = [outcome(http, path, body) for path, body in requests]
    assert {finish for _, finish, _ in alone} == {"stop", "length"}

    observed = Observed(batched_demo)
    all_started = threading.Event()

    def hold_first_tokens(request: int, token: int) -> None:
        # The first four hold their first token until all four run: they decode together.
        if token == 0 and request < 4:
            if observed.started >= 4:
                all_started.set()
            all_started.wait(timeout=10)

    observed.hold = hold_first_tokens
    with (
        LiveServer(create_app(settings_for(), backend=observed)) as server,
        ThreadPoolExecutor(len(requests)) as pool,
    ):
        together = list(pool.map(lambda request: outcome_at(server.url, *request), requests))
    assert together == alone
    assert batched_demo.stats.peak_sequences >= 2, "the streams never shared a decode step"


def test_a_seed_drives_only_its_own_request(slow_model_path: Path) -> None:
    """Decoded side by side, two requests with one seed agree and a third seed differs: each
    request samples from its own generator (a shared one would interleave their draws).

    The two same-seed requests arrive while a long prompt is being decoded, so they start in
    the same step and stay in lockstep: their logits are computed alike.
    """
    backend = batched(slow_model_path, parallel=3, n_ctx=2048, n_batch=2048)
    try:
        long_prompt = backend.tokenizer.tokenize("The quick brown fox jumps. " * 400)[:1800]
        prompt = backend.tokenizer.tokenize("Once upon a time")
        seeds = {"a": 7, "b": 7, "c": 8}
        texts: dict[str, list[int]] = {}

        def run(name: str) -> None:
            tokens: list[int] = []
            sampling = SamplingParams(temperature=1.0, seed=seeds[name])
            backend.generate(prompt, sampling, 24, lambda t: tokens.append(t) or True)
            texts[name] = tokens

        with ThreadPoolExecutor(4) as pool:
            blocker = pool.submit(backend.generate, long_prompt, GREEDY, 1, lambda _: True)
            wait_until(lambda: backend.running == 1)
            list(pool.map(run, seeds))
            blocker.result()
    finally:
        backend.close()
    assert texts["a"] == texts["b"]
    assert texts["a"] != texts["c"]
    assert backend.stats.peak_sequences >= 2


# -- prefix reuse ------------------------------------------------------------------------


def test_a_conversation_returns_to_the_slot_that_holds_its_history(
    demo_model_path: Path,
) -> None:
    """Two slots, three conversations: a follow-up turn reuses its own slot's cache, and the
    least recently used cache is the one a new conversation evicts."""
    backend = batched(demo_model_path, parallel=2)

    def chat(http: httpx.Client, messages: list[dict[str, str]]) -> tuple[str, dict[str, Any]]:
        body = {"messages": messages, "temperature": 0}
        data = http.post("/v1/chat/completions", json=body).json()
        return data["choices"][0]["message"]["content"], data["usage"]

    def conversation(name: str) -> list[dict[str, str]]:
        system = f"{name} is the name of the assistant. " * 8
        return [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]

    try:
        with (
            LiveServer(create_app(settings_for(), backend=backend)) as server,
            httpx.Client(base_url=server.url, timeout=60) as http,
        ):
            a, b, c = conversation("Ada"), conversation("Bob"), conversation("Cyd")
            reply_a, usage_a1 = chat(http, a)
            reply_b, usage_b1 = chat(http, b)
            # Bob's follow-up goes back to Bob's slot, although Ada's is the least recent.
            b += [{"role": "assistant", "content": reply_b}, {"role": "user", "content": "More"}]
            _, usage_b2 = chat(http, b)
            _, usage_c1 = chat(http, c)  # evicts Ada's cache, now the least recently used
            a += [{"role": "assistant", "content": reply_a}, {"role": "user", "content": "More"}]
            _, usage_a2 = chat(http, a)
    finally:
        backend.close()

    def cached(usage: dict[str, Any]) -> int:
        return int(usage["prompt_tokens_details"]["cached_tokens"])

    def little(usage: dict[str, Any]) -> bool:
        return cached(usage) < usage["prompt_tokens"] // 10

    assert cached(usage_a1) == 0 and little(usage_b1)
    assert cached(usage_b2) >= usage_b1["prompt_tokens"]
    assert little(usage_c1)
    assert little(usage_a2)


# -- admission ---------------------------------------------------------------------------


def test_a_full_queue_answers_429_and_a_queued_client_that_leaves_is_dropped(
    batched_slow: BatchedLlamaBackend,
) -> None:
    """Two slots and one waiting place: the fourth request is a 429 in OpenAI's envelope with
    Retry-After; the waiting one, abandoned, never reaches the engine and frees its place."""
    observed = Observed(batched_slow)
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
        assert observed.started == 2, "the abandoned request reached the engine"
        with httpx.Client(base_url=server.url, timeout=60) as http:
            admitted = http.stream("POST", "/v1/completions", json=long_body)
            with admitted as response:
                assert response.status_code == 200
    wait_until(lambda: len(observed.results) == observed.started)
    assert {r.finish_reason for r in observed.results} == {"cancelled"}


def test_a_request_past_its_timeout_ends_with_an_error(batched_slow: BatchedLlamaBackend) -> None:
    """The per-request limit ends a stream in-band (then [DONE]) and a buffered request with
    an error response; the engine lets go of both."""
    observed = Observed(batched_slow)
    app = create_app(settings_for(request_timeout_s=0.3), backend=observed)
    body = {"prompt": "Once", "max_tokens": 1500, "temperature": 0}
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            stream = sse.read(response.iter_lines())
        buffered = http.post("/v1/completions", json=body)
        wait_until(lambda: len(observed.results) == 2)
    assert stream.payloads[-1] == "[DONE]"
    assert json.loads(stream.payloads[-2])["error"]["code"] == "timeout"
    assert stream.finish_reasons() == []
    assert buffered.status_code == 503
    assert buffered.json()["error"]["code"] == "timeout"
    assert [r.finish_reason for r in observed.results] == ["cancelled", "cancelled"]


# -- cancellation, backpressure ----------------------------------------------------------


def test_disconnect_during_prefill_stops_the_prefill(batched_slow: BatchedLlamaBackend) -> None:
    """A client that leaves while its long prompt is being decoded frees the slot before the
    prompt is done: no token is sampled, and the cells it had filled stay as a prefix cache."""
    observed = Observed(batched_slow)
    long_prompt = batched_slow.tokenizer.tokenize("The quick brown fox jumps. " * 400)[:1800]
    body = {"prompt": long_prompt, "max_tokens": 2, "temperature": 0}
    with (
        LiveServer(create_app(settings_for(), backend=observed)) as server,
        httpx.Client(base_url=server.url, timeout=60) as http,
    ):
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200  # the request is admitted; leave at once
        wait_until(lambda: len(observed.results) == 1)
        follow_up = http.post("/v1/completions", json=body).json()
    left = observed.results[0]
    assert left.finish_reason == "cancelled"
    assert left.completion_tokens == 0
    assert follow_up["usage"]["prompt_tokens"] == 1800
    assert follow_up["usage"]["prompt_tokens_details"]["cached_tokens"] < 1799


def test_disconnect_during_decode_frees_the_slot_and_spares_the_neighbour(
    batched_slow: BatchedLlamaBackend,
) -> None:
    observed = Observed(batched_slow)
    long_body = {"prompt": "Once", "max_tokens": 1500, "temperature": 0, "stream": True}
    short_body = {"prompt": "Twice", "max_tokens": 100, "temperature": 0, "stream": True}
    with (
        LiveServer(create_app(settings_for(), backend=observed)) as server,
        ThreadPoolExecutor(1) as pool,
        httpx.Client(base_url=server.url, timeout=60) as http,
    ):
        with http.stream("POST", "/v1/completions", json=long_body) as response:
            lines = response.iter_lines()
            next(lines)
            neighbour = pool.submit(outcome_at, server.url, "/v1/completions", short_body)
            for n, _ in enumerate(lines):
                if n == 6:
                    break  # leaving the block closes the connection mid-stream
        assert neighbour.result()[1:] == ("length", 100)
        follow_up = http.post(
            "/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "temperature": 0}
        )
    assert follow_up.json()["usage"]["completion_tokens"] == 4
    wait_until(lambda: len(observed.results) == 3)
    cancelled = next(r for r in observed.results if r.finish_reason == "cancelled")
    assert 0 < cancelled.completion_tokens < 1500
    assert observed.calls_after_false == [], "tokens were reported after on_token said False"


def test_a_blocked_reader_does_not_hold_up_the_other_streams(
    batched_demo: BatchedLlamaBackend,
) -> None:
    """One request's callback blocks (a client that stopped reading) while six others run to
    the end. Its sequence waits in its slot, a bounded number of tokens ahead of its reader;
    released, it finishes with exactly the answer it gives alone."""
    prompt, script = script_ids(batched_demo)
    observed = Observed(batched_demo)
    release = threading.Event()
    blocked = threading.Event()

    def block_first_request(request: int, token: int) -> None:
        if request == 0 and token == 1:
            blocked.set()
            assert release.wait(timeout=60)

    observed.hold = block_first_request
    slow_body = {"prompt": prompt, "max_tokens": 40, "temperature": 0, "stream": True}
    assert HANDOFF_TOKENS + 1 < 40, "the blocked stream must be long enough to be parked"
    with LiveServer(create_app(settings_for(), backend=observed)) as server:
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(outcome_at, server.url, "/v1/completions", slow_body)
            assert blocked.wait(timeout=30)
            with httpx.Client(base_url=server.url, timeout=60) as http:
                for start in (3, 9, 14, 21, 26, 30):
                    body = {"prompt": prompt + script[:start], "max_tokens": 8, "temperature": 0}
                    assert outcome(http, "/v1/completions", body)[1:] == ("length", 8)
            assert not slow.done()
            assert batched_demo.running == 1, "the unread stream should be parked in its slot"
            release.set()
            together = slow.result()
        alone = outcome_at(server.url, "/v1/completions", slow_body)
    assert together == alone
    assert together[1:] == ("length", 40)


# -- the backend itself ------------------------------------------------------------------


def test_a_request_queued_in_the_backend_leaves_when_its_caller_gives_up(
    slow_model_path: Path,
) -> None:
    """More callers than slots queue inside the backend; the ``cancelled`` probe takes a
    queued one out without it ever being decoded."""
    backend = batched(slow_model_path, parallel=1, n_ctx=2048)
    try:
        prompt = backend.tokenizer.tokenize("Once")
        running = threading.Event()
        stop_running = threading.Event()

        def occupy() -> GenerationResult:
            def on_token(_: int) -> bool:
                running.set()
                return not stop_running.is_set()

            return backend.generate(prompt, GREEDY, 1500, on_token)

        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(occupy)
            assert running.wait(timeout=30)
            gave_up = backend.generate(prompt, GREEDY, 10, lambda _: True, cancelled=lambda: True)
            assert not first.done(), "the queued request waited for the running one"
            stop_running.set()
            assert first.result().finish_reason == "cancelled"
        assert (gave_up.finish_reason, gave_up.completion_tokens) == ("cancelled", 0)
    finally:
        backend.close()


def test_closing_the_backend_fails_running_and_queued_requests(slow_model_path: Path) -> None:
    """Nothing vanishes: a generation cut off by ``close()`` raises, it does not hang or
    return as if complete."""
    backend = batched(slow_model_path, parallel=1, n_ctx=2048)
    prompt = backend.tokenizer.tokenize("Once")
    running = threading.Event()

    def on_token(_: int) -> bool:
        running.set()
        return True

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(backend.generate, prompt, GREEDY, 1500, on_token)
        assert running.wait(timeout=30)
        second = pool.submit(backend.generate, prompt, GREEDY, 10, lambda _: True)
        time.sleep(0.1)
        backend.close()
        for future in (first, second):
            with pytest.raises(SchedulerError):
                future.result(timeout=30)
    with pytest.raises(SchedulerError):
        backend.generate(prompt, GREEDY, 1, lambda _: True)


def test_parallel_setting_selects_the_batching_backend(demo_model_path: Path) -> None:
    settings = Settings(model=demo_model_path, parallel=2, n_ctx=512, n_threads=1)
    backend = load_backend(settings, demo_model_path)
    try:
        assert isinstance(backend, BatchedLlamaBackend)
        assert (backend.max_concurrency, backend.info.n_ctx) == (2, 512)
    finally:
        backend.close()


# -- shutdown ----------------------------------------------------------------------------


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
        while admission.in_flight < 2:
            await asyncio.sleep(0.01)
        draining = asyncio.create_task(drain(app, grace_s=1.0))
        while not admission.draining:
            await asyncio.sleep(0.01)
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


def test_sigterm_drains_a_real_server_process(slow_model_path: Path, tmp_path: Path) -> None:
    """The console script under a real SIGTERM: /health turns to draining, new requests get
    503, the running stream ends with an error event and [DONE], and the process exits."""
    port = _free_port()
    command = [
        sys.executable, "-m", "app.cli", "--model", str(slow_model_path), "--port", str(port),
        "--parallel", "2", "--n-ctx", "2048", "--n-threads", "1", "--shutdown-grace-s", "1",
        "--cache-dir", str(tmp_path),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            wait_until(lambda: _health(http) == 200, timeout=60)
            body = {"prompt": "Once", "max_tokens": 2000, "temperature": 0, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                next(lines)
                process.send_signal(signal.SIGTERM)
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as other:
                    wait_until(lambda: _health(other) == 503)
                    refused = other.post("/v1/completions", json={**body, "stream": False})
                stream = sse.read(lines)
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "shutting_down"
    assert stream.payloads[-1] == "[DONE]"
    assert json.loads(stream.payloads[-2])["error"]["code"] == "shutting_down"


def _health(http: httpx.Client) -> int:
    try:
        return http.get("/health").status_code
    except httpx.TransportError:
        return 0
