"""Continuous batching (``BatchedLlamaBackend``) on the real engine: exactness beside other
streams, per-request seeds, prefix reuse and slot choice, every slot's whole context, and the
backend's own queue and shutdown.

Exactness is tested on the scripted demo model, whose greedy output is known token by token:
a prompt that ends partway through the script continues from there, so every concurrent
stream sits at its own position of the script and a sequence that received another's logits
or KV cells would say the wrong next word. (On random weights, a different batch composition
may legitimately change a near-tie: llama.cpp's matrix kernels round differently by batch
shape, so random-weight tests compare only what must be identical.)

Admission and the queue in front of the engine: ``test_admission``; the output queue and the
engine -> loop hand-off: ``test_output_and_handoff``; draining: ``test_shutdown``;
grammar-constrained sampling: ``test_grammar_sampling``.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
import pytest

from app.engine import Backend, EngineError, Flow, OnToken, SamplingParams, load_backend
from app.engine.batched import BatchedLlamaBackend, Slot, choose_slot
from app.engine.llama_backend import LlamaBackend
from app.main import create_app
from app.settings import Settings
from tests import sse
from tests.support.clients import HELLO
from tests.support.injection import InjectedBackend, Seen
from tests.support.models import engine_config, load, load_batched
from tests.support.servers import LiveServer, settings_for

GREEDY = SamplingParams(temperature=0.0)


async def collect(backend: Backend, prompt: list[int], n: int, **sampling: Any) -> list[int]:
    """The tokens of one generation of at most ``n`` (greedy unless ``sampling`` says)."""
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
        return cached(usage) < int(usage["prompt_tokens"]) // 10

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
