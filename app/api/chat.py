"""``POST /v1/chat/completions``: OpenAI chat completions, streamed or buffered."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.deps import ServiceDep, SettingsDep
from app.api.formats import ChatFormat
from app.api.generation import read_body, respond
from app.api.schemas import ChatCompletionRequest
from app.api.wire import ChunkWire

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    request: Request, service: ServiceDep, settings: SettingsDep
) -> Response:
    arrived = time.perf_counter()
    body = await read_body(request, ChatCompletionRequest)
    job = await service.prepare_chat(body)
    wire = ChunkWire(
        ChatFormat(
            service.model_id,
            reasoning_field=(
                "reasoning"
                if service.semantics.reasoning_format == "reasoning"
                else "reasoning_content"
            ),
            token_bytes=service.backend.tokenizer.token_bytes,
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
