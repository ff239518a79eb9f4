"""Streaming: every token its own SSE event the moment it exists, over a real socket, on both
engines; stream == buffered; keep-alives; what a client that leaves or reads slowly does.

Per-token delivery is proven at the HTTP level by holding the engine after every token that
completes text until the client has *received* that token's event (``tests/delivery.py``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.anthropic.wire import MessagesWire
from app.api.http.hosted_tools import UnsupportedTools
from app.api.http.sse import frame
from app.api.openai.formats import ChatFormat, CompletionFormat, Format
from app.api.responses.requests import ResponsesRequest, responses_as_chat
from app.api.responses.wire import ResponsesWire
from app.core.results import Event
from app.demo import script_text
from app.engine import Backend, Flow, OnToken, SamplingParams, TokenLogprobs
from app.engine.batched import BatchedLlamaBackend
from app.main import create_app
from app.text import Delta, ToolCallDelta
from tests import sse
from tests.contracts_plugin import ContractThreshold, RecordFinding
from tests.delivery import check_per_token_delivery, deliver
from tests.support.clients import HELLO, TRANSPORTS, connect
from tests.support.injection import HeldStart, InjectedBackend, Seen
from tests.support.models import ENGINES, load_batched
from tests.support.servers import LiveServer, settings_for
from tests.support.waiting import wait_until

SCRIPT = script_text()
STREAMING = "QWEN3_MOE_STREAMING_SSE_V2"
COUNTING = "Count from 1 to 1000, one number per line, and nothing else."
# A raw Qwen3 chat prompt, so the engine timing and the HTTP request decode the same tokens.
RAW_PROMPT = f"<|im_start|>user\n{COUNTING}<|im_end|>\n<|im_start|>assistant\n"
GREEDY = SamplingParams(temperature=0.0)


def text_of(chunk: dict[str, Any]) -> str:
    if not chunk.get("choices"):
        return ""
    choice = chunk["choices"][0]
    text: str = choice["delta"].get("content") or "" if "delta" in choice else choice["text"]
    return text


def content_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for kind, payload in sse.events(lines):
        if kind == "data" and payload != "[DONE]":
            yield json.loads(payload)


# -- per-token delivery -----------------------------------------------------------------------


@pytest.mark.falsifies(f"{STREAMING}_001")
def test_each_token_is_its_own_event_sent_before_the_engine_runs_ahead(
    model: Backend, record_finding: RecordFinding
) -> None:
    body = {"messages": [{"role": "user", "content": COUNTING}], "temperature": 0}
    body |= {"max_tokens": 48, "stream": True}
    payloads: list[str] = []

    def chat_texts(lines: Iterator[str]) -> Iterator[str]:
        for kind, payload in sse.events(lines):
            assert kind == "data"
            payloads.append(payload)
            yield "" if payload == "[DONE]" else text_of(json.loads(payload))

    delivered = deliver(model, "/v1/chat/completions", body, chat_texts)
    assert delivered.headers["content-type"].startswith("text/event-stream")
    assert delivered.headers["cache-control"] == "no-cache"
    assert delivered.headers["x-accel-buffering"] == "no"
    check_per_token_delivery(delivered)
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
    texts = "".join(delivered.texts)
    if "demo" in model.info.path:
        assert texts == SCRIPT[: len(texts)]
    record_finding("tokens", len(delivered.gate.text_tokens))
    record_finding("content_events", len(delivered.texts))


# -- stream == buffered -----------------------------------------------------------------------

STREAM_EQUALS_BUFFERED_MODELS = ("demo-single", "demo-batched", "real-single")


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("model", STREAM_EQUALS_BUFFERED_MODELS, indirect=True)
@pytest.mark.falsifies(f"{STREAMING}_002", "QWEN3_MOE_OPENAI_WIRE_V1_002")
@pytest.mark.anyio
async def test_stream_equals_buffered(
    model: Backend, route: str, transport: str, record_finding: RecordFinding
) -> None:
    """Text, finish_reason and usage of a greedy stream equal the buffered response, on
    every engine and transport, the official SDK's typed parsing included."""
    body: dict[str, Any] = {"temperature": 0, "max_tokens": 48}
    if route == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": COUNTING}]
    else:
        body["prompt"] = RAW_PROMPT
    async with connect(create_app(settings_for(), backend=model), transport) as client:
        buffered = await client.post(route, body)
        stream = await client.stream(route, {**body, "stream_options": {"include_usage": True}})
    (choice,) = buffered["choices"]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    assert buffered["object"] == ("chat.completion" if "message" in choice else "text_completion")
    assert "".join(stream.deltas()) == text
    assert stream.finish_reasons() == [choice["finish_reason"]]
    usage = stream.usage()
    assert usage is not None
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert usage[key] == buffered["usage"][key], key
    assert stream.payloads[-1] == "[DONE]"
    if "demo" in model.info.path:
        assert text == SCRIPT and choice["finish_reason"] == "stop"
    record_finding("completion_tokens", buffered["usage"]["completion_tokens"])


@pytest.mark.falsifies("QWEN3_MOE_OPENAI_WIRE_V1_001")
@pytest.mark.anyio
async def test_chat_stream_framing(client: httpx.AsyncClient) -> None:
    body = {"messages": HELLO, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        stream = await sse.aread(response.aiter_lines())
    chunks = stream.chunks
    assert stream.payloads[-1] == "[DONE]"
    assert stream.payloads.count("[DONE]") == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {(c["id"], c["created"], c["model"]) for c in chunks} == {
        (chunks[0]["id"], chunks[0]["created"], "qwen3-moe-demo")
    }
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    final, usage_chunk = chunks[-2], chunks[-1]
    assert final["choices"][0]["delta"] == {}
    assert final["choices"][0]["finish_reason"] == "stop"
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["total_tokens"] > 0
    middle = chunks[1:-2]
    assert middle and all(c["choices"][0]["finish_reason"] is None for c in middle)
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in middle)
    without_usage = {k: v for k, v in body.items() if k != "stream_options"}
    async with client.stream("POST", "/v1/chat/completions", json=without_usage) as response:
        plain = await sse.aread(response.aiter_lines())
    assert plain.usage() is None
    assert plain.chunks[-1]["choices"][0]["finish_reason"] == "stop"


# -- the per-token fast path ------------------------------------------------------------------
# A token's chunk JSON is rendered from a per-request template instead of a pydantic object,
# and events reach sse-starlette already framed as bytes (``app.api.http.sse.frame``), the savings
# the profile (``python -m bench.profile``) found. Both must be invisible on the wire.


def _every_character() -> Iterator[str]:
    """All of Unicode but the surrogates, in pieces, plus the characters JSON escapes."""
    points = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    for start in range(0, len(points), 4096):
        yield "".join(map(chr, points[start : start + 4096]))
    yield from ['"', "\\", "\n", "\r\n", "\t", "\x00", "\x1f", "\x7f", "\u2028", "😀", " ", "a"]


def _formats(model: str = "qwen3-moe-demo") -> list[Format]:
    return [
        CompletionFormat(model),
        ChatFormat(
            model, reasoning_field="reasoning_content", token_bytes=lambda t: b"", logprobs=False
        ),
        ChatFormat(model, reasoning_field="reasoning", token_bytes=lambda t: b"", logprobs=False),
    ]


def _same_as_pydantic(fmt: Format, event: Event) -> None:
    assert fmt.event_json(event) == fmt.event_chunk(event).model_dump_json()


def test_text_chunks_render_as_pydantic_does_for_every_character() -> None:
    """Regression guard for the chunk template: json.dumps must escape as pydantic does."""
    for fmt in _formats():
        for text in _every_character():
            _same_as_pydantic(fmt, Event(Delta(content=text)))
            if isinstance(fmt, ChatFormat):
                _same_as_pydantic(fmt, Event(Delta(reasoning=text)))


def _agent_wires() -> Iterator[tuple[Any, Any]]:
    """A Responses and a Messages wire, each with a block of every kind open: (wire, block)."""
    request = ResponsesRequest.model_validate({"input": "x"})
    responses = ResponsesWire(
        "m", request, responses_as_chat(request, UnsupportedTools(reject=False))
    )
    messages = MessagesWire("m", prompt_tokens=1)
    call = ToolCallDelta(index=0, id="call_1", name="get_weather", arguments="")
    for wire in (responses, messages):
        for delta in (Delta(reasoning="a"), Delta(content="b"), Delta(tool_call=call)):
            wire.event(Event(delta))
        yield from ((wire, block) for block in wire.blocks)


def test_agent_api_deltas_render_as_pydantic_does_for_every_character() -> None:
    """The same guard for the output_text / reasoning_text / function_call_arguments deltas
    of /v1/responses (their sequence_number a second hole) and the text / thinking /
    input_json deltas of /v1/messages."""
    for wire, block in _agent_wires():
        for n, text in enumerate(_every_character()):
            if isinstance(wire, ResponsesWire):
                number = n * 7919
                expected = wire.delta_event(block, text, number)
                rendered = wire.delta_json(block, text, number)
            else:
                expected = wire.delta_event(block, text)
                rendered = wire.delta_json(block, text)
            assert rendered == expected.model_dump_json(exclude_unset=True, by_alias=True)


def test_other_chunks_keep_the_pydantic_path() -> None:
    """Logprobs, tool calls, and a model id that contains the template's marker."""
    with_logprobs = ChatFormat(
        "m", reasoning_field="reasoning_content", token_bytes=lambda t: b"x", logprobs=True
    )
    logprobs = (TokenLogprobs(token_id=5, logprob=-0.25, top=((5, -0.25), (6, -2.0))),)
    _same_as_pydantic(with_logprobs, Event(Delta(content="x"), logprobs))
    call = ToolCallDelta(index=0, id="call_1", name="get_weather", arguments='{"city"')
    for fmt in _formats():
        if isinstance(fmt, ChatFormat):
            _same_as_pydantic(fmt, Event(Delta(tool_call=call)))
    for fmt in _formats(model='odd "<<qwen3-moe-serve text>>" model'):
        _same_as_pydantic(fmt, Event(Delta(content="a\n")))
        assert fmt.event_json(Event(Delta(content="a"))).count('"a"') == 1


def test_frame_writes_one_data_line_per_payload_line() -> None:
    assert frame('{"a":1}') == b'data: {"a":1}\n\n'
    assert frame("[DONE]") == b"data: [DONE]\n\n"
    assert frame("one\ntwo") == b"data: one\ndata: two\n\n"


# -- keep-alive -------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_an_idle_stream_gets_keepalive_comments(demo_backend: Backend, route: str) -> None:
    """While nothing is decoded yet the stream carries ``: keep-alive`` comments (here every
    0.1 s); the first text follows them once the engine starts."""
    held = HeldStart(demo_backend)
    body = (
        {"messages": HELLO, "temperature": 0, "stream": True}
        if route == "/v1/chat/completions"
        else {"prompt": "Hi", "max_tokens": 8, "temperature": 0, "stream": True}
    )
    lines: list[str] = []
    with (
        LiveServer(create_app(settings_for(sse_keepalive_s=0.1), backend=held)) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
        http.stream("POST", route, json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["connection"] == "keep-alive"
        for line in response.iter_lines():
            lines.append(line)
            if sum(line.startswith(":") for line in lines) == 2:
                held.release.set()
    events = list(sse.events(lines))
    first_text = next(
        i
        for i, (kind, value) in enumerate(events)
        if kind == "data" and value != "[DONE]" and text_of(json.loads(value))
    )
    comments = [value for kind, value in events[:first_text] if kind == "comment"]
    assert comments == ["keep-alive", "keep-alive"]
    stream = sse.read(lines)
    assert stream.payloads[-1] == "[DONE]"
    if route == "/v1/chat/completions":
        assert "".join(stream.deltas()) == SCRIPT


# -- speed ------------------------------------------------------------------------------------


def _engine_ms_per_token(backend: Backend, prompt: list[int], n_tokens: int) -> float:
    """The engine's own median time between tokens, in-process, with a no-op callback."""
    stamps: list[float] = []

    def on_token(_: int) -> bool:
        stamps.append(time.perf_counter())
        return True

    asyncio.run(backend.generate(prompt, GREEDY, n_tokens, on_token))
    return statistics.median(b - a for a, b in itertools.pairwise(stamps)) * 1000


def _client_gaps_ms(http: httpx.Client, n_tokens: int) -> list[float]:
    """Gaps between arrivals of consecutive content events, timed on the raw bytes.

    Events that arrive in the same read share its time (a gap of 0): the client could not
    tell them apart, and the caller checks that this stays the exception. The read loop only
    timestamps what arrives (parsing waits until the stream ends), so the client takes as
    little CPU as it can from the server it measures.
    """
    body = {"prompt": RAW_PROMPT, "temperature": 0, "max_tokens": n_tokens, "stream": True}
    received: list[tuple[float, bytes]] = []
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        for data in response.iter_raw():
            received.append((time.perf_counter(), data))
    arrivals: list[float] = []
    pending = b""
    for arrived, data in received:
        *events, pending = (pending + data).split(b"\n\n")
        for event in events:
            if event.startswith(b"data: {") and text_of(json.loads(event[len(b"data: ") :])):
                arrivals.append(arrived)
    return [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]


@pytest.mark.parametrize("model", ["slow-single", "slow-batched", "real-single"], indirect=True)
@pytest.mark.falsifies(f"{STREAMING}_003")
def test_client_sees_tokens_at_engine_speed(
    model: Backend, contract_threshold: ContractThreshold, record_finding: RecordFinding
) -> None:
    """Five trials, each an engine run then an HTTP run of the same prompt; each side is
    judged by its best trial, the one least disturbed by load from elsewhere on the machine.
    A wrapper that adds latency adds it to every trial, so its best trial shows it too."""
    gap_max = contract_threshold(f"{STREAMING}_003", "median_gap_ms_max")
    ratio_max = contract_threshold(f"{STREAMING}_003", "gap_to_engine_ratio_max")
    n_tokens = 64
    prompt = model.tokenizer.tokenize(RAW_PROMPT)
    engine_ms: list[float] = []
    client_ms: list[float] = []
    shared_reads: list[int] = []  # per trial, events that arrived in the read of another
    with (
        LiveServer(create_app(settings_for(), backend=model)) as server,
        httpx.Client(base_url=server.url, timeout=120) as http,
    ):
        for _ in range(5):
            engine_ms.append(_engine_ms_per_token(model, prompt, n_tokens))
            gaps = _client_gaps_ms(http, n_tokens)
            assert len(gaps) >= 16, f"only {len(gaps) + 1} content events to time"
            shared_reads.append(sum(g == 0 for g in gaps))
            # Most events must arrive in reads of their own, or there are no gaps to time.
            assert shared_reads[-1] < len(gaps) / 2, f"{shared_reads[-1]} events shared a read"
            client_ms.append(statistics.median(gaps))
    gap, engine = min(client_ms), min(engine_ms)
    record_finding("median_gap_ms", round(gap, 3))
    record_finding("engine_ms_per_token", round(engine, 3))
    record_finding("gap_to_engine_ratio", round(gap / engine, 3))
    record_finding("median_gap_ms_per_trial", " ".join(f"{g:.2f}" for g in client_ms))
    record_finding("engine_ms_per_trial", " ".join(f"{e:.2f}" for e in engine_ms))
    record_finding("events_sharing_a_read_per_trial", " ".join(map(str, shared_reads)))
    assert gap < gap_max
    assert gap / engine <= ratio_max


# -- clients that leave -----------------------------------------------------------------------


@pytest.mark.parametrize("model", ["slow-single", "slow-batched", "real-single"], indirect=True)
@pytest.mark.falsifies(f"{STREAMING}_004")
def test_a_client_that_leaves_mid_stream_frees_the_engine(
    model: Backend, contract_threshold: ContractThreshold, record_finding: RecordFinding
) -> None:
    follow_up_max = contract_threshold(f"{STREAMING}_004", "follow_up_ms_max")
    observed = InjectedBackend(model)
    long = {"messages": [{"role": "user", "content": COUNTING}], "temperature": 0}
    with (
        LiveServer(create_app(settings_for(), backend=observed)) as server,
        httpx.Client(base_url=server.url, timeout=60) as http,
    ):
        body = {**long, "stream": True, "max_tokens": 1500}
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            for n, _ in enumerate(content_events(response.iter_lines())):
                if n == 3:
                    break  # leaving the block closes the connection mid-stream
        started = time.perf_counter()
        follow_up = http.post("/v1/chat/completions", json={**long, "max_tokens": 4})
        waited_ms = (time.perf_counter() - started) * 1000
    assert follow_up.status_code == 200
    assert follow_up.json()["usage"]["completion_tokens"] == 4
    left, served = observed.seen
    assert left.finish == "cancelled" and len(left.tokens) < 1500
    assert left.calls_after_end == [], "a token was reported after the client left"
    assert served.finish == "length"
    record_finding("abandoned_after_tokens", len(left.tokens))
    record_finding("follow_up_ms", round(waited_ms, 1))
    assert waited_ms <= follow_up_max


class HeldTokens(InjectedBackend):
    """Pauses a chosen generation after its first token (a consumer that stopped), via its
    flow, until released."""

    def __init__(self, inner: Backend, hold: set[int]) -> None:
        super().__init__(inner)
        self.hold = hold
        self.gates: dict[int, Flow] = {}
        self.holding = threading.Event()

    def flow(self, seen: Seen, flow: Flow | None) -> Flow | None:
        if seen.index in self.hold:
            self.gates[seen.index] = Flow()
            return self.gates[seen.index]
        return flow

    def watch(self, seen: Seen, on_token: OnToken) -> OnToken:
        if seen.index not in self.hold:
            return on_token

        def first_then_hold(token_id: int) -> bool:
            if len(seen.tokens) == 1:
                self.gates[seen.index].pause()
                self.holding.set()
            return on_token(token_id)

        return first_then_hold

    def release(self, index: int) -> None:
        seen = self.seen[index]
        seen.loop.call_soon_threadsafe(self.gates[index].resume)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.falsifies("QWEN3_MOE_REQUEST_ISOLATION_V1_002")
def test_a_queued_request_whose_client_leaves_never_reaches_the_engine(
    engine: str, demo_model_path: Any, demo_backend: Backend
) -> None:
    """A request waiting behind running ones (one running on the single engine, two on a
    two-slot batching engine) is dropped when its client leaves: no token is decoded for it,
    and the KV cache still holds the running requests' prompts afterwards."""
    inner = demo_backend if engine == "single" else load_batched(demo_model_path, parallel=2)
    running = 1 if engine == "single" else 2
    held = HeldTokens(inner, hold=set(range(running)))
    prompts = [[{"role": "user", "content": f"Request {i} " * 8}] for i in range(running + 1)]
    try:
        with (
            LiveServer(create_app(settings_for(), backend=held)) as server,
            ThreadPoolExecutor(running) as pool,
        ):

            def ask(index: int, **extra: Any) -> dict[str, Any]:
                body = {"messages": prompts[index], "temperature": 0, "max_tokens": 8, **extra}
                with httpx.Client(base_url=server.url, timeout=30) as http:
                    response = http.post("/v1/chat/completions", json=body)
                    assert response.status_code == 200, response.text
                    result: dict[str, Any] = response.json()
                    return result

            first = [pool.submit(ask, i) for i in range(running)]
            wait_until(lambda: len(held.gates) == running and held.holding.is_set())
            wait_until(lambda: all(held.seen[i].tokens for i in range(running)))
            with (
                httpx.Client(base_url=server.url, timeout=0.5) as impatient,
                pytest.raises(httpx.ReadTimeout),
            ):
                impatient.post(
                    "/v1/chat/completions",
                    json={"messages": prompts[running], "temperature": 0, "max_tokens": 8},
                )
            admission = server.app.state.service.admission
            wait_until(lambda: admission.in_flight == running)  # the server saw it leave
            for index in range(running):
                held.release(index)
            for future in first:
                assert future.result()["usage"]["completion_tokens"] == 8
            again = [ask(i) for i in range(running)]
    finally:
        if inner is not demo_backend:
            inner.close()
    abandoned = held.seen[running]
    assert abandoned.tokens == [] and abandoned.finish == "cancelled"
    for result in again:  # every running prompt is still cached: the abandoned one took none
        usage = result["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] - 1


def test_a_client_that_leaves_during_prefill_stops_the_prefill(
    slow_batched: BatchedLlamaBackend,
) -> None:
    """On the batching engine a long prompt is decoded over many steps; a client that leaves
    meanwhile frees the slot before the prompt is done: no token is sampled, and a retry finds
    less than the whole prompt in the cache."""
    observed = InjectedBackend(slow_batched)
    long_prompt = slow_batched.tokenizer.tokenize("The quick brown fox jumps. " * 400)[:1800]
    body = {"prompt": long_prompt, "max_tokens": 2, "temperature": 0}
    with (
        LiveServer(create_app(settings_for(), backend=observed)) as server,
        httpx.Client(base_url=server.url, timeout=60) as http,
    ):
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            wait_until(lambda: slow_batched.running == 1)  # in its slot: prefilling; leave
        wait_until(lambda: bool(observed.seen) and observed.seen[0].ended)
        retry = http.post("/v1/completions", json=body).json()
    left = observed.seen[0]
    assert left.finish == "cancelled" and left.tokens == []
    assert retry["usage"]["prompt_tokens"] == 1800
    assert retry["usage"]["prompt_tokens_details"]["cached_tokens"] < 1799


class SlowSocket:
    """ASGI middleware: the response to a request with ``x-test-slow-reader`` is written only
    while ``reading`` is set (a client that stopped reading and filled its socket)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.reading = asyncio.Event()
        self.blocked = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (b"x-test-slow-reader", b"1") not in scope["headers"]:
            await self.app(scope, receive, send)
            return

        async def slow_send(message: Message) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                if not self.reading.is_set():
                    self.blocked.set()
                await self.reading.wait()
            await send(message)

        await self.app(scope, receive, slow_send)


def test_a_slow_reader_stalls_only_its_own_stream(demo_batched: Backend) -> None:
    """A client that stops reading makes its own generation wait in its slot (its output
    fills, its flow pauses, the engine parks the sequence) while other streams run to the end;
    once it reads again it gets exactly the answer it gets alone."""
    observed = InjectedBackend(demo_batched)
    app = create_app(settings_for(stream_buffer_tokens=4), backend=observed)
    slow = SlowSocket(app)
    body = {"prompt": "Hello", "max_tokens": 40, "temperature": 0, "stream": True}
    with (
        LiveServer(slow) as server,  # type: ignore[arg-type]
        httpx.Client(base_url=server.url, timeout=60) as http,
        ThreadPoolExecutor(1) as pool,
    ):

        def slow_stream() -> str:
            with httpx.Client(base_url=server.url, timeout=60) as own:
                headers = {"x-test-slow-reader": "1"}
                with own.stream("POST", "/v1/completions", json=body, headers=headers) as r:
                    return "".join(sse.read(r.iter_lines()).deltas())

        stalled = pool.submit(slow_stream)
        assert slow.blocked.wait(timeout=30)
        wait_until(lambda: bool(observed.seen) and len(observed.seen[0].tokens) >= 4)
        parked_at = len(observed.seen[0].tokens)
        for start in range(6):
            other = {"prompt": f"Hello {start}", "max_tokens": 8, "temperature": 0}
            result = http.post("/v1/completions", json=other).json()
            assert result["usage"]["completion_tokens"] == 8
        assert not stalled.done()
        assert len(observed.seen[0].tokens) < 40, "the unread stream was not parked"
        assert len(observed.seen[0].tokens) <= parked_at + 2
        server_loop = observed.seen[0].loop
        server_loop.call_soon_threadsafe(slow.reading.set)
        together = stalled.result()
        alone = http.post("/v1/completions", json={**body, "stream": False}).json()
    assert together == alone["choices"][0]["text"]
    assert alone["usage"]["completion_tokens"] == 40


# -- isolation --------------------------------------------------------------------------------


@pytest.mark.falsifies("QWEN3_MOE_REQUEST_ISOLATION_V1_001")
def test_overlapping_streams_both_complete_in_arrival_order(slow_backend: Backend) -> None:
    """On the one-at-a-time engine a second stream waits for the first, which it never
    interrupts (llama-cpp-python's bundled server does interrupt it)."""
    observed = InjectedBackend(slow_backend)

    def stream(http: httpx.Client, max_tokens: int) -> tuple[sse.Stream, float]:
        body = {"messages": HELLO, "temperature": 0, "stream": True, "max_tokens": max_tokens}
        body["stream_options"] = {"include_usage": True}
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            result = sse.read(response.iter_lines())
        return result, time.monotonic()

    with (
        LiveServer(create_app(settings_for(), backend=observed)) as server,
        httpx.Client(base_url=server.url, timeout=60) as first_client,
        httpx.Client(base_url=server.url, timeout=60) as second_client,
        ThreadPoolExecutor(2) as pool,
    ):
        first = pool.submit(stream, first_client, 200)
        wait_until(lambda: bool(observed.seen) and bool(observed.seen[0].tokens))
        second = pool.submit(stream, second_client, 50)
        (a, a_done), (b, b_done) = first.result(), second.result()
    for result, expected in ((a, 200), (b, 50)):
        assert result.payloads[-1] == "[DONE]"
        assert result.finish_reasons() == ["length"]
        usage = result.usage()
        assert usage is not None and usage["completion_tokens"] == expected
    assert [len(s.tokens) for s in observed.seen] == [200, 50]
    assert a_done <= b_done


@pytest.mark.parametrize("model", ["slow-single", "slow-batched"], indirect=True)
@pytest.mark.falsifies("QWEN3_MOE_REQUEST_ISOLATION_V1_003")
def test_the_event_loop_answers_while_the_engine_decodes(model: Backend) -> None:
    """While a long generation decodes, /health and /v1/models answer from the same server
    without waiting for it to finish."""
    observed = InjectedBackend(model)
    body = {"prompt": "Once", "max_tokens": 1500, "temperature": 0, "stream": True}
    with (
        LiveServer(create_app(settings_for(), backend=observed)) as server,
        httpx.Client(base_url=server.url, timeout=60) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        events = content_events(response.iter_lines())  # kept: dropping it closes the stream
        next(events)  # decoding
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/v1/models").status_code == 200
        assert not observed.seen[0].ended, "the answers waited for the generation to finish"


# -- a real vocabulary ------------------------------------------------------------------------


@pytest.mark.falsifies("QWEN3_MOE_TEXT_INTEGRITY_V1_004")
@pytest.mark.anyio
async def test_real_vocabulary_streams_whole_characters(
    real_backend: Backend, record_finding: RecordFinding
) -> None:
    body = {
        "messages": [
            {
                "role": "user",
                "content": "Write 'good morning, café' in Chinese, Japanese and Greek, "
                "then add three emoji. No explanations.",
            }
        ],
        "temperature": 0,
        "max_tokens": 96,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    async with connect(create_app(settings_for(), backend=real_backend), "socket") as client:
        buffered = await client.post("/v1/chat/completions", body)
        deltas = (await client.stream("/v1/chat/completions", body)).deltas()
    joined = "".join(deltas)
    assert all("\ufffd" not in d for d in deltas)
    assert joined == buffered["choices"][0]["message"]["content"]
    non_ascii = sum(ord(ch) > 0x7F for ch in joined)
    assert non_ascii, "the model wrote only ASCII: nothing multi-byte was tested"
    record_finding("non_ascii_characters", non_ascii)
