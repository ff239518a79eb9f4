"""The app's lifespan: the model loaded (or a ready backend taken), the service wired to it,
SIGTERM draining installed, and all of it closed at the end.

Nothing heavy happens at import time. The lifespan checks the model path (a typo fails the
start at once, with the path in the message), then loads the model on a worker thread while
the server already answers: ``/health`` says 503 ``loading`` until the model is ready, so an
orchestrator can tell "starting" from "dead". Tests pass a ready backend instead, so one
loaded model serves many apps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from pathlib import Path

from fastapi import FastAPI

from app.api.http.metrics import Metrics
from app.core.service import GenerationService
from app.draining import drain_on_sigterm
from app.engine import Backend, load_backend
from app.settings import Settings

logger = logging.getLogger(__name__)


def lifespan_of(
    settings: Settings, backend: Backend | None
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The lifespan of an app serving ``settings``; with ``backend`` given it serves that
    (already loaded) model and never closes it."""

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
        restore_sigterm = drain_on_sigterm(app, settings.shutdown_grace_s)
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

    return lifespan


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


def _install_service(app: FastAPI, settings: Settings, backend: Backend, path: Path) -> None:
    app.state.service = GenerationService.from_settings(
        backend, settings, model_names(settings, path)
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
