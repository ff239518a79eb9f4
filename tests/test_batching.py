"""Concurrency: continuous batching (``BatchedLlamaBackend``), admission, the queue, timeouts
and shutdown, on the real engine; and unit tests of the parts in between (slot choice,
admission tickets, the output queue's backpressure, the engine -> loop hand-off).

Exactness is tested on the scripted demo model, whose greedy output is known token by token:
a prompt that ends partway through the script continues from there, so every concurrent
stream sits at its own position of the script and a sequence that received another's logits
or KV cells would say the wrong next word. (On random weights, a different batch composition
may legitimately change a near-tie: llama.cpp's matrix kernels round differently by batch
shape, so random-weight tests compare only what must be identical.)

Cancellation, backpressure and shutdown run over real sockets to a real uvicorn (the
streaming ones are in ``test_streaming``); the engine is observed through a thin wrapper and
never replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
import numpy as np
import numpy.typing as npt
import pytest

from app.core.admission import Admission
from app.core.output import Failed, Output
from app.draining import drain
from app.engine import Backend, EngineError, Flow, OnToken, SamplingParams, load_backend
from app.engine.batched import BatchedLlamaBackend, Slot, choose_slot
from app.engine.grammar import json_grammar
from app.engine.handoff import Handoff
from app.engine.llama_backend import LlamaBackend
from app.engine.sampling import ConstrainedSampler
from app.errors import Overloaded, Unavailable
from app.main import create_app
from app.settings import Settings
from tests import sse
from tests.conftest import (
    HELLO,
    InjectedBackend,
    LiveServer,
    Seen,
    asgi_client,
    engine_config,
    load,
    load_batched,
    settings_for,
    until,
    wait_until,
)
from tests.server_process import ServerProcess

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture
def batched_slow(slow_model_path: Path) -> Iterator[BatchedLlamaBackend]:
    """Two fresh slots of 2048 tokens; small prompt chunks, so a long prompt takes many steps."""
    backend = load_batched(slow_model_path, parallel=2, n_ctx=2048, n_batch=64)
    yield backend
    backend.close()


async def collect(backend: Backend, prompt: list[int], n: int, **sampling: Any) -> list[int]:
    tokens: list[int] = []
    params = SamplingParams(**{"temperature": 0.0, **sampling})
    await backend.generate(prompt, params, n, lambda t: tokens.append(t) or True)
    return tokens


def script_ids(backend: Backend) -> tuple[list[int], list[int]]:
    """A short prompt and the demo script's token ids that greedy decoding answers it with."""
    prompt = backend.tokenizer.tokenize("Hello")
    return prompt, asyncio.run(collect(backend, prompt, 200))


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


def outcome_at(url: str, path: str, body: dict[str, Any]) -> tuple[str, str, int]:
    with httpx.Client(base_url=url, timeout=60) as http:
        return outcome(http, path, body)


class FirstTokenGate(InjectedBackend):
    """Holds the first ``count`` generations at their first token (paused through a flow of
    the test's own) until all of them have one, so they go on decoding together."""

    def __init__(self, inner: Backend, count: int) -> None:
        super().__init__(inner)
        self.count = count
        self.gates: list[Flow] = []

    def flow(self, seen: Seen, flow: Flow | None) -> Flow | None:
        if seen.index >= self.count:
            return flow
        gate = Flow()
        self.gates.append(gate)
        return gate

    def watch(self, seen: Seen, on_token: OnToken) -> OnToken:
        if seen.index >= self.count:
            return on_token

        def hold_first(token_id: int) -> bool:
            if len(seen.tokens) == 1:
                self.gates[seen.index].pause()
                held = [s for s in self.seen[: self.count] if s.tokens]
                if len(held) == self.count:
                    for gate in self.gates:
                        gate.resume()
            return on_token(token_id)

        return hold_first


@pytest.fixture
def batch_widths(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of distinct sequences in every batch llama.cpp decodes (observed, not
    changed: the real ``llama_decode`` runs). Every batch must hold its tokens in
    sequence-id order, each sequence's together: a split KV cache decodes a batch in one
    micro-batch per run of consecutive ids in batch order."""
    widths: list[int] = []
    real = llama_cpp.llama_decode

    def observed(ctx: Any, batch: Any) -> int:
        ids = [batch.seq_id[i][0] for i in range(batch.n_tokens)]
        assert ids == sorted(ids), f"a batch out of sequence-id order: {ids}"
        widths.append(len(set(ids)))
        status: int = real(ctx, batch)
        return status

    monkeypatch.setattr(llama_cpp, "llama_decode", observed)
    return widths


# -- exactness ---------------------------------------------------------------------------


def test_greedy_output_is_the_same_alone_and_beside_other_streams(
    demo_backend: LlamaBackend, demo_model_path: Path, batch_widths: list[int]
) -> None:
    """Seven requests, four slots: every answer equals the one-slot engine's answer alone."""
    batched = load_batched(demo_model_path)
    try:
        prompt, script = script_ids(batched)
        assert len(script) > 35 and script == script_ids(demo_backend)[1]
        requests: list[tuple[str, dict[str, Any]]] = [
            ("/v1/completions", {"prompt": prompt, "max_tokens": 60, "stream": True}),
            ("/v1/completions", {"prompt": prompt + script[:5], "max_tokens": 7, "stream": True}),
            ("/v1/completions", {"prompt": prompt + script[:11], "stop": ["demo"]}),
            (
                "/v1/completions",
                {"prompt": prompt + script[:20], "max_tokens": 12, "stop": [" llama"]}
                | {"stream": True},
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
        gated = FirstTokenGate(batched, count=4)
        batch_widths.clear()
        with (
            LiveServer(create_app(settings_for(), backend=gated)) as server,
            ThreadPoolExecutor(len(requests)) as pool,
        ):
            together = list(pool.map(lambda request: outcome_at(server.url, *request), requests))
    finally:
        batched.close()
    assert together == alone
    assert max(batch_widths) >= 4, "the held streams never shared a decode step"


def test_a_seed_drives_only_its_own_request(slow_model_path: Path, batch_widths: list[int]) -> None:
    """Decoded side by side, two requests with one seed agree and a third seed differs: each
    request samples from its own generator (a shared one would interleave their draws).

    The three arrive while a long prompt is being decoded, so they start in the same step and
    stay in lockstep: their logits are computed alike.
    """
    backend = load_batched(slow_model_path, parallel=4, n_ctx=2048, n_batch=2048)

    async def together() -> list[list[int]]:
        long_prompt = backend.tokenizer.tokenize("The quick brown fox jumps. " * 400)[:1800]
        prompt = backend.tokenizer.tokenize("Once upon a time")
        blocker = asyncio.create_task(collect(backend, long_prompt, 1))
        while backend.running == 0:
            await asyncio.sleep(0.001)
        sampled = [collect(backend, prompt, 24, temperature=1.0, seed=s) for s in (7, 7, 8)]
        results = await asyncio.gather(*sampled)
        await blocker
        return list(results)

    try:
        a, b, c = asyncio.run(together())
    finally:
        backend.close()
    assert a == b
    assert a != c
    assert max(batch_widths) >= 3


# -- prefix reuse ------------------------------------------------------------------------


def test_a_conversation_returns_to_the_slot_that_holds_its_history(
    demo_model_path: Path,
) -> None:
    """Two slots, three conversations: a follow-up turn reuses its own slot's cache, and the
    least recently used cache is the one a new conversation evicts."""
    backend = load_batched(demo_model_path, parallel=2)

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


@pytest.mark.parametrize("kv_unified", [False, True], ids=["per-slot-kv", "unified-kv"])
def test_every_slot_can_use_its_whole_context_at_once(
    slow_model_path: Path, kv_unified: bool
) -> None:
    """No request is refused for lack of the cells it was promised: three slots of 500 tokens
    (not a multiple of llama.cpp's cell padding), each running a 400-token prompt and 100
    tokens at the same time, on either KV layout."""
    from dataclasses import replace

    config = replace(engine_config(slow_model_path, n_ctx=500, n_batch=128), kv_unified=kv_unified)
    backend = BatchedLlamaBackend(config, parallel=3)

    async def together() -> list[Any]:
        prompts = [
            backend.tokenizer.tokenize(f"Story {i}: " + "the quick brown fox jumps. " * 200)[:400]
            for i in range(3)
        ]
        return list(
            await asyncio.gather(
                *(backend.generate(p, GREEDY, 100, lambda _: True) for p in prompts)
            )
        )

    try:
        assert backend.info.n_ctx == 500
        results = asyncio.run(together())
    finally:
        backend.close()
    assert [(r.finish_reason, r.completion_tokens) for r in results] == [("length", 100)] * 3


def test_choose_slot_prefers_the_longest_shared_prefix_else_the_least_recently_used() -> None:
    empty = Slot(0)
    ada = Slot(1, [1, 2, 3, 4, 5], last_used=2)
    bob = Slot(2, [1, 2, 9], last_used=1)
    assert choose_slot([empty, ada, bob], [1, 2, 3, 4, 5, 6]) is ada
    assert choose_slot([ada, bob], [1, 2, 9, 9]) is bob
    # A shared opening shorter than the similarity threshold does not count: LRU (empty first).
    long_prompt = [1] + [7] * 50
    assert choose_slot([empty, ada, bob], long_prompt) is empty
    assert choose_slot([ada, bob], long_prompt) is bob


# -- admission ---------------------------------------------------------------------------


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


# -- the output queue and the hand-off ---------------------------------------------------


def test_output_pauses_the_engine_when_full_and_hands_over_everything_waiting() -> None:
    """Full at ``capacity`` unread items: the flow pauses. The reader then takes every item
    waiting at once (one send for a response that fell behind), and the flow resumes."""

    async def scenario() -> None:
        flow = Flow()
        woken: list[bool] = []
        flow.on_resume(lambda: woken.append(True))
        output: Output[int] = Output(4, flow)
        for item in range(3):
            output.put(item)
        assert not flow.paused
        output.put(3)
        assert flow.paused
        assert await output.get() == [0, 1, 2, 3]
        assert not flow.paused and woken == [True]
        output.put(4)
        output.fail(ValueError("x"))
        assert output.closed
        batch = await output.get()
        assert batch[0] == 4 and isinstance(batch[1], Failed)

    asyncio.run(scenario())


def test_the_handoff_delivers_in_order_with_one_wakeup_per_burst() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        bursts: list[list[int]] = []
        handoff: Handoff[int] = Handoff(loop, bursts.append)

        def engine() -> None:
            for start in range(0, 30, 3):
                handoff.post(range(start, start + 3))
            handoff.wait_for_room(0, timeout=10)

        await asyncio.to_thread(engine)
        assert [item for burst in bursts for item in burst] == list(range(30))
        assert handoff.backlog() == 0

    asyncio.run(scenario())


# -- the backend itself ------------------------------------------------------------------


def test_a_request_queued_in_the_backend_leaves_when_its_caller_gives_up(
    slow_model_path: Path,
) -> None:
    """More callers than slots queue inside the backend; cancelling a queued one takes it out
    without it ever being decoded, and the running one goes on."""
    backend = load_batched(slow_model_path, parallel=1, n_ctx=2048)

    async def scenario() -> None:
        prompt = backend.tokenizer.tokenize("Once")
        first_tokens: list[int] = []
        first = asyncio.create_task(
            backend.generate(prompt, GREEDY, 200, lambda t: first_tokens.append(t) or True)
        )
        while not first_tokens:
            await asyncio.sleep(0.001)
        queued_tokens: list[int] = []
        queued = asyncio.create_task(
            backend.generate(prompt, GREEDY, 10, lambda t: queued_tokens.append(t) or True)
        )
        while backend.queued == 0:
            await asyncio.sleep(0.001)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        while backend.queued:  # the scheduler drops it at its next step
            await asyncio.sleep(0.001)
        result = await first
        assert (result.finish_reason, result.completion_tokens) == ("length", 200)
        assert queued_tokens == []

    try:
        asyncio.run(scenario())
    finally:
        backend.close()


@pytest.mark.parametrize("engine", ["single", "batched"])
def test_closing_the_backend_fails_running_and_queued_requests(
    slow_model_path: Path, engine: str
) -> None:
    """Nothing vanishes: a generation cut off by ``close()`` raises, it does not hang or
    return as if complete."""
    backend: Backend = (
        load(slow_model_path)
        if engine == "single"
        else load_batched(slow_model_path, parallel=1, n_ctx=2048)
    )

    async def scenario() -> None:
        prompt = backend.tokenizer.tokenize("Once")
        started = asyncio.Event()

        def on_token(_: int) -> bool:
            started.set()
            return True

        first = asyncio.create_task(backend.generate(prompt, GREEDY, 1500, on_token))
        await started.wait()
        second = asyncio.create_task(backend.generate(prompt, GREEDY, 10, lambda _: True))
        await asyncio.sleep(0)  # it is queued behind the first now
        await asyncio.to_thread(backend.close)
        for task in (first, second):
            with pytest.raises(EngineError):
                await asyncio.wait_for(task, timeout=30)
        with pytest.raises(EngineError):
            await backend.generate(prompt, GREEDY, 1, lambda _: True)

    asyncio.run(scenario())


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


# -- grammar-constrained sampling -------------------------------------------------------------


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


def _allowed(grammar: Any, logits: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
    """Which tokens ``grammar`` allows next: its own pass over the whole vocabulary."""
    data = (llama_cpp.llama_token_data * len(logits))()
    view = np.frombuffer(memoryview(data), dtype=_TOKEN_DATA)
    view["id"], view["logit"], view["p"] = np.arange(len(logits)), logits, 0.0
    array = llama_cpp.llama_token_data_array(data=data, size=len(logits), selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(grammar, ctypes.byref(array))
    allowed = np.zeros(len(logits), dtype=bool)
    allowed[view["id"]] = ~np.isneginf(view["logit"])
    return allowed


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "seeded"])
def test_sample_then_check_draws_what_the_grammar_allows(
    demo_model_path: Path, greedy: bool
) -> None:
    """Both engines' grammar sampling (app.engine.sampling) against a second copy of
    the grammar that filters the whole vocabulary every step, along whole JSON objects on the
    demo vocabulary: every token is one the grammar allows; a greedy token is the best one it
    allows; a draw the grammar allows is kept as drawn, one it refuses is drawn again. Both
    cases occur."""
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(demo_model_path).encode(), params)
    assert model
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    text = json_grammar(None, allow_thinking=False).encode()
    sampler = ConstrainedSampler(n_vocab)
    rng = np.random.default_rng(7)
    kept = redrawn = 0
    try:
        for run in range(6):
            chain = llama_cpp.llama_sampler_chain_init(
                llama_cpp.llama_sampler_chain_default_params()
            )
            if greedy:
                llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            else:
                llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(run))
            grammar = llama_cpp.llama_sampler_init_grammar(vocab, text, b"root")
            reference = llama_cpp.llama_sampler_init_grammar(vocab, text, b"root")
            try:
                for _ in range(48):
                    logits = (rng.standard_normal(n_vocab) * 4).astype(np.float32)
                    allowed = _allowed(reference, logits)
                    if rng.random() < 0.5:  # now and then the best token is an allowed one
                        logits[rng.choice(np.flatnonzero(allowed))] = logits.max() + 10
                    best = int(np.argmax(logits))
                    token = sampler.sample(chain, grammar, logits)
                    assert allowed[token]
                    if greedy:
                        assert token == int(np.argmax(np.where(allowed, logits, -np.inf)))
                    if allowed[best]:
                        kept += token == best
                    else:
                        redrawn += 1
                    llama_cpp.llama_sampler_accept(reference, token)
                    if llama_cpp.llama_vocab_is_eog(vocab, token):
                        break
            finally:
                for s in (chain, grammar, reference):
                    llama_cpp.llama_sampler_free(s)
    finally:
        llama_cpp.llama_model_free(model)
    assert kept > 0 and redrawn > 0


class _NoTokenAllowed:
    """Fault injection: a grammar that allows no token at the first step."""

    def sample(self, chain: Any, grammar: Any, logits: Any) -> int:
        raise EngineError("the grammar allows no token at this point")


@pytest.mark.anyio
async def test_a_grammar_that_allows_no_token_fails_its_generation_without_a_token(
    demo_engine: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither engine falls back to an unconstrained token (the one-slot engine samples inside
    a llama.cpp callback, where an exception would be lost), and the engine serves on."""
    monkeypatch.setattr(demo_engine, "_constrained", _NoTokenAllowed())
    prompt = demo_engine.tokenizer.tokenize(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    shown: list[int] = []
    sampling = SamplingParams(temperature=0.0, grammar=json_grammar(None, allow_thinking=False))
    with pytest.raises(EngineError, match="allows no token"):
        await demo_engine.generate(prompt, sampling, 8, lambda t: shown.append(t) or True)
    assert shown == []
    monkeypatch.undo()
    result = await demo_engine.generate(prompt, sampling, 8, lambda t: shown.append(t) or True)
    assert result.completion_tokens == len(shown) > 0
