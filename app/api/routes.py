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
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from app.errors import (
    InvalidRequest,
    Unavailable,
    as_api_error,
    record_error,
    validation_error,
)
from app.formats import Answer, ChatFormat, CompletionFormat, Format, usage_of
from app.metrics import Metrics
from app.observability import request_facts
from app.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from app.service import Event, Finished, GenerationService, PreparedGeneration
from app.settings import Settings
from app.sse import event_stream, frame

router = APIRouter()

RequestModel = TypeVar("RequestModel", bound=BaseModel)


# The dependencies are ``async`` though they never wait: FastAPI runs a plain ``def``
# dependency on a worker thread, and two thread hops per request were measurable in the time
# to first token on a busy host (bench.profile).
async def get_service(request: Request) -> GenerationService:
    service: GenerationService | None = getattr(request.app.state, "service", None)
    if service is None:
        raise Unavailable("The model is still loading; retry shortly.", code="model_loading")
    return service


async def get_settings(request: Request) -> Settings:
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


def _event(chunk: BaseModel) -> bytes:
    return frame(chunk.model_dump_json())


async def _generation(
    request: Request, service: GenerationService, job: PreparedGeneration, arrived: float
) -> AsyncIterator[Event | Finished]:
    """The service's generation, measured for /metrics and noted for the access log."""
    metrics: Metrics = request.app.state.metrics
    async for item in metrics.observe(service.generate(job), arrived):
        if isinstance(item, Finished):
            request_facts(request.scope).update(
                finish_reason=item.finish_reason,
                prompt_tokens=item.prompt_tokens,
                cached_tokens=item.cached_tokens,
                completion_tokens=item.completion_tokens,
                queue_ms=round(item.timings.queue_ms, 2),
                prompt_ms=round(item.timings.prompt_ms, 2),
                decode_ms=round(item.timings.decode_ms, 2),
            )
        yield item


async def _stream_events(
    request: Request, items: AsyncIterator[Event | Finished], fmt: Format, include_usage: bool
) -> AsyncGenerator[bytes, None]:
    first = fmt.first_chunk()
    if first is not None:
        yield _event(first)
    try:
        async for item in items:
            if isinstance(item, Event):
                yield frame(fmt.event_json(item))
                continue
            yield _event(fmt.finish_chunk(item))
            if include_usage:
                yield _event(fmt.usage_chunk(usage_of(item)))
    except Exception as exc:
        # Headers are gone: the error travels in-band, then the stream ends normally.
        error = as_api_error(exc)
        record_error(request, error)
        yield frame(json.dumps(error.envelope()))
    yield frame("[DONE]")


async def _collect(items: AsyncIterator[Event | Finished], fmt: Format) -> dict[str, Any]:
    answer = Answer()
    async for item in items:
        if isinstance(item, Event):
            answer.add(item)
        else:
            return fmt.response(answer, item).model_dump()
    raise RuntimeError("generation ended without a finish")  # the service always finishes


async def _respond(
    request: Request,
    service: GenerationService,
    settings: Settings,
    job: PreparedGeneration,
    fmt: Format,
    *,
    stream: bool,
    include_usage: bool,
    arrived: float,
) -> Response:
    """One generation path: streamed as SSE, or the same events collected into JSON."""
    items = _generation(request, service, job, arrived)
    if not stream:
        return JSONResponse(await _collect(items, fmt))
    return event_stream(
        _stream_events(request, items, fmt, include_usage),
        keepalive_s=settings.sse_keepalive_s,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    request: Request, service: ServiceDep, settings: SettingsDep
) -> Response:
    arrived = time.perf_counter()
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
    return await _respond(
        request,
        service,
        settings,
        job,
        fmt,
        stream=body.stream,
        include_usage=body.include_usage,
        arrived=arrived,
    )


@router.post("/v1/completions", response_model=None)
async def completions(request: Request, service: ServiceDep, settings: SettingsDep) -> Response:
    arrived = time.perf_counter()
    body = await read_body(request, CompletionRequest)
    job = await service.prepare_completion(body)
    fmt = CompletionFormat(service.model_id)
    return await _respond(
        request,
        service,
        settings,
        job,
        fmt,
        stream=body.stream,
        include_usage=body.include_usage,
        arrived=arrived,
    )


@router.get("/v1/models")
async def list_models(service: ServiceDep, request: Request) -> ModelList:
    created: int = request.app.state.started_at
    return ModelList(data=[ModelCard(id=service.model_id, created=created)])


@router.get("/metrics", response_model=None)
async def metrics(request: Request) -> Response:
    exported: Metrics = request.app.state.metrics
    return Response(exported.exposition(), media_type=exported.content_type)


@router.get("/health", response_model=None)
async def health(request: Request) -> JSONResponse:
    status: str = request.app.state.load_status
    return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)
