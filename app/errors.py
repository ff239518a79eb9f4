"""One error taxonomy, and the one place that turns it into each API's error envelope.

Every failure a client can see is an ``ApiError`` subclass carrying status, type, param and
code, raised wherever it is found (preparing a request, admitting it, generating) and turned
into OpenAI's ``{"error": {"message", "type", "param", "code"}}`` by ``ApiError.envelope``, or
into Anthropic's ``{"type": "error", "error": {"type", "message"}}`` by
``ApiError.anthropic_envelope`` on the Anthropic routes (its SDK and Claude Code read only
that shape; its error types are chosen by HTTP status, as Anthropic's own are). Anything
else is logged with its traceback by ``as_api_error`` and reaches the client as a bare
"internal error": no stack trace, no object address, no ``str(exc)`` of an engine error. The
HTTP side (``app.api.http.error_handlers``) maps FastAPI's and Starlette's own errors onto
the same taxonomy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

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

    def anthropic_envelope(self) -> dict[str, Any]:
        kind = ANTHROPIC_ERROR_TYPES.get(self.status_code, "api_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}


class InvalidRequest(ApiError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    def __init__(
        self,
        *,
        n_ctx: int,
        prompt_tokens: int,
        max_tokens: int,
        param: str,
        at_least: bool = False,
    ) -> None:
        """``at_least``: the prompt was refused before it was tokenized, on a lower bound of its
        token count (its UTF-8 length over the longest token's)."""
        counted = "at least " if at_least else ""
        super().__init__(
            f"This model's maximum context length is {n_ctx} tokens. However, you requested "
            f"{counted}{prompt_tokens + max_tokens} tokens ({counted}{prompt_tokens} in the "
            f"prompt, {max_tokens} for the completion). Please reduce the prompt or max_tokens.",
            param=param,
            code="context_length_exceeded",
        )


class LimitExceeded(InvalidRequest):
    """A request over one of the server's documented limits (docs/api.md, Limits): the message
    names the field, the limit and the setting that raises it."""

    def __init__(self, what: str, limit: str, *, param: str, setting: str | None = None) -> None:
        raised_by = f" (--{setting.replace('_', '-')})" if setting else ""
        super().__init__(
            f"{what} is over this server's limit of {limit}{raised_by}.",
            param=param,
            code="limit_exceeded",
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


ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}
"""Anthropic's error type for each status we answer with (its ``overloaded_error`` is the
one its clients retry later, which is what our 503s — loading, draining, timeouts — ask)."""


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
    # A location or a message may quote client text (a key, a name): never at any length.
    param = ".".join(loc)[:200] or None
    message = str(first.get("msg", "invalid value"))[:500]
    text = f"Invalid value for '{param}': {message}" if param else message
    return InvalidRequest(text, param=param, code="invalid_value")
