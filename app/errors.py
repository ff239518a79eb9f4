"""One error taxonomy, and the one place that turns it into OpenAI's error envelope.

Every failure a client can see is an ``ApiError`` subclass carrying status, type, param and
code; ``install_error_handlers`` maps those, FastAPI's validation errors, Starlette's HTTP
errors (unknown route, wrong method) and anything unexpected to
``{"error": {"message", "type", "param", "code"}}``. Unexpected exceptions are logged with
their traceback here and reach the client as a bare "internal error": no stack trace, no
object address, no ``str(exc)`` of an engine error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class ApiError(Exception):
    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def envelope(self) -> dict[str, Any]:
        return error_envelope(self.message, self.error_type, self.param, self.code)


class InvalidRequest(ApiError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    def __init__(self, *, n_ctx: int, prompt_tokens: int, max_tokens: int, param: str) -> None:
        super().__init__(
            f"This model's maximum context length is {n_ctx} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
            f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.",
            param=param,
            code="context_length_exceeded",
        )


class NotFound(ApiError):
    status_code = 404
    error_type = "invalid_request_error"


class MethodNotAllowed(InvalidRequest):
    status_code = 405


class PayloadTooLarge(InvalidRequest):
    status_code = 413


class Unauthorized(ApiError):
    status_code = 401
    error_type = "authentication_error"


class Overloaded(ApiError):
    status_code = 429
    error_type = "rate_limit_error"


class Unavailable(ApiError):
    status_code = 503
    error_type = "server_error"


class InternalError(ApiError):
    status_code = 500
    error_type = "server_error"

    def __init__(self) -> None:
        super().__init__("The server had an internal error while processing the request.")


def error_envelope(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def as_api_error(exc: BaseException) -> ApiError:
    """The client-facing form of any exception; unexpected ones are logged here."""
    if isinstance(exc, ApiError):
        return exc
    logger.error("unhandled error", exc_info=exc)
    return InternalError()


def validation_error(errors: Sequence[Any]) -> InvalidRequest:
    """A 400 naming the first invalid field, from pydantic's or FastAPI's error list."""
    if not errors:
        return InvalidRequest("Invalid request body.")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid value"))
    text = f"Invalid value for '{param}': {message}" if param else message
    return InvalidRequest(text, param=param, code="invalid_value")


def record_error(request: Request, error: ApiError) -> None:
    """Count the error in the app's metrics, when it has them."""
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.error(error.error_type, error.status_code)


def _response(request: Request, error: ApiError) -> JSONResponse:
    record_error(request, error)
    headers = {"Retry-After": "1"} if isinstance(error, Overloaded) else None
    return JSONResponse(error.envelope(), status_code=error.status_code, headers=headers)


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

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_request_validation)
    app.add_exception_handler(ValidationError, on_request_validation)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_api_error)
