"""Application factory: ``create_app(settings)`` builds the app; the lifespan owns the model.

Nothing heavy happens at import time. The lifespan checks the model path (a typo fails the
start at once, with the path in the message), then loads the model on a worker thread while
the server already answers: ``/health`` says 503 ``loading`` until the model is ready, so an
orchestrator can tell "starting" from "dead". Tests pass a ready backend instead, so one
loaded model serves many apps.

SIGTERM drains before the server stops: new requests get 503 (``/health`` says ``draining``),
running ones get ``--shutdown-grace-s`` to finish and then end with an in-band error and
``[DONE]``; only then is the signal handed on to uvicorn, whose own graceful shutdown would
otherwise cancel the streams mid-token after its timeout.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from types import FrameType

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app import __version__
from app.api import chat, completions, infill, messages, ops, responses
from app.api.errors import install_error_handlers
from app.api.metrics import Metrics
from app.api.observability import RequestLogMiddleware
from app.api.security import ApiKeyMiddleware, BodyLimitMiddleware, load_api_keys
from app.core.limits import Limits
from app.core.prepare import ChatSemantics
from app.core.service import GenerationService
from app.engine import Backend, load_backend
from app.settings import Settings

logger = logging.getLogger(__name__)


def resolve_model_path(settings: Settings) -> Path:
    """The GGUF to serve: ``--model``, or the demo model built once into the cache dir."""
    if settings.model is not None:
        if not settings.model.is_file():
            raise FileNotFoundError(f"model file not found: {settings.model}")
        return settings.model
    from app.demo import ensure_demo_model

    path = ensure_demo_model(settings.cache_dir)
    logger.info("no --model given: serving the embedded demo model %s", path)
    return path


DEMO_MODEL_ID = "qwen3-moe-demo"


def model_names(settings: Settings, model_path: Path) -> tuple[str, ...]:
    """The id listed by /v1/models first, then every other name a request may use."""
    served = DEMO_MODEL_ID if settings.model is None else model_path.name.removesuffix(".gguf")
    if settings.model_alias and settings.model_alias != served:
        return (settings.model_alias, served)
    return (served,)


def create_app(settings: Settings | None = None, *, backend: Backend | None = None) -> FastAPI:
    """The app; with ``backend`` given it serves that (already loaded) model and never closes it."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.service = None
        app.state.load_status = "loading"
        app.state.started_at = int(time.time())
        if backend is not None:
            model_path = Path(backend.info.path)
            _install_service(app, settings, backend, model_path)
            loader = None
        else:
            model_path = await asyncio.to_thread(resolve_model_path, settings)
            loader = asyncio.create_task(_load(app, settings, model_path))
        restore_sigterm = _drain_on_sigterm(app, settings.shutdown_grace_s)
        try:
            yield
        finally:
            restore_sigterm()
            if loader is not None:
                with suppress(asyncio.CancelledError):
                    await loader
            service: GenerationService | None = app.state.service
            app.state.service = None
            if service is not None:
                await service.aclose()
                if backend is None:  # an injected backend belongs to the caller
                    await asyncio.to_thread(service.backend.close)

    app = FastAPI(title="qwen3-moe-serve", version=__version__, lifespan=lifespan)
    app.state.metrics = Metrics()
    install_error_handlers(app)
    for module in (chat, completions, infill, responses, messages, ops):
        app.include_router(module.router)
    _install_middleware(app, settings)
    return app


OPS_PATHS = ("/health", "/metrics")


def _install_middleware(app: FastAPI, settings: Settings) -> None:
    """Outermost first: request id and access log, CORS, body limit, then API keys."""
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    keys = load_api_keys(api_key, settings.api_key_file)
    if keys:
        open_paths = () if settings.protect_health_metrics else OPS_PATHS
        app.add_middleware(ApiKeyMiddleware, keys=keys, open_paths=open_paths)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    origins = [o.strip() for o in (settings.cors_origins or "").split(",") if o.strip()]
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "X-Request-Id",
                # Anthropic's clients: the key header and the version and beta headers.
                "X-Api-Key",
                "Anthropic-Version",
                "Anthropic-Beta",
                "Anthropic-Dangerous-Direct-Browser-Access",
            ],
            expose_headers=["X-Request-Id"],
        )
    app.add_middleware(RequestLogMiddleware)


def _install_service(app: FastAPI, settings: Settings, backend: Backend, path: Path) -> None:
    app.state.service = GenerationService(
        backend,
        model_names=model_names(settings, path),
        stream_buffer_tokens=settings.stream_buffer_tokens,
        semantics=ChatSemantics(
            reasoning_format=settings.reasoning_format,
            enable_thinking=settings.enable_thinking,
            tool_call_format=settings.tool_call_format,
            reasoning_budget=settings.reasoning_budget,
        ),
        max_queue=settings.max_queue,
        request_timeout_s=settings.request_timeout_s,
        max_tokens_limit=settings.max_tokens_limit,
        limits=Limits.from_settings(settings),
        completions_parse_special=settings.completions_parse_special,
        fim_window=settings.fim_window,
        accept_any_model=settings.accept_any_model,
    )
    admission = app.state.service.admission
    metrics: Metrics = app.state.metrics
    metrics.track_load(
        running=lambda: min(admission.in_flight, admission.concurrency),
        waiting=lambda: max(admission.in_flight - admission.concurrency, 0),
        kv_cache_usage=backend.kv_cache_usage,
    )
    metrics.track_prompt_cache(backend.prompt_cache_stats)
    app.state.load_status = "ok"


async def drain(app: FastAPI, grace_s: float) -> None:
    """Stop admitting (503), let running generations finish for ``grace_s``, end the rest."""
    service: GenerationService | None = app.state.service
    if service is None:
        return
    app.state.load_status = "draining"
    logger.info(
        "draining: %d request(s) in flight, grace %.1fs", service.admission.in_flight, grace_s
    )
    await service.admission.drain(grace_s)


def _drain_on_sigterm(app: FastAPI, grace_s: float) -> Callable[[], None]:
    """Make SIGTERM drain the app first, then pass it on to the previous handler (uvicorn's).

    Signals reach only the main thread; an app served from another thread (the tests' live
    servers) keeps the server's own handling. A second SIGTERM passes on at once.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)
    signalled: list[int] = []
    draining: list[asyncio.Task[None]] = []

    def pass_on() -> None:
        signal.signal(signal.SIGTERM, previous)
        if callable(previous):
            previous(signal.SIGTERM, None)
        else:
            signal.raise_signal(signal.SIGTERM)

    async def drain_then_pass_on() -> None:
        try:
            await drain(app, grace_s)
        finally:
            pass_on()

    def start_draining() -> None:
        draining.append(loop.create_task(drain_then_pass_on()))

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if signalled:
            pass_on()
            return
        signalled.append(signum)
        loop.call_soon_threadsafe(start_draining)

    signal.signal(signal.SIGTERM, on_sigterm)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, previous)

    return restore


async def _load(app: FastAPI, settings: Settings, model_path: Path) -> None:
    started = time.perf_counter()
    try:
        backend = await asyncio.to_thread(load_backend, settings, model_path)
    except Exception:
        app.state.load_status = "failed"
        logger.exception("could not load model %s", model_path)
        return
    _install_service(app, settings, backend, model_path)
    logger.info(
        "model %s ready in %.2fs (gpu offload: %s)",
        model_path.name,
        time.perf_counter() - started,
        backend.info.gpu_offload,
    )
