"""Shared fixtures: the real engine on the project's own GGUFs, in-process and over a socket.

One demo model and one small random-weight model are built per session, each loaded once into
a real ``LlamaBackend``; every app under test is built with ``create_app(settings,
backend=...)``. ``live_server`` runs a real uvicorn on a loopback port in a thread.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from app.backends import Backend, GenerationResult, OnLogprobs, OnToken, SamplingParams
from app.backends.llama import LlamaBackend
from app.demo_model import ensure_demo_model
from app.main import create_app
from app.settings import Settings
from bench.model import ensure_bench_model

SLOW_MODEL = {"n_layer": 4, "n_embd": 512, "n_expert": 8, "n_expert_used": 2, "n_ff_exp": 256}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def demo_model_path(model_cache: Path) -> Path:
    return ensure_demo_model(model_cache)


def load(path: Path, n_ctx: int = 2048) -> LlamaBackend:
    return LlamaBackend(
        path, n_ctx=n_ctx, n_gpu_layers=0, n_threads=1, n_batch=256, flash_attn="off"
    )


class InjectedBackend:
    """Fault injection around the real engine: the same model and tokenizer, with a test's
    hooks around ``generate``: ``watch`` wraps each request's token callback (it runs before
    decoding starts), ``finished`` sees each result."""

    def __init__(self, inner: Backend) -> None:
        self.info = inner.info
        self.tokenizer = inner.tokenizer
        self.inner = inner
        self.check_grammar = inner.check_grammar

    def watch(self, on_token: OnToken) -> OnToken:
        return on_token

    def finished(self, result: GenerationResult) -> None:
        pass

    def generate(
        self,
        prompt: Sequence[int],
        sampling: SamplingParams,
        max_tokens: int,
        on_token: OnToken,
        on_logprobs: OnLogprobs | None = None,
    ) -> GenerationResult:
        watched = self.watch(on_token)
        result = self.inner.generate(prompt, sampling, max_tokens, watched, on_logprobs)
        self.finished(result)
        return result

    def close(self) -> None:
        raise AssertionError("an injected backend is never closed by the app")


class ObservedBackend(InjectedBackend):
    """The engine with its callback watched: every result, every ``on_token`` call made after
    one said False, and an optional ``gate`` run after each token (to hold the engine)."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.results: list[GenerationResult] = []
        self.calls_after_false: list[int] = []
        self.gate: Callable[[int], object] | None = None

    def watch(self, on_token: OnToken) -> OnToken:
        refused = False

        def observed(token_id: int) -> bool:
            nonlocal refused
            if refused:
                self.calls_after_false.append(token_id)
            keep = on_token(token_id)
            if self.gate is not None:
                self.gate(token_id)
            refused = refused or not keep
            return keep

        return observed

    def finished(self, result: GenerationResult) -> None:
        self.results.append(result)


@pytest.fixture(scope="session")
def demo_backend(demo_model_path: Path) -> Iterator[LlamaBackend]:
    backend = load(demo_model_path)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def slow_model_path(model_cache: Path) -> Path:
    """Random weights that never emit EOS, ~3 ms/token here: long generations (disconnects)."""
    return ensure_bench_model(model_cache, **SLOW_MODEL)


@pytest.fixture(scope="session")
def slow_backend(slow_model_path: Path) -> Iterator[LlamaBackend]:
    backend = load(slow_model_path)
    yield backend
    backend.close()


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LiveServer:
    """A real uvicorn serving ``app`` on 127.0.0.1 in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.port = _free_port()
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


@pytest.fixture
def slow_server(slow_backend: LlamaBackend) -> Iterator[LiveServer]:
    with LiveServer(create_app(settings_for(), backend=slow_backend)) as server:
        yield server


# -- contracts --------------------------------------------------------------------------------
# The contract plugin binds tests to falsifiers and writes findings.json; pytester tests it.
pytest_plugins = ["pytester", "tests.contracts_plugin"]

REAL_MODEL_ENV = "QWEN3_MOE_GGUF_PATH"
REAL_MODEL_THREADS_ENV = "QWEN3_MOE_TEST_N_THREADS"


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
    backend = LlamaBackend(
        real_model_path,
        n_ctx=4096,
        n_gpu_layers=-1,
        n_threads=int(os.environ.get(REAL_MODEL_THREADS_ENV, "1")),
        n_batch=512,
        flash_attn="off",
    )
    if backend.info.architecture != "qwen3moe":
        backend.close()
        pytest.fail(
            f"{real_model_path} is a {backend.info.architecture!r} model, not qwen3moe",
            pytrace=False,
        )
    yield backend
    backend.close()
