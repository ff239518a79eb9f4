"""Application factory: ``create_app(settings)`` builds the app; the lifespan owns the model.

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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

from fastapi import FastAPI

from app import __version__
from app.backends import Backend
from app.errors import install_error_handlers
from app.routes import router
from app.service import GenerationService
from app.settings import Settings

logger = logging.getLogger(__name__)


def resolve_model_path(settings: Settings) -> Path:
    """The GGUF to serve: ``--model``, or the demo model built once into the cache dir."""
    if settings.model is not None:
        if not settings.model.is_file():
            raise FileNotFoundError(f"model file not found: {settings.model}")
        return settings.model
    from app.demo_model import ensure_demo_model

    path = ensure_demo_model(settings.cache_dir)
    logger.info("no --model given: serving the embedded demo model %s", path)
    return path


def load_backend(settings: Settings, model_path: Path) -> Backend:
    from app.backends.llama import LlamaBackend  # the engine import stays out of import time

    template = (
        settings.chat_template_file.read_text(encoding="utf-8")
        if settings.chat_template_file is not None
        else None
    )
    return LlamaBackend(
        model_path,
        n_ctx=settings.n_ctx,
        n_gpu_layers=settings.n_gpu_layers,
        n_threads=settings.n_threads,
        n_batch=settings.n_batch,
        flash_attn=settings.flash_attn,
        chat_template=template,
    )


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
        try:
            yield
        finally:
            if loader is not None:
                with suppress(asyncio.CancelledError):
                    await loader
            service: GenerationService | None = app.state.service
            app.state.service = None
            if service is not None:
                await asyncio.to_thread(service.close)
                if backend is None:  # an injected backend belongs to the caller
                    service.backend.close()

    app = FastAPI(title="qwen3-moe-serve", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(router)
    return app


def _install_service(app: FastAPI, settings: Settings, backend: Backend, path: Path) -> None:
    app.state.service = GenerationService(
        backend,
        model_names=model_names(settings, path),
        stream_buffer_tokens=settings.stream_buffer_tokens,
    )
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
