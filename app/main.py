"""Application factory: ``create_app(settings)`` builds the app (routers, error handlers,
middleware); the lifespan (``app.lifespan``) owns the model and the service."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app import __version__
from app.api import ops
from app.api.anthropic import routes as anthropic_routes
from app.api.http.access_log import RequestLogMiddleware
from app.api.http.error_handlers import install_error_handlers
from app.api.http.metrics import Metrics
from app.api.http.security import ApiKeyMiddleware, BodyLimitMiddleware, load_api_keys
from app.api.infill import routes as infill_routes
from app.api.openai import routes as openai_routes
from app.api.responses import routes as responses_routes
from app.api.web.routes import ASSETS, web_router
from app.engine import Backend
from app.lifespan import lifespan_of
from app.settings import Settings


def create_app(settings: Settings | None = None, *, backend: Backend | None = None) -> FastAPI:
    """The app; with ``backend`` given it serves that (already loaded) model and never closes it."""
    settings = settings or Settings()
    app = FastAPI(
        title="qwen3-moe-serve", version=__version__, lifespan=lifespan_of(settings, backend)
    )
    app.state.metrics = Metrics()
    install_error_handlers(app)
    for module in (openai_routes, infill_routes, responses_routes, anthropic_routes, ops):
        app.include_router(module.router)
    if settings.web_page:
        app.include_router(web_router())
    _install_middleware(app, settings)
    return app


OPS_PATHS = ("/health", "/metrics")


def _install_middleware(app: FastAPI, settings: Settings) -> None:
    """Outermost first: request id and access log, CORS, body limit, then API keys."""
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    keys = load_api_keys(api_key, settings.api_key_file)
    if keys:
        open_paths = () if settings.protect_health_metrics else OPS_PATHS
        if settings.web_page:  # the page holds no secret; the API it calls asks for the key
            open_paths = (*open_paths, *ASSETS)
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
