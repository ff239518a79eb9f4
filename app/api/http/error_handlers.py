"""HTTP errors: every failure answered in its API's envelope, counted in the metrics.

``install_error_handlers`` maps the taxonomy (``app.errors``), FastAPI's validation errors,
Starlette's HTTP errors (unknown route, wrong method) and anything unexpected to the envelope,
so no route ever answers FastAPI's ``{"detail": ...}`` or a stack trace. The envelope is
chosen by path (``error_body``), not by route, so that refusals made before any route runs
(an API key, a body too large, an unknown path under ``/v1/messages``) have it too. A client
that leaves before it has sent its whole body is no error of the server's: an info line, and
no answer (the access log says 499, as nginx does).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.errors import (
    ApiError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    as_api_error,
    validation_error,
)

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499
"""nginx's status for a request whose client left before the answer (for the access log)."""

ANTHROPIC_PATH = "/v1/messages"


def error_body(path: str, error: ApiError) -> dict[str, Any]:
    """The error as the API at ``path`` reports errors: Anthropic's shape on its routes,
    OpenAI's everywhere else."""
    if path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/"):
        return error.anthropic_envelope()
    return error.envelope()


def record_error(request: Request, error: ApiError) -> None:
    """Count the error in the app's metrics, when it has them."""
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.error(error.error_type, error.status_code)


def _response(request: Request, error: ApiError) -> JSONResponse:
    record_error(request, error)
    headers = {"Retry-After": "1"} if isinstance(error, Overloaded) else None
    body = error_body(request.url.path, error)
    return JSONResponse(body, status_code=error.status_code, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        return _response(request, as_api_error(exc))

    async def on_request_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError | ValidationError)
        return _response(request, validation_error(exc.errors()))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        error: ApiError
        if exc.status_code == 404:
            error = NotFound("Unknown endpoint.", code="not_found")
        elif exc.status_code == 405:
            error = MethodNotAllowed("Method not allowed for this endpoint.")
        elif exc.status_code < 500:
            error = InvalidRequest(str(exc.detail))
        else:
            error = InternalError()
        return _response(request, error)

    async def on_client_disconnect(request: Request, exc: Exception) -> Response:
        logger.info(
            "the client of %s %s left before it sent its whole body",
            request.method,
            request.url.path,
        )
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(ClientDisconnect, on_client_disconnect)
    app.add_exception_handler(RequestValidationError, on_request_validation)
    app.add_exception_handler(ValidationError, on_request_validation)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_api_error)
