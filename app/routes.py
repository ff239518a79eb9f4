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
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.errors import InvalidRequest, Unavailable, as_api_error, validation_error
from app.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionRequest,
    DeltaMessage,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    Usage,
)
from app.service import Finished, GenerationService, PreparedGeneration
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


def _usage(finished: Finished) -> Usage:
    return Usage(
        prompt_tokens=finished.prompt_tokens,
        completion_tokens=finished.completion_tokens,
        total_tokens=finished.prompt_tokens + finished.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=finished.cached_tokens),
    )


class _Format(Protocol):
    """The object shapes of one endpoint; ids, created and model are fixed per request."""

    def first_chunk(self) -> BaseModel | None: ...
    def text_chunk(self, text: str) -> BaseModel: ...
    def finish_chunk(self, finished: Finished) -> BaseModel: ...
    def usage_chunk(self, usage: Usage) -> BaseModel: ...
    def response(self, text: str, finished: Finished) -> BaseModel: ...


class _ChatFormat:
    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> BaseModel:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def first_chunk(self) -> BaseModel:
        delta = DeltaMessage(role="assistant", content="")
        return self._chunk([ChunkChoice(delta=delta, finish_reason=None)])

    def text_chunk(self, text: str) -> BaseModel:
        return self._chunk([ChunkChoice(delta=DeltaMessage(content=text), finish_reason=None)])

    def finish_chunk(self, finished: Finished) -> BaseModel:
        return self._chunk(
            [ChunkChoice(delta=DeltaMessage(), finish_reason=finished.finish_reason)]
        )

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return self._chunk([], usage)

    def response(self, text: str, finished: Finished) -> BaseModel:
        return ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                ChatChoice(
                    message=AssistantMessage(content=text),
                    finish_reason=finished.finish_reason,
                )
            ],
            usage=_usage(finished),
        )


class _CompletionFormat:
    def __init__(self, model: str) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> BaseModel:
        return Completion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def first_chunk(self) -> None:
        return None

    def text_chunk(self, text: str) -> BaseModel:
        return self._chunk([CompletionChoice(text=text, finish_reason=None)])

    def finish_chunk(self, finished: Finished) -> BaseModel:
        return self._chunk([CompletionChoice(text="", finish_reason=finished.finish_reason)])

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return self._chunk([], usage)

    def response(self, text: str, finished: Finished) -> BaseModel:
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[CompletionChoice(text=text, finish_reason=finished.finish_reason)],
            usage=_usage(finished),
        )


def _sse(data: str) -> ServerSentEvent:
    return ServerSentEvent(data=data, sep="\n")


def _event(chunk: BaseModel) -> ServerSentEvent:
    return _sse(chunk.model_dump_json())


async def _stream_events(
    service: GenerationService, job: PreparedGeneration, fmt: _Format, include_usage: bool
) -> AsyncIterator[ServerSentEvent]:
    first = fmt.first_chunk()
    if first is not None:
        yield _event(first)
    try:
        async for item in service.generate(job):
            if isinstance(item, str):
                yield _event(fmt.text_chunk(item))
                continue
            yield _event(fmt.finish_chunk(item))
            if include_usage:
                yield _event(fmt.usage_chunk(_usage(item)))
            _log_finished(fmt, item)
    except Exception as exc:
        # Headers are gone: the error travels in-band, then the stream ends normally.
        yield _sse(json.dumps(as_api_error(exc).envelope()))
    yield _sse("[DONE]")


async def _collect(
    service: GenerationService, job: PreparedGeneration, fmt: _Format
) -> dict[str, Any]:
    parts: list[str] = []
    async for item in service.generate(job):
        if isinstance(item, str):
            parts.append(item)
        else:
            _log_finished(fmt, item)
            return fmt.response("".join(parts), item).model_dump()
    raise RuntimeError("generation ended without a finish")  # the service always finishes


def _log_finished(fmt: _Format, finished: Finished) -> None:
    logger.info(
        "request %s finished: %s, prompt_tokens=%d (cached %d), completion_tokens=%d",
        getattr(fmt, "id", "?"),
        finished.finish_reason,
        finished.prompt_tokens,
        finished.cached_tokens,
        finished.completion_tokens,
    )


def _sse_response(
    service: GenerationService,
    settings: Settings,
    job: PreparedGeneration,
    fmt: _Format,
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
    fmt = _ChatFormat(service.model_id)
    if body.stream:
        return _sse_response(service, settings, job, fmt, body.include_usage)
    return JSONResponse(await _collect(service, job, fmt))


@router.post("/v1/completions", response_model=None)
async def completions(
    request: Request, service: ServiceDep, settings: SettingsDep
) -> Response | EventSourceResponse:
    body = await read_body(request, CompletionRequest)
    job = await service.prepare_completion(body)
    fmt = _CompletionFormat(service.model_id)
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
