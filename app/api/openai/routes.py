"""``POST /v1/chat/completions`` and ``POST /v1/completions``: OpenAI chat and text
completions, streamed or buffered."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.http.deps import ServiceDep, SettingsDep
from app.api.http.generation import read_body, respond
from app.api.openai.formats import ChatFormat, CompletionFormat
from app.api.openai.requests import ChatCompletionRequest, CompletionRequest
from app.api.openai.to_core import chat_request, text_request
from app.api.openai.wire import ChunkWire

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    request: Request, service: ServiceDep, settings: SettingsDep
) -> Response:
    arrived = time.perf_counter()
    body = await read_body(request, ChatCompletionRequest)
    job = await service.prepare_chat(chat_request(body))
    wire = ChunkWire(
        ChatFormat(
            service.model_id,
            reasoning_field=(
                "reasoning" if service.reasoning_format == "reasoning" else "reasoning_content"
            ),
            token_bytes=service.token_bytes,
            logprobs=body.logprobs,
        ),
        include_usage=body.include_usage,
    )
    return await respond(
        request,
        service,
        settings,
        job,
        wire,
        stream=body.stream,
        arrived=arrived,
    )


@router.post("/v1/completions", response_model=None)
async def completions(request: Request, service: ServiceDep, settings: SettingsDep) -> Response:
    arrived = time.perf_counter()
    body = await read_body(request, CompletionRequest)
    job = await service.prepare_completion(text_request(body))
    return await respond(
        request,
        service,
        settings,
        job,
        ChunkWire(CompletionFormat(service.model_id), include_usage=body.include_usage),
        stream=body.stream,
        arrived=arrived,
    )
