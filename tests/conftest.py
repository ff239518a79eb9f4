"""Shared fixtures: the real engine on the project's own GGUFs, in-process and over a socket.

Models. The scripted demo model (its greedy answer to any chat prompt is a known script) and
a small random-weight model that never ends a generation (~3 ms/token here) are built once
per session; ``real`` is the GGUF named by ``$QWEN3_MOE_GGUF_PATH`` (tests that need it skip,
recorded SKIPPED, without it).

Engines. Every invariant that must hold for both backends is parametrised over ``ENGINES``:
``single`` (``LlamaBackend``, one generation at a time) and ``batched``
(``BatchedLlamaBackend`` with four slots). Each is loaded once per session; tests that need a
fresh backend state (slot caches, queues) build their own.

Transports. ``asgi`` is httpx on the app in-process, ``socket`` a real uvicorn on a loopback
port, ``sdk`` the official ``openai`` client over that socket; ``Client`` gives every test the
same two calls over any of them.

Fault injection and observation go through ``InjectedBackend``, a wrapper around the real
engine: never the only evidence for a behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI

from app.demo import ChatTemplateName, ensure_demo_model
from app.engine import (
    Backend,
    Flow,
    GenerationResult,
    OnLogprobs,
    OnToken,
    PromptCacheStats,
    SamplingParams,
)
from app.engine.batched import BatchedLlamaBackend
from app.engine.llama import EngineConfig
from app.engine.single import LlamaBackend
from app.main import create_app
from app.settings import Settings
from bench.model import ensure_bench_model
from tests import sse
from tests.server_process import free_port

SLOW_MODEL = {"n_layer": 4, "n_embd": 512, "n_expert": 8, "n_expert_used": 2, "n_ff_exp": 256}
ENGINES = ("single", "batched")
HELLO = [{"role": "user", "content": "Hello!"}]

# The contract plugin binds tests to falsifiers and writes findings.json; pytester tests it.
pytest_plugins = ["pytester", "tests.contracts_plugin"]

REAL_MODEL_ENV = "QWEN3_MOE_GGUF_PATH"
REAL_MODEL_THREADS_ENV = "QWEN3_MOE_TEST_N_THREADS"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll an observable condition (never a bare sleep standing in for one)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """``wait_until`` for async tests: the event loop keeps running while it polls."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


# -- models and engines -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def demo_model_path(model_cache: Path) -> Path:
    return ensure_demo_model(model_cache)


@pytest.fixture(scope="session")
def slow_model_path(model_cache: Path) -> Path:
    """Random weights that never emit EOS, ~3 ms/token here: long generations (disconnects)."""
    return ensure_bench_model(model_cache, **SLOW_MODEL)


def engine_config(
    path: Path, *, n_ctx: int = 2048, n_batch: int = 256, **knobs: Any
) -> EngineConfig:
    """The tests' engine settings; ``knobs`` sets any other ``EngineConfig`` field."""
    return EngineConfig(
        model_path=path,
        n_ctx=n_ctx,
        n_gpu_layers=0,
        n_threads=1,
        n_threads_batch=1,
        n_batch=n_batch,
        flash_attn=knobs.pop("flash_attn", "off"),
        **knobs,
    )


def load(path: Path, n_ctx: int = 2048) -> LlamaBackend:
    """The one-generation-at-a-time engine on ``path``."""
    return LlamaBackend(engine_config(path, n_ctx=n_ctx))


def load_batched(
    path: Path, *, parallel: int = 4, n_ctx: int = 1024, n_batch: int = 64
) -> BatchedLlamaBackend:
    """The batching engine on ``path``: ``parallel`` slots of ``n_ctx`` tokens."""
    return BatchedLlamaBackend(engine_config(path, n_ctx=n_ctx, n_batch=n_batch), parallel=parallel)


@pytest.fixture(scope="session")
def demo_backend(demo_model_path: Path) -> Iterator[LlamaBackend]:
    backend = load(demo_model_path)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def demo_batched(demo_model_path: Path) -> Iterator[BatchedLlamaBackend]:
    backend = load_batched(demo_model_path, n_ctx=2048)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def slow_backend(slow_model_path: Path) -> Iterator[LlamaBackend]:
    backend = load(slow_model_path)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def slow_batched(slow_model_path: Path) -> Iterator[BatchedLlamaBackend]:
    backend = load_batched(slow_model_path, parallel=2, n_ctx=2048)
    yield backend
    backend.close()


MODELS = ("demo-single", "demo-batched", "slow-single", "slow-batched", "real-single")


@pytest.fixture(params=MODELS)
def model(request: pytest.FixtureRequest) -> Backend:
    """Every model on every engine it must stream from (the real one when it is given)."""
    name, engine = request.param.split("-")
    fixture = f"{name}_backend" if engine == "single" else f"{name}_batched"
    backend: Backend = request.getfixturevalue(fixture)
    return backend


@pytest.fixture(params=ENGINES)
def demo_engine(request: pytest.FixtureRequest) -> Backend:
    """The demo model on each engine in turn."""
    name = "demo_backend" if request.param == "single" else "demo_batched"
    backend: Backend = request.getfixturevalue(name)
    return backend


@pytest.fixture(params=ENGINES)
def slow_engine(request: pytest.FixtureRequest) -> Backend:
    """The slow random model on each engine in turn."""
    name = "slow_backend" if request.param == "single" else "slow_batched"
    backend: Backend = request.getfixturevalue(name)
    return backend


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Backend]]:
    """``scripted(script, engine="single", template="qwen3")``: the demo model variant whose
    greedy output is ``script``, carrying ``template`` (``qwen3_coder``: Qwen3-Coder's chat
    template), on ``engine``; each is built and loaded once per module.

    Qwen3-Coder's template renders a long tool prompt (about 1,500 of the demo vocabulary's
    mostly byte-sized tokens), so its variants get a 4096-token context on both engines.
    """
    cache = tmp_path_factory.mktemp("scripted")
    loaded: dict[tuple[tuple[bytes, ...], str, str], Backend] = {}

    def backend(
        script: Sequence[bytes], engine: str = "single", template: ChatTemplateName = "qwen3"
    ) -> Backend:
        key = (tuple(script), engine, template)
        if key not in loaded:
            path = ensure_demo_model(cache, key[0], template=template)
            n_ctx = 4096 if template == "qwen3_coder" else None
            if engine == "single":
                loaded[key] = load(path, n_ctx=n_ctx or 2048)
            else:
                loaded[key] = load_batched(path, parallel=2, n_ctx=n_ctx or 1024)
        return loaded[key]

    yield backend
    for b in loaded.values():
        b.close()


@pytest.fixture(scope="session")
def real_model_path() -> Path:
    """A real Qwen3-MoE GGUF named by ``$QWEN3_MOE_GGUF_PATH``; tests needing one skip without.

    A path that is set but wrong is an error, not a skip: a typo must not turn a discharge run
    into a run that quietly proved nothing.
    """
    value = os.environ.get(REAL_MODEL_ENV)
    if not value:
        pytest.skip(f"{REAL_MODEL_ENV} is not set: no real Qwen3-MoE model to test")
    path = Path(value).expanduser()
    if not path.is_file():
        pytest.fail(f"{REAL_MODEL_ENV}={value} is not a file", pytrace=False)
    return path


@pytest.fixture(scope="session")
def real_backend(real_model_path: Path) -> Iterator[LlamaBackend]:
    """The real model with every layer offloaded to the GPU when llama.cpp has one."""
    threads = int(os.environ.get(REAL_MODEL_THREADS_ENV, "1"))
    config = EngineConfig(
        model_path=real_model_path,
        n_ctx=4096,
        n_gpu_layers=-1,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        flash_attn="off",
    )
    backend = LlamaBackend(config)
    if backend.info.architecture != "qwen3moe":
        backend.close()
        pytest.fail(
            f"{real_model_path} is a {backend.info.architecture!r} model, not qwen3moe",
            pytrace=False,
        )
    yield backend
    backend.close()


# -- fault injection and observation ---------------------------------------------------------


@dataclass
class Seen:
    """One generation as the wrapper saw it."""

    index: int
    prompt: list[int]
    loop: asyncio.AbstractEventLoop
    """The loop the generation's callbacks run on (a test thread reaches it with
    ``call_soon_threadsafe``)."""
    tokens: list[int] = field(default_factory=list)
    result: GenerationResult | None = None
    refused: bool = False
    """``on_token`` said False."""
    cancelled: bool = False
    """The caller cancelled the generation (its client left, or the server aborted it)."""
    calls_after_end: list[int] = field(default_factory=list)
    """Tokens reported after ``on_token`` said False or the generation was cancelled."""

    @property
    def ended(self) -> bool:
        return self.result is not None or self.cancelled

    @property
    def finish(self) -> str | None:
        if self.cancelled or self.refused:
            return "cancelled"
        return None if self.result is None else self.result.finish_reason


class InjectedBackend:
    """The real engine with a test's hooks around every generation.

    ``started(seen)`` is awaited before the generation reaches the engine; ``watch(seen,
    on_token)`` wraps its callback (which runs on the event loop); ``flow(seen, flow)`` may
    replace the consumer's backpressure with the test's own. Every generation is recorded in
    ``seen``, cancelled ones included.
    """

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.info = inner.info
        self.tokenizer = inner.tokenizer
        self.max_concurrency = inner.max_concurrency
        self.seen: list[Seen] = []

    def kv_cache_usage(self) -> float:
        return self.inner.kv_cache_usage()

    def prompt_cache_stats(self) -> PromptCacheStats | None:
        return self.inner.prompt_cache_stats()

    def check_grammar(self, grammar: str) -> None:
        self.inner.check_grammar(grammar)

    async def started(self, seen: Seen) -> None:
        pass

    def watch(self, seen: Seen, on_token: OnToken) -> OnToken:
        return on_token

    def flow(self, seen: Seen, flow: Flow | None) -> Flow | None:
        return flow

    async def generate(
        self,
        prompt_tokens: Sequence[int],
        sampling: SamplingParams,
        max_tokens: int,
        on_token: OnToken,
        *,
        on_logprobs: OnLogprobs | None = None,
        flow: Flow | None = None,
    ) -> GenerationResult:
        seen = Seen(len(self.seen), list(prompt_tokens), asyncio.get_running_loop())
        self.seen.append(seen)
        watched = self.watch(seen, on_token)

        def observed(token_id: int) -> bool:
            if seen.refused or seen.cancelled:
                seen.calls_after_end.append(token_id)
            seen.tokens.append(token_id)
            keep = watched(token_id)
            seen.refused = seen.refused or not keep
            return keep

        try:
            await self.started(seen)
            seen.result = await self.inner.generate(
                prompt_tokens,
                sampling,
                max_tokens,
                observed,
                on_logprobs=on_logprobs,
                flow=self.flow(seen, flow),
            )
        except asyncio.CancelledError:
            seen.cancelled = True
            raise
        return seen.result

    def close(self) -> None:
        raise AssertionError("an injected backend is never closed by the app")


class HeldStart(InjectedBackend):
    """The demo model, held before decoding (a long prefill or a queue) until released."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.release = threading.Event()

    async def started(self, seen: Seen) -> None:
        await asyncio.to_thread(self.release.wait, 30)


class FailingBackend(InjectedBackend):
    """Fault injection: the real engine, failing after ``after`` tokens."""

    def __init__(self, inner: Backend, after: int) -> None:
        super().__init__(inner)
        self._after = after

    def watch(self, seen: Seen, on_token: OnToken) -> OnToken:
        def failing(token_id: int) -> bool:
            if len(seen.tokens) > self._after:
                raise RuntimeError("llama_decode returned -3 at 0xdeadbeef")
            return on_token(token_id)

        return failing


# -- apps and transports ----------------------------------------------------------------------


def settings_for(**overrides: object) -> Settings:
    """Settings for an app around an injected backend (``model`` unset: the demo model's id).

    Transport tests see the model's raw text (``reasoning_format`` ``none``), so the whole
    demo script is ``content``; the Qwen3 semantics tests set what they test.
    """
    values: dict[str, object] = {"sse_keepalive_s": 15.0, "reasoning_format": "none"}
    values.update(overrides)
    return Settings.model_validate(values)


@contextlib.asynccontextmanager
async def asgi_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client with the app's lifespan running."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


@pytest.fixture
async def client(demo_backend: LlamaBackend) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(create_app(settings_for(), backend=demo_backend)) as c:
        yield c


class LiveServer:
    """A real uvicorn serving ``app`` on 127.0.0.1 in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


@pytest.fixture
def live_server(demo_backend: LlamaBackend) -> Iterator[LiveServer]:
    with LiveServer(create_app(settings_for(), backend=demo_backend)) as server:
        yield server


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
