"""Request ids and one structured log line per request.

Every response carries ``x-request-id``: the client's own (if it sent a sane one) or a new one,
so a user's bug report and the server's log line meet. When the response's last byte is sent
— for a stream, after ``[DONE]`` — one line is logged with the id, route, status, duration and
the generation's facts (tokens, cache hits, finish reason, time to first token). Prompt and
completion text are never logged at info level.

``JsonFormatter`` renders every log record as one JSON object per line, its ``extra`` fields
included, which is what log shippers (Loki, Elastic, CloudWatch) parse without a pattern.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("app.access")

_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def request_facts(scope: Scope) -> dict[str, Any]:
    """The per-request dict routes fill with generation facts for the access log."""
    facts: dict[str, Any] = scope.setdefault("state", {}).setdefault("log_facts", {})
    return facts


class RequestLogMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        offered = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = offered if _SANE_ID.match(offered) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        facts = request_facts(scope)
        status = 500
        logged = False

        def log_once() -> None:
            nonlocal logged
            if not logged:
                logged = True
                self._log(scope, request_id, status, started, facts)

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                log_once()

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log_once()  # a client that left, or a failure, still gets its line

    @staticmethod
    def _log(
        scope: Scope, request_id: str, status: int, started: float, facts: dict[str, Any]
    ) -> None:
        access_log.info(
            "%s %s %d",
            scope["method"],
            scope["path"],
            status,
            extra={
                "request_id": request_id,
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                **facts,
            },
        )


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)
