"""HTTP routes: parse, prepare through the service, answer as JSON or as SSE.

Chat and text completions differ only in the shape of their objects, so each has a small
``_Format`` that builds its chunks and its buffered response; streaming and buffering are
written once, over ``GenerationService.generate``. The buffered body is the stream collected,
so the two cannot disagree.

The body is parsed from the raw bytes whatever the Content-Type: ``curl -d`` sends JSON as
``application/x-www-form-urlencoded``, and refusing that would fail the most common first try.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.errors import InvalidRequest, Unavailable, as_api_error, validation_error
from app.formats import Answer, ChatFormat, CompletionFormat, Format, usage_of
from app.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from app.service import Event, Finished, GenerationService, PreparedGeneration
from app.settings import Settings

logger = logging.getLogger(__name__)

router = APIRouter()

RequestModel = TypeVar("RequestModel", bound=BaseModel)


def get_service(request: Request) -> GenerationService:
    service: GenerationService | None = getattr(request.app.state, "service", None)
    if service is None:
        raise Unavailable("The model is still loading; retry shortly.", code="model_loading")
    return service


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


ServiceDep = Annotated[GenerationService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


async def read_body(request: Request, model: type[RequestModel]) -> RequestModel:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest("The request body is not valid JSON.", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc


def _sse(data: str) -> ServerSentEvent:
    return ServerSentEvent(data=data, sep="\n")


def _event(chunk: BaseModel) -> ServerSentEvent:
    return _sse(chunk.model_dump_json())


async def _stream_events(
    service: GenerationService, job: PreparedGeneration, fmt: Format, include_usage: bool
) -> AsyncIterator[ServerSentEvent]:
    first = fmt.first_chunk()
    if first is not None:
        yield _event(first)
    try:
        async for item in service.generate(job):
            if isinstance(item, Event):
                yield _event(fmt.event_chunk(item))
                continue
            yield _event(fmt.finish_chunk(item))
            if include_usage:
                yield _event(fmt.usage_chunk(usage_of(item)))
            _log_finished(fmt, item)
    except Exception as exc:
        # Headers are gone: the error travels in-band, then the stream ends normally.
        yield _sse(json.dumps(as_api_error(exc).envelope()))
    yield _sse("[DONE]")


async def _collect(
    service: GenerationService, job: PreparedGeneration, fmt: Format
) -> dict[str, Any]:
    answer = Answer()
    async for item in service.generate(job):
        if isinstance(item, Event):
            answer.add(item)
        else:
            _log_finished(fmt, item)
            return fmt.response(answer, item).model_dump()
    raise RuntimeError("generation ended without a finish")  # the service always finishes


def _log_finished(fmt: Format, finished: Finished) -> None:
    logger.info(
        "request %s finished: %s, prompt_tokens=%d (cached %d), completion_tokens=%d",
        fmt.id,
        finished.finish_reason,
        finished.prompt_tokens,
        finished.cached_tokens,
        finished.completion_tokens,
    )


def _sse_response(
    service: GenerationService,
    settings: Settings,
    job: PreparedGeneration,
    fmt: Format,
    include_usage: bool,
) -> EventSourceResponse:
    return EventSourceResponse(
        _stream_events(service, job, fmt, include_usage),
        ping=settings.sse_keepalive_s,
        sep="\n",
        ping_message_factory=lambda: ServerSentEvent(comment="keep-alive", sep="\n"),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    request: Request, service: ServiceDep, settings: SettingsDep
) -> Response | EventSourceResponse:
    body = await read_body(request, ChatCompletionRequest)
    job = await service.prepare_chat(body)
    fmt = ChatFormat(
        service.model_id,
        reasoning_field=(
            "reasoning" if service.reasoning_format == "reasoning" else "reasoning_content"
        ),
        token_bytes=service.backend.tokenizer.token_bytes,
        logprobs=body.logprobs,
    )
    if body.stream:
        return _sse_response(service, settings, job, fmt, body.include_usage)
    return JSONResponse(await _collect(service, job, fmt))


@router.post("/v1/completions", response_model=None)
async def completions(
    request: Request, service: ServiceDep, settings: SettingsDep
) -> Response | EventSourceResponse:
    body = await read_body(request, CompletionRequest)
    job = await service.prepare_completion(body)
    fmt = CompletionFormat(service.model_id)
    if body.stream:
        return _sse_response(service, settings, job, fmt, body.include_usage)
    return JSONResponse(await _collect(service, job, fmt))


@router.get("/v1/models")
async def list_models(service: ServiceDep, request: Request) -> ModelList:
    created: int = request.app.state.started_at
    return ModelList(data=[ModelCard(id=service.model_id, created=created)])


@router.get("/health", response_model=None)
async def health(request: Request) -> JSONResponse:
    status: str = request.app.state.load_status
    return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)
