"""The real engine on the project's own GGUFs: model files, engine settings, loaded backends.

The scripted demo model (its greedy answer to any chat prompt is a known script) and a small
random-weight model that never ends a generation are built once per session; ``real`` is the
GGUF named by ``$QWEN3_MOE_GGUF_PATH`` (tests that need it skip, recorded SKIPPED, without it).

Every invariant that must hold for both backends is parametrised over ``ENGINES``: ``single``
(``LlamaBackend``, one generation at a time) and ``batched`` (``BatchedLlamaBackend`` with four
slots). Each is loaded once per session; tests that need a fresh backend state (slot caches,
queues) build their own with ``load`` or ``load_batched``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from app.demo import ChatTemplateName, ensure_demo_model
from app.engine import Backend
from app.engine.batched import BatchedLlamaBackend
from app.engine.llama_backend import LlamaBackend
from app.engine.llama_setup import EngineConfig
from bench.model import ensure_bench_model

SLOW_MODEL = {"n_layer": 4, "n_embd": 512, "n_expert": 8, "n_expert_used": 2, "n_ff_exp": 256}
"""The random model's shape: slow enough per token for long generations (disconnects)."""
ENGINES = ("single", "batched")
MODELS = ("demo-single", "demo-batched", "slow-single", "slow-batched", "real-single")

REAL_MODEL_ENV = "QWEN3_MOE_GGUF_PATH"
REAL_MODEL_THREADS_ENV = "QWEN3_MOE_TEST_N_THREADS"


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
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache directory for the session's models."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def demo_model_path(model_cache: Path) -> Path:
    return ensure_demo_model(model_cache)


@pytest.fixture(scope="session")
def slow_model_path(model_cache: Path) -> Path:
    """Random weights that never emit EOS: long generations (disconnects, queues, drains)."""
    return ensure_bench_model(model_cache, **SLOW_MODEL)


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


@pytest.fixture
def batched_slow(slow_model_path: Path) -> Iterator[BatchedLlamaBackend]:
    """Two fresh slots of 2048 tokens; small prompt chunks, so a long prompt takes many steps
    (for tests that fill the slots and the queue, or drain them)."""
    backend = load_batched(slow_model_path, parallel=2, n_ctx=2048, n_batch=64)
    yield backend
    backend.close()


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


Scripted = Callable[..., Backend]
"""``scripted(script, engine="single", template="qwen3")``: see the ``scripted`` fixture."""


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scripted]:
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
