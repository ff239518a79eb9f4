"""The ``qwen3-moe-serve`` console script: settings from flags and environment, then uvicorn."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import uvicorn
from pydantic import ValidationError
from pydantic_settings import CliApp

from app.api.http.access_log import JsonFormatter
from app.api.http.connections import timed_http_protocol
from app.engine import check_settings
from app.main import create_app
from app.settings import Settings


def parse_settings(argv: Sequence[str]) -> Settings:
    return CliApp.run(Settings, cli_args=list(argv))


def main(argv: Sequence[str] | None = None) -> None:
    try:
        settings = parse_settings(sys.argv[1:] if argv is None else argv)
    except ValidationError as exc:
        sys.exit(f"qwen3-moe-serve: invalid settings{_flags_of(exc)}:\n{exc}")
    try:
        check_settings(settings)  # what only this llama.cpp build can say (buffer types)
    except ValueError as exc:
        sys.exit(f"qwen3-moe-serve: invalid settings:\n{exc}")
    configure_logging(settings.log_level, settings.log_format)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # keep our handlers: uvicorn's own config would replace them
        access_log=False,  # app.api.http.access_log writes one richer line per request
        timeout_graceful_shutdown=5,
        http=timed_http_protocol(
            header_timeout_s=settings.header_timeout_s, body_timeout_s=settings.body_timeout_s
        ),
    )


def _flags_of(exc: ValidationError) -> str:
    """`` (--n-ctx, --cache-type-k)``: the flags of the settings the errors are about."""
    flags = sorted({f"--{str(e['loc'][0]).replace('_', '-')}" for e in exc.errors() if e["loc"]})
    return f" ({', '.join(flags)})" if flags else ""


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


if __name__ == "__main__":
    main()
